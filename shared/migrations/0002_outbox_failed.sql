-- Outbox rows the broker can never accept (e.g. larger than its message size limit). They
-- are moved here, with the error, so that one of them cannot stop the relay for everyone.
CREATE TABLE outbox_failed (
    id         bigint      PRIMARY KEY,
    topic      text        NOT NULL,
    key        text,
    value      bytea       NOT NULL,
    headers    jsonb       NOT NULL,
    created_at timestamptz NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT now(),
    error      text        NOT NULL
);
