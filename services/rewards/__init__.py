"""The rewards service: catalog, coupon pools, and the redemption saga with the ledger."""
