-- A refund of a late redemption (fulfilled after its hold was voided) whose shortfall became
-- debt, and the customer repaid that debt before the cancellation: the repaid points come
-- back as a lot of their own (source 'refund'), since no earlier lot holds them any more.
-- NOT VALID: a wider check needs no scan of the existing lots under this migration's lock
-- (they all pass the narrower one); 0005 validates it without blocking writes.
ALTER TABLE lots DROP CONSTRAINT lots_source_check;
ALTER TABLE lots ADD CONSTRAINT lots_source_check CHECK (source IN ('purchase', 'adjustment', 'refund')) NOT VALID;
