-- The rewards service's own tables (schema "rewards").

-- The catalog. stock_remaining NULL means unlimited; it is decremented by the reservation
-- that follows a hold, under a row lock, so it can never go below zero.
CREATE TABLE rewards (
    reward_id          text        PRIMARY KEY,
    name               text        NOT NULL,
    description        text        NOT NULL DEFAULT '',
    cost_points        integer     NOT NULL CHECK (cost_points > 0),
    kind               text        NOT NULL CHECK (kind IN ('coupon', 'voucher', 'physical')),
    voucher_value      numeric(14, 2),
    voucher_currency   text,
    stock_remaining    integer     CHECK (stock_remaining >= 0),
    per_customer_limit integer     CHECK (per_customer_limit > 0),
    valid_from         timestamptz,
    valid_until        timestamptz,
    min_tier           text,
    active             boolean     NOT NULL DEFAULT true,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (kind <> 'voucher' OR (voucher_value > 0 AND voucher_currency IS NOT NULL))
);

-- Uploaded coupon codes. A code is handed out at most once: redemption_id is set by the
-- reservation (FOR UPDATE SKIP LOCKED, so racing reservations take different codes).
CREATE TABLE coupon_codes (
    reward_id     text        NOT NULL REFERENCES rewards (reward_id),
    code          text        NOT NULL,
    redemption_id uuid        UNIQUE,
    uploaded_at   timestamptz NOT NULL DEFAULT now(),
    assigned_at   timestamptz,
    PRIMARY KEY (reward_id, code)
);
CREATE INDEX coupon_codes_free ON coupon_codes (reward_id) WHERE redemption_id IS NULL;

CREATE TABLE redemptions (
    redemption_id   uuid        PRIMARY KEY,
    customer_id     text        NOT NULL,
    reward_id       text        NOT NULL REFERENCES rewards (reward_id),
    idempotency_key text        NOT NULL,
    cost_points     integer     NOT NULL CHECK (cost_points > 0),
    kind            text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('requested', 'fulfilled', 'failed', 'cancelled')),
    ledger_status   text        NOT NULL DEFAULT 'pending'
                                CHECK (ledger_status IN ('pending', 'held', 'rejected', 'redeemed', 'released')),
    failure_reason  text,
    code            text,
    hold_expires_at timestamptz,
    correlation_id  text        NOT NULL,
    request_attempts integer    NOT NULL DEFAULT 1,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    last_requested_at timestamptz NOT NULL DEFAULT now(),
    fulfilled_at    timestamptz,
    finished_at     timestamptz,
    -- The idempotency key is scoped to the customer: two customers may pick the same one.
    UNIQUE (customer_id, idempotency_key),
    CHECK (status <> 'fulfilled' OR fulfilled_at IS NOT NULL)
);
CREATE INDEX redemptions_by_customer ON redemptions (customer_id, requested_at DESC);
CREATE INDEX redemptions_for_limit ON redemptions (customer_id, reward_id) WHERE status IN ('requested', 'fulfilled');
CREATE INDEX redemptions_in_flight ON redemptions (last_requested_at) WHERE status = 'requested';
-- Generated voucher codes are unique across the program.
CREATE UNIQUE INDEX redemptions_voucher_code ON redemptions (code) WHERE kind = 'voucher' AND code IS NOT NULL;

-- What the ledger last told us about a customer (points.events BalanceAfter): shown in the
-- catalog ("affordable now") and used for tier rules. Never used to decide on points.
CREATE TABLE customer_standing (
    customer_id       text        PRIMARY KEY,
    available_points  integer     NOT NULL,
    held_points       integer     NOT NULL,
    tier              text        NOT NULL,
    qualifying_points integer     NOT NULL,
    as_of             timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
