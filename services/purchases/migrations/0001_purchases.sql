-- Accepted purchases (sales and returns), one row per (source, purchase_id).
CREATE TABLE purchases (
    source               text        NOT NULL,
    purchase_id          text        NOT NULL,
    type                 text        NOT NULL CHECK (type IN ('sale', 'return')),
    original_purchase_id text,
    store_id             text        NOT NULL,
    customer_id          text,
    occurred_at          timestamptz NOT NULL,
    currency             char(3)     NOT NULL,
    total                numeric(18, 4) NOT NULL,
    lines                jsonb       NOT NULL,
    -- sha256 of the canonical content: a resend with the same hash is a duplicate,
    -- a different hash under the same key is a conflict.
    content_hash         bytea       NOT NULL,
    door                 text        NOT NULL,
    event_id             uuid        NOT NULL,
    recorded_at          timestamptz NOT NULL DEFAULT now(),
    -- sales only: quantity returned so far per line_id (partial returns add up here).
    returned             jsonb       NOT NULL DEFAULT '{}'::jsonb,
    claimed_at           timestamptz,
    PRIMARY KEY (source, purchase_id)
);

CREATE INDEX purchases_customer_idx ON purchases (customer_id, occurred_at) WHERE customer_id IS NOT NULL;

-- Store API keys for the HTTP door: only a hash is kept.
CREATE TABLE store_api_keys (
    key_hash   bytea       PRIMARY KEY,
    store_id   text        NOT NULL,
    label      text,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
