-- migrate: no-transaction
-- A hold's pending transfer is resolved once: posted (post_pending) or voided
-- (void_pending), never both, never twice. The service checks the hold's state under the
-- customer's lock; this makes a bug there fail the transaction instead of moving the points
-- twice. Partial: the transfers that resolve nothing (nearly all) never touch the index.
DROP INDEX CONCURRENTLY IF EXISTS transfers_pending_id_key;
CREATE UNIQUE INDEX CONCURRENTLY transfers_pending_id_key ON transfers (pending_id)
    WHERE pending_id IS NOT NULL;
