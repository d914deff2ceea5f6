-- A refund of a late redemption (fulfilled after its hold was voided) whose shortfall became
-- debt, and the customer repaid that debt before the cancellation: the repaid points come
-- back as a lot of their own (source 'refund'), since no earlier lot holds them any more.
ALTER TABLE lots DROP CONSTRAINT lots_source_check;
ALTER TABLE lots ADD CONSTRAINT lots_source_check CHECK (source IN ('purchase', 'adjustment', 'refund'));
