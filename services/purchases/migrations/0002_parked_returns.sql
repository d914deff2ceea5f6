-- Returns that arrived before their sale (another partition, another door, a webhook out of
-- order). They wait here until the sale is recorded or the parking time runs out, then
-- they are dead-lettered as unknown_original.
CREATE TABLE parked_returns (
    source               text        NOT NULL,
    purchase_id          text        NOT NULL,
    original_purchase_id text        NOT NULL,
    door                 text        NOT NULL,
    purchase             jsonb       NOT NULL,
    original             bytea       NOT NULL,
    correlation_id       text,
    kafka                jsonb       NOT NULL DEFAULT '{}'::jsonb,
    parked_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, purchase_id)
);

CREATE INDEX parked_returns_original_idx ON parked_returns (source, original_purchase_id);
CREATE INDEX parked_returns_parked_at_idx ON parked_returns (parked_at);
