-- The ledger's own tables (schema "ledger"). Accounts and transfers follow TigerBeetle.

-- Program rules, versioned: every posting records the version that produced it.
CREATE TABLE program_versions (
    version    integer     PRIMARY KEY,
    document   jsonb       NOT NULL,
    source     text        NOT NULL CHECK (source IN ('file', 'admin')),
    actor      text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per customer: the per-customer lock (SELECT ... FOR UPDATE) that serialises every
-- change to a customer's points, and the tier.
CREATE TABLE customers (
    customer_id   text        PRIMARY KEY,
    tier          text        NOT NULL DEFAULT '',
    has_purchased boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Posted and pending debit/credit totals. Balance flags are CHECK constraints, so even a
-- bug in the service cannot overdraw an account: the transaction fails instead.
CREATE TABLE accounts (
    account_id      text   PRIMARY KEY,
    customer_id     text   REFERENCES customers (customer_id),
    kind            text   NOT NULL CHECK (kind IN ('issuance', 'redemption', 'expiry', 'available', 'pending', 'debt')),
    debits_pending  bigint NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    debits_posted   bigint NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_pending bigint NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    credits_posted  bigint NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    CONSTRAINT customer_points_never_overdrawn
        CHECK (kind NOT IN ('available', 'pending') OR debits_posted + debits_pending <= credits_posted),
    CONSTRAINT debt_never_overpaid CHECK (kind <> 'debt' OR credits_posted <= debits_posted)
);
CREATE INDEX accounts_customer ON accounts (customer_id);
INSERT INTO accounts (account_id, kind) VALUES
    ('program:issuance', 'issuance'), ('program:redemption', 'redemption'), ('program:expiry', 'expiry');

-- Append-only: a mistake is corrected by a reversing transfer, never by an edit.
CREATE TABLE transfers (
    seq               bigserial   PRIMARY KEY,
    transfer_id       uuid        NOT NULL UNIQUE,
    debit_account_id  text        NOT NULL,
    credit_account_id text        NOT NULL,
    amount_points     bigint      NOT NULL CHECK (amount_points > 0),
    code              text        NOT NULL,
    phase             text        NOT NULL,
    pending_id        uuid,
    customer_id       text        NOT NULL,
    ref               text        NOT NULL,
    lot_id            uuid,
    rule_version      integer,
    occurred_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transfers_customer ON transfers (customer_id, seq);

CREATE FUNCTION transfers_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'transfers are append-only (% refused)', TG_OP;
END $$;
CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION transfers_append_only();

-- Each earn credit is a lot with its expiry; spending consumes the lots that expire first.
CREATE TABLE lots (
    lot_id           uuid        PRIMARY KEY,
    customer_id      text        NOT NULL,
    source           text        NOT NULL CHECK (source IN ('purchase', 'adjustment')),
    purchase_id      text        UNIQUE,
    occurred_at      timestamptz NOT NULL,
    amount_points    integer     NOT NULL CHECK (amount_points >= 0),
    remaining_points integer     NOT NULL CHECK (remaining_points >= 0),
    held_points      integer     NOT NULL DEFAULT 0 CHECK (held_points >= 0),
    expired_points   integer     NOT NULL DEFAULT 0,
    pending          boolean     NOT NULL,
    matures_at       timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    rule_version     integer,
    qualifying       boolean     NOT NULL DEFAULT false,
    earned_points    integer     NOT NULL DEFAULT 0,
    reversed_points  integer     NOT NULL DEFAULT 0,
    bonus_points     integer     NOT NULL DEFAULT 0,
    tier_multiplier  numeric     NOT NULL DEFAULT 1,
    lines            jsonb       NOT NULL DEFAULT '[]',
    breakdown        jsonb       NOT NULL DEFAULT '[]',
    return_ids       text[]      NOT NULL DEFAULT '{}',
    reminded_on      date,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lots_spendable ON lots (customer_id, expires_at) WHERE remaining_points > 0 AND NOT pending;
CREATE INDEX lots_qualifying ON lots (customer_id, occurred_at) WHERE qualifying;
CREATE INDEX lots_maturing ON lots (matures_at) WHERE pending;
CREATE INDEX lots_expiring ON lots (expires_at) WHERE remaining_points > 0 AND NOT pending;

-- Two-phase redemption holds; redemption_id is the idempotency key shared with rewards.
CREATE TABLE holds (
    redemption_id uuid        PRIMARY KEY,
    customer_id   text        NOT NULL,
    amount_points integer     NOT NULL CHECK (amount_points > 0),
    state         text        NOT NULL CHECK (state IN ('held', 'posted', 'voided', 'refunded')),
    expires_at    timestamptz NOT NULL,
    transfer_id   uuid        NOT NULL,
    allocations   jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX holds_timing_out ON holds (expires_at) WHERE state = 'held';

-- Manual adjustments: who, why, when (the audit trail next to the transfer they caused).
CREATE TABLE adjustments (
    adjustment_id uuid        PRIMARY KEY,
    customer_id   text        NOT NULL,
    amount_points integer     NOT NULL,
    reason_code   text        NOT NULL,
    actor         text        NOT NULL,
    note          text,
    transfer_id   uuid        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX adjustments_customer ON adjustments (customer_id, created_at);
