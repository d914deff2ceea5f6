-- The engagement service's own tables (schema "engagement"). Contact data and consent are
-- personal data: they live here only, and an erasure removes them (service.erase_customer).

-- One row per customer ever heard of: the per-customer lock the dispatcher takes (so two
-- dispatchers never both decide the cap of one customer), facts the journeys' conditions
-- need, and the contact data (NULL until a back-end sends it, NULL again after an erasure).
CREATE TABLE customers (
    customer_id     text        PRIMARY KEY,
    purchases       integer     NOT NULL DEFAULT 0,
    first_sale_at   timestamptz,
    tier            text,
    email           text,
    phone           text,
    locale          text,
    time_zone       text,
    contact_updated_at timestamptz,
    erased_at       timestamptz
);

-- Consent per channel, with where it came from and when; revocable (granted = false).
CREATE TABLE consents (
    customer_id text        NOT NULL REFERENCES customers (customer_id) ON DELETE CASCADE,
    channel     text        NOT NULL,
    granted     boolean     NOT NULL,
    source      text        NOT NULL,
    changed_at  timestamptz NOT NULL,
    PRIMARY KEY (customer_id, channel)
);

-- Sales seen, for the steps' conditions (a review request is skipped if the purchase was
-- returned) and the relationship-gap figures (time from a sale to its first touchpoint).
CREATE TABLE sales (
    purchase_id     text        NOT NULL,
    source          text        NOT NULL,
    customer_id     text        NOT NULL,
    store_id        text        NOT NULL,
    category        text,
    total           numeric     NOT NULL,
    currency        text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    returned        boolean     NOT NULL DEFAULT false,
    first_touch_at  timestamptz,
    PRIMARY KEY (purchase_id, source)
);
CREATE INDEX sales_occurred ON sales (occurred_at);

-- Journeys as data, versioned like the ledger's program: a new version when the file (or an
-- admin's replacement) differs from the latest.
CREATE TABLE journey_versions (
    version    integer     PRIMARY KEY,
    document   jsonb       NOT NULL,
    digest     text        NOT NULL,
    source     text        NOT NULL CHECK (source IN ('file', 'admin')),
    actor      text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- A customer's run through one journey. One active instance per (customer, journey) unless
-- the journey allows several (re-entry "always").
CREATE TABLE journey_instances (
    instance_id      uuid        PRIMARY KEY,
    customer_id      text        NOT NULL,
    journey          text        NOT NULL,
    journey_version  integer     NOT NULL,
    trigger_event_id uuid        NOT NULL,
    purchase_id      text,
    single           boolean     NOT NULL,
    status           text        NOT NULL CHECK (status IN ('active', 'done', 'exited')),
    exit_reason      text,
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz
);
CREATE UNIQUE INDEX journey_instances_one_active ON journey_instances (customer_id, journey)
    WHERE status = 'active' AND single;
CREATE INDEX journey_instances_customer ON journey_instances (customer_id) WHERE status = 'active';

-- Durable timers: one row per step due later. timer_id derives from (journey, trigger event,
-- step): the idempotency key, also the touchpoint id, the SMTP Message-ID and the webhook's
-- Idempotency-Key. The dispatcher's due scan reads the partial index only.
CREATE TABLE timers (
    timer_id         uuid        PRIMARY KEY,
    instance_id      uuid        NOT NULL,
    customer_id      text        NOT NULL,
    journey          text        NOT NULL,
    journey_version  integer     NOT NULL,
    step             text        NOT NULL,
    trigger_event_id uuid        NOT NULL,
    purchase_id      text,
    purchase_source  text,
    due_at           timestamptz NOT NULL,
    valid_until      timestamptz NOT NULL,
    status           text        NOT NULL CHECK (status IN ('scheduled', 'sent', 'skipped', 'failed')),
    attempts         integer     NOT NULL DEFAULT 0,
    reason           text,
    context          jsonb       NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL,
    completed_at     timestamptz
);
CREATE INDEX timers_due ON timers (due_at) WHERE status = 'scheduled';
CREATE INDEX timers_instance ON timers (instance_id) WHERE status = 'scheduled';

-- Every decision on a touchpoint (sent, deferred, skipped, failed, retried) and why.
CREATE TABLE decisions (
    timer_id   uuid        NOT NULL,
    decided_at timestamptz NOT NULL,
    decision   text        NOT NULL,
    reason     text,
    until_at   timestamptz
);
CREATE INDEX decisions_timer ON decisions (timer_id);

-- Messages sent: the caps read them; subject and body are personal content (erased).
CREATE TABLE messages (
    touchpoint_id  uuid        PRIMARY KEY,
    customer_id    text        NOT NULL,
    channel        text        NOT NULL,
    journey        text        NOT NULL,
    step           text        NOT NULL,
    capped         boolean     NOT NULL,
    survey         boolean     NOT NULL,
    sent_at        timestamptz NOT NULL,
    subject        text,
    body           text
);
CREATE INDEX messages_customer ON messages (customer_id, sent_at);

-- Surveys sent and their answers (aggregated per store, category and month).
CREATE TABLE surveys (
    survey_id    uuid        PRIMARY KEY,
    customer_id  text        NOT NULL,
    journey      text        NOT NULL,
    purchase_id  text,
    store_id     text,
    category     text,
    sent_at      timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    answered_at  timestamptz,
    nps          integer CHECK (nps BETWEEN 0 AND 10),
    csat         integer CHECK (csat BETWEEN 1 AND 5),
    remark       text
);
CREATE INDEX surveys_sent ON surveys (sent_at);

-- Complaints and their follow-up tasks (service recovery, a deadline each).
CREATE TABLE followups (
    followup_id   uuid        PRIMARY KEY,
    complaint_id  uuid        NOT NULL UNIQUE,
    customer_id   text        NOT NULL,
    source        text        NOT NULL,
    survey_id     uuid,
    purchase_id   text,
    store_id      text,
    category      text,
    remark        text,
    opened_at     timestamptz NOT NULL,
    due_at        timestamptz NOT NULL,
    assignee      text,
    status        text        NOT NULL CHECK (status IN ('open', 'resolved')),
    resolved_at   timestamptz,
    resolution    text
);
CREATE INDEX followups_open ON followups (due_at) WHERE status = 'open';
