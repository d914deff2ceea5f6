-- The churn service's own tables (schema "churn"). Per-customer state in clear tables, so
-- that the indicators and the loyalty matrix (issue 13) can read them: see README.md.

-- What the events told us about each customer (facts; no model in here).
CREATE TABLE customer_state (
    customer_id          text          PRIMARY KEY,
    currency             text,
    first_purchase_at    timestamptz,
    last_purchase_at     timestamptz,
    first_purchase_day   date,
    last_purchase_day    date,
    purchase_days        integer       NOT NULL DEFAULT 0,   -- distinct days with a sale
    purchases            integer       NOT NULL DEFAULT 0,   -- sales (and claimed sales)
    returns              integer       NOT NULL DEFAULT 0,
    gross_spend          numeric(16,2) NOT NULL DEFAULT 0,
    returned_spend       numeric(16,2) NOT NULL DEFAULT 0,
    net_spend            numeric(16,2) GENERATED ALWAYS AS (gross_spend - returned_spend) STORED,
    -- net_spend x each line's category margin rate (settings), returns subtracted
    margin               numeric(16,4) NOT NULL DEFAULT 0,
    intervals            integer       NOT NULL DEFAULT 0,   -- purchase_days - 1
    median_interval_days double precision,                   -- the customer's own rhythm
    points_available     integer,
    points_pending       integer,
    tier                 text,
    points_as_of         timestamptz,
    redemptions          integer       NOT NULL DEFAULT 0,   -- fulfilled, minus cancelled
    last_nps             smallint,
    last_csat            smallint,
    last_survey_at       timestamptz,
    complaints_open      integer       NOT NULL DEFAULT 0,
    history_purchases    integer       NOT NULL DEFAULT 0,   -- of `purchases`, imported ones
    last_event_at        timestamptz,
    updated_at           timestamptz   NOT NULL DEFAULT now()
);

-- One row per customer and day with at least one sale: the unit of frequency.
CREATE TABLE purchase_days (
    customer_id text          NOT NULL,
    day         date          NOT NULL,
    purchases   integer       NOT NULL,
    spend       numeric(16,2) NOT NULL,   -- gross, that day's sales
    PRIMARY KEY (customer_id, day)
);

-- Net spend and margin per customer and product category (returns subtract).
CREATE TABLE category_spend (
    customer_id text          NOT NULL,
    category    text          NOT NULL,
    net_spend   numeric(16,2) NOT NULL,
    margin      numeric(16,4) NOT NULL,
    PRIMARY KEY (customer_id, category)
);

-- Quintile boundaries of the base and its typical rhythm, refreshed on a schedule and on demand.
CREATE TABLE rfm_snapshots (
    version                   serial       PRIMARY KEY,
    computed_at               timestamptz  NOT NULL,
    customers                 integer      NOT NULL,
    recency_edges             double precision[] NOT NULL,
    frequency_edges           double precision[] NOT NULL,
    monetary_edges            double precision[] NOT NULL,
    ltv_edges                 double precision[],
    base_median_interval_days double precision
);

-- Every model fit, kept: parameters and quality. Scores name the fit they came from.
CREATE TABLE model_fits (
    version                  serial           PRIMARY KEY,
    fitted_at                timestamptz      NOT NULL,
    trigger                  text             NOT NULL,
    model                    text             NOT NULL,
    customers                integer          NOT NULL,
    frequency_params         jsonb,
    frequency_log_likelihood double precision,
    frequency_converged      boolean,
    spend_params             jsonb,
    spend_customers          integer,
    spend_log_likelihood     double precision,
    spend_converged          boolean,
    seconds                  double precision NOT NULL,
    error                    text
);

-- The scores of each customer: RFM against the latest snapshot, the models against the latest fit.
CREATE TABLE scores (
    customer_id        text             PRIMARY KEY,
    recency_days       integer,          -- RFM recency: days since the last purchase day
    recency_score      smallint,
    frequency_score    smallint,
    monetary_score     smallint,
    segment            text,
    segment_changes    integer          NOT NULL DEFAULT 0,
    p_alive            double precision,
    expected_purchases double precision, -- in the next CHURN_EXPECTED_PURCHASES_DAYS days
    expected_spend     numeric(16,2),    -- per purchase (Gamma-Gamma)
    ltv                numeric(16,2),
    value_score        smallint,
    rank_value         numeric(16,2)    NOT NULL DEFAULT 0,  -- ltv, else the historical margin
    fit_version        integer,
    snapshot_version   integer,
    scored_at          timestamptz      NOT NULL
);
CREATE INDEX scores_segment ON scores (segment);

-- Risk state and its episodes (hysteresis: one alert per state entered).
CREATE TABLE risk_states (
    customer_id            text        PRIMARY KEY,
    state                  text        NOT NULL CHECK (state IN ('active', 'at_risk', 'lost')),
    episode                integer     NOT NULL DEFAULT 0,
    entered_at             timestamptz,
    entry_last_purchase_at timestamptz,
    left_at                timestamptz,
    reasons                jsonb       NOT NULL DEFAULT '[]',
    updated_at             timestamptz NOT NULL
);
CREATE INDEX risk_states_state ON risk_states (state) WHERE state <> 'active';

-- Every alert emitted (also written to the outbox in the same transaction).
CREATE TABLE alerts (
    event_id    uuid          PRIMARY KEY,  -- derived from (customer, episode, kind)
    customer_id text          NOT NULL,
    episode     integer       NOT NULL,
    kind        text          NOT NULL,
    priority    text          NOT NULL,
    ltv         numeric(16,2),
    segment     text,
    reasons     jsonb         NOT NULL,
    created_at  timestamptz   NOT NULL
);
CREATE INDEX alerts_customer ON alerts (customer_id, created_at);

-- Runs of the whole-base evaluation; an unfinished one is resumed from its cursor.
CREATE TABLE evaluations (
    run_id      bigserial   PRIMARY KEY,
    trigger     text        NOT NULL,
    started_at  timestamptz NOT NULL,
    cursor      text        NOT NULL DEFAULT '',   -- the last customer_id done
    customers   integer     NOT NULL DEFAULT 0,
    transitions integer     NOT NULL DEFAULT 0,
    finished_at timestamptz
);
