-- Shared plumbing tables, created in every service's own schema.

-- Idempotent consumer: one row per (consumer, event) processed, written in the same
-- transaction as the state change it caused. A redelivered event finds its row and is a no-op.
CREATE TABLE inbox (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Transactional outbox: events written with the state change, published by the relay,
-- deleted once the broker acknowledged them.
CREATE TABLE outbox (
    id         bigserial   PRIMARY KEY,
    topic      text        NOT NULL,
    key        text,
    value      bytea       NOT NULL,
    headers    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
