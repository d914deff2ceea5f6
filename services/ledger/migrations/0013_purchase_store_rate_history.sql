-- A purchase is named by its channel, its store and its id (the purchases service's key
-- since its migration 0003): two stores of a chain may both send "till-1-000001", and each
-- earns its own lot. Lots written before do not know their store (NULL) and are still
-- matched by channel and id, as they were (the ledger never saw the store of those sales).
ALTER TABLE lots ADD COLUMN purchase_store text;
DROP INDEX lots_purchase;
CREATE UNIQUE INDEX lots_purchase ON lots (purchase_id, purchase_source, purchase_store);
-- The rate the sale was converted at: its returns convert at the same rate.
ALTER TABLE lots ADD COLUMN currency_rate numeric;
-- Lots earned by imported history (as-earned): no expiry reminder, events marked history.
ALTER TABLE lots ADD COLUMN history boolean NOT NULL DEFAULT false;
