-- Reports of the churn service (issue 13): what the indicators, the loyalty matrix and the
-- study of departing customers need beyond the per-customer state of 0001_churn.sql.

-- Every survey answer (customer_state keeps only the last): the monthly satisfaction index.
CREATE TABLE survey_answers (
    survey_id   uuid        PRIMARY KEY,
    customer_id text        NOT NULL,
    answered_at timestamptz NOT NULL,
    nps         smallint,
    csat        smallint
);
CREATE INDEX survey_answers_answered_at ON survey_answers (answered_at);

-- Signals that come before a departure and that customer_state does not keep.
CREATE TABLE relationship_signals (
    customer_id        text        PRIMARY KEY,
    last_contact_at    timestamptz,          -- the latest TouchpointSent from engagement
    tier_lost_at       timestamptz,          -- the latest TierChanged to a lower tier
    failed_redemptions integer     NOT NULL DEFAULT 0   -- RedemptionFailed + RedemptionCancelled
);

-- Each customer's loyalty-matrix quadrant as of the latest refresh (profile and alerts read it).
CREATE TABLE customer_quadrants (
    customer_id   text             PRIMARY KEY,
    quadrant      text             NOT NULL CHECK (quadrant IN ('true_friend', 'butterfly', 'barnacle', 'stranger')),
    profitability numeric(16,4)    NOT NULL,
    loyalty       double precision NOT NULL,
    computed_at   timestamptz      NOT NULL
);
CREATE INDEX customer_quadrants_quadrant ON customer_quadrants (quadrant, profitability DESC);

-- What preceded each loss (one row per customer and lost episode), recorded once.
CREATE TABLE departures (
    customer_id text        NOT NULL,
    episode     integer     NOT NULL,
    lost_at     timestamptz NOT NULL,
    factors     text[]      NOT NULL,
    facts       jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL,
    PRIMARY KEY (customer_id, episode)
);
