-- migrate: no-transaction
-- repository.OPEN_LOTS (every redemption batch, adjustment and scheduler chunk) looks for a
-- customer's lots that still hold points; no index served it (lots_spendable leaves out
-- pending and held-only lots), so each call scanned the whole table. Partial: closed lots,
-- most of the table in time, are not in it. CONCURRENTLY: built while the ledger writes.
DROP INDEX CONCURRENTLY IF EXISTS lots_open;
CREATE INDEX CONCURRENTLY lots_open ON lots (customer_id)
    WHERE pending OR remaining_points > 0 OR held_points > 0;
