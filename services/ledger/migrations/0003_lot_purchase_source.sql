-- A purchase is identified by its channel and its id together (the purchases service keys
-- it by (source, purchase_id)): a POS sale "1001" and an e-shop order "1001" are two
-- purchases, and each earns its own lot. Lots written before this migration do not know
-- their channel (NULL): they are still matched by purchase id alone, as they were.
ALTER TABLE lots ADD COLUMN purchase_source text CHECK (purchase_source IN ('pos', 'eshop'));
ALTER TABLE lots DROP CONSTRAINT lots_purchase_id_key;
CREATE UNIQUE INDEX lots_purchase ON lots (purchase_id, purchase_source);
