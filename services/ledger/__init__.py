"""The points ledger: accounts, transfers, lots, holds, tiers and the program's earning rules."""
