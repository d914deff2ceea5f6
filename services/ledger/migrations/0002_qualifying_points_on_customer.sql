-- Qualifying points kept on the customer row, updated with every earn and return in the same
-- transaction, instead of summing the customer's lots on every batch (the hot path). The
-- scheduler recomputes the windowed sum for customers whose points leave the window.
ALTER TABLE customers ADD COLUMN qualifying_points integer NOT NULL DEFAULT 0;
UPDATE customers c SET qualifying_points = coalesce((
    SELECT sum(l.earned_points - l.reversed_points) FROM lots l
    WHERE l.customer_id = c.customer_id AND l.qualifying AND l.occurred_at > now() - interval '365 days'), 0);
-- The customer and account rows are rewritten by every batch: room on the page lets
-- PostgreSQL update them in place (HOT) instead of touching every index.
ALTER TABLE customers SET (fillfactor = 70);
ALTER TABLE accounts SET (fillfactor = 70);

-- How far the scheduler has re-tiered customers whose qualifying points left the window:
-- the next run starts there, so a long stop misses nobody and a crash repeats harmlessly.
CREATE TABLE scheduler_marks (
    name  text        PRIMARY KEY,
    value timestamptz NOT NULL
);

-- The scheduler looks for qualifying points that left the tier window by time alone; lots
-- arrive roughly in time order, so a BRIN index serves it at almost no cost to inserts.
CREATE INDEX lots_qualifying_time ON lots USING brin (occurred_at) WHERE qualifying;
