-- migrate: no-transaction
-- The inbox retention sweep (shared/inbox.py) deletes rows by age. Rows arrive in
-- processed_at order, so a BRIN index finds the old ones at almost no cost to the inserts
-- (one per event applied); built CONCURRENTLY, the consumers keep writing meanwhile.
DROP INDEX CONCURRENTLY IF EXISTS inbox_processed_at;
CREATE INDEX CONCURRENTLY inbox_processed_at ON inbox USING brin (processed_at);
