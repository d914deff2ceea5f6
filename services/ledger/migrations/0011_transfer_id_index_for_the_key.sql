-- migrate: no-transaction
-- The index 0012 makes the primary key of transfers (see there), built without blocking writes.
DROP INDEX CONCURRENTLY IF EXISTS transfers_transfer_id_pk;
CREATE UNIQUE INDEX CONCURRENTLY transfers_transfer_id_pk ON transfers (transfer_id);
