-- A purchase is identified by its channel, its store and its id: chain stores number their
-- receipts independently, so "till-1-000001" from two stores are two purchases (before, the
-- second was refused as a conflict and its customer earned nothing). For an e-shop the store
-- is the shop. Existing rows keep their store; only the key widens.
ALTER TABLE purchases DROP CONSTRAINT purchases_pkey;
ALTER TABLE purchases ADD PRIMARY KEY (source, store_id, purchase_id);

ALTER TABLE parked_returns ADD COLUMN store_id text;
UPDATE parked_returns SET store_id = purchase->>'store_id';
ALTER TABLE parked_returns ALTER COLUMN store_id SET NOT NULL;
ALTER TABLE parked_returns DROP CONSTRAINT parked_returns_pkey;
ALTER TABLE parked_returns ADD PRIMARY KEY (source, store_id, purchase_id);
DROP INDEX parked_returns_original_idx;
CREATE INDEX parked_returns_original_idx ON parked_returns (source, store_id, original_purchase_id);

-- Imported history (purchases.import): recorded like any purchase, marked, with the policy
-- it was imported under (what the ledger earns for it).
ALTER TABLE purchases ADD COLUMN history boolean NOT NULL DEFAULT false;
ALTER TABLE purchases ADD COLUMN import_policy text CHECK (import_policy IN ('analytics', 'as-earned'));
ALTER TABLE parked_returns ADD COLUMN import_policy text;
