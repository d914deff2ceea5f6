"""SQL of the churn service (asyncpg). Set-based: every statement takes the whole batch as
arrays (unnest), so a batch costs the same few round trips whatever its size. Never commits:
the use case owns the transaction."""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import asyncpg

# ---- facts, written by the consumers -----------------------------------------------------

_ADD_PURCHASES = """
INSERT INTO customer_state AS c (customer_id, currency, first_purchase_at, last_purchase_at, purchases, returns,
                                 gross_spend, returned_spend, margin, history_purchases, last_event_at, updated_at)
SELECT u.*, $12::timestamptz FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::int[],
                                   $6::int[], $7::numeric[], $8::numeric[], $9::numeric[], $10::int[],
                                   $11::timestamptz[]) AS u
ORDER BY 1
ON CONFLICT (customer_id) DO UPDATE SET
    currency = coalesce(EXCLUDED.currency, c.currency),
    first_purchase_at = LEAST(c.first_purchase_at, EXCLUDED.first_purchase_at),
    last_purchase_at = GREATEST(c.last_purchase_at, EXCLUDED.last_purchase_at),
    purchases = c.purchases + EXCLUDED.purchases,
    returns = c.returns + EXCLUDED.returns,
    gross_spend = c.gross_spend + EXCLUDED.gross_spend,
    returned_spend = c.returned_spend + EXCLUDED.returned_spend,
    margin = c.margin + EXCLUDED.margin,
    history_purchases = c.history_purchases + EXCLUDED.history_purchases,
    last_event_at = GREATEST(c.last_event_at, EXCLUDED.last_event_at),
    updated_at = EXCLUDED.updated_at
"""

_ADD_PURCHASE_DAYS = """
INSERT INTO purchase_days AS d (customer_id, day, purchases, spend)
SELECT * FROM unnest($1::text[], $2::date[], $3::int[], $4::numeric[])
ON CONFLICT (customer_id, day) DO UPDATE SET purchases = d.purchases + EXCLUDED.purchases,
                                             spend = d.spend + EXCLUDED.spend
"""

_ADD_CATEGORY_SPEND = """
INSERT INTO category_spend AS s (customer_id, category, net_spend, margin)
SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[], $4::numeric[])
ON CONFLICT (customer_id, category) DO UPDATE SET net_spend = s.net_spend + EXCLUDED.net_spend,
                                                  margin = s.margin + EXCLUDED.margin
"""

# The rhythm from the purchase days themselves (imported history may arrive in any order).
_REFRESH_RHYTHM = """
WITH d AS (
    SELECT customer_id, day, day - lag(day) OVER (PARTITION BY customer_id ORDER BY day) AS gap
    FROM purchase_days WHERE customer_id = ANY($1::text[])
), agg AS (
    SELECT customer_id, count(*) AS days, min(day) AS first_day, max(day) AS last_day, count(gap) AS intervals,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY gap) AS median_gap
    FROM d GROUP BY customer_id
)
UPDATE customer_state c SET purchase_days = agg.days, first_purchase_day = agg.first_day,
       last_purchase_day = agg.last_day, intervals = agg.intervals, median_interval_days = agg.median_gap
FROM agg WHERE c.customer_id = agg.customer_id
"""


@dataclass(frozen=True, slots=True)
class CustomerDelta:
    customer_id: str
    currency: str | None
    first_purchase_at: datetime | None
    last_purchase_at: datetime | None
    purchases: int
    returns: int
    gross_spend: Decimal
    returned_spend: Decimal
    margin: Decimal
    history_purchases: int
    last_event_at: datetime


async def add_purchases(conn: asyncpg.Connection, *, deltas: Sequence[CustomerDelta],
                        days: Sequence[tuple[str, date, int, Decimal]],
                        categories: Sequence[tuple[str, str, Decimal, Decimal]], now: datetime) -> None:
    deltas = sorted(deltas, key=lambda d: d.customer_id)  # row locks in one order: no deadlock
    await conn.execute(_ADD_PURCHASES, [d.customer_id for d in deltas], [d.currency for d in deltas],
                       [d.first_purchase_at for d in deltas], [d.last_purchase_at for d in deltas],
                       [d.purchases for d in deltas], [d.returns for d in deltas], [d.gross_spend for d in deltas],
                       [d.returned_spend for d in deltas], [d.margin for d in deltas],
                       [d.history_purchases for d in deltas], [d.last_event_at for d in deltas], now)
    if days:
        days = sorted(days)
        await conn.execute(_ADD_PURCHASE_DAYS, *(list(col) for col in zip(*days)))
    if categories:
        categories = sorted(categories)
        await conn.execute(_ADD_CATEGORY_SPEND, *(list(col) for col in zip(*categories)))
    if days:
        await conn.execute(_REFRESH_RHYTHM, sorted({d[0] for d in days}))


_SET_POINTS = """
INSERT INTO customer_state AS c (customer_id, points_available, points_pending, tier, points_as_of, last_event_at,
                                 updated_at)
SELECT u.*, u.as_of, $6::timestamptz
FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::timestamptz[]) AS u(id, available, pending, tier, as_of)
ORDER BY 1
ON CONFLICT (customer_id) DO UPDATE SET
    points_available = CASE WHEN c.points_as_of > EXCLUDED.points_as_of THEN c.points_available
                            ELSE EXCLUDED.points_available END,
    points_pending = CASE WHEN c.points_as_of > EXCLUDED.points_as_of THEN c.points_pending
                          ELSE EXCLUDED.points_pending END,
    tier = CASE WHEN c.points_as_of > EXCLUDED.points_as_of THEN c.tier ELSE EXCLUDED.tier END,
    points_as_of = GREATEST(c.points_as_of, EXCLUDED.points_as_of),
    last_event_at = GREATEST(c.last_event_at, EXCLUDED.last_event_at),
    updated_at = EXCLUDED.updated_at
"""


async def set_points(conn: asyncpg.Connection, rows: Sequence[tuple[str, int, int, str, datetime]],
                     now: datetime) -> None:
    """(customer, available, pending, tier, as_of): the latest balance wins (by occurred_at)."""
    rows = sorted(rows)
    await conn.execute(_SET_POINTS, *(list(col) for col in zip(*rows)), now)


_ADD_COUNTERS = """
INSERT INTO customer_state AS c (customer_id, redemptions, complaints_open, last_nps, last_csat, last_survey_at,
                                 last_event_at, updated_at)
SELECT u.*, $8::timestamptz FROM unnest($1::text[], $2::int[], $3::int[], $4::smallint[], $5::smallint[],
                                        $6::timestamptz[], $7::timestamptz[]) AS u
ORDER BY 1
ON CONFLICT (customer_id) DO UPDATE SET
    redemptions = c.redemptions + EXCLUDED.redemptions,
    complaints_open = GREATEST(c.complaints_open + EXCLUDED.complaints_open, 0),
    last_nps = CASE WHEN EXCLUDED.last_survey_at >= c.last_survey_at OR c.last_survey_at IS NULL
                    THEN coalesce(EXCLUDED.last_nps, c.last_nps) ELSE c.last_nps END,
    last_csat = CASE WHEN EXCLUDED.last_survey_at >= c.last_survey_at OR c.last_survey_at IS NULL
                     THEN coalesce(EXCLUDED.last_csat, c.last_csat) ELSE c.last_csat END,
    last_survey_at = GREATEST(c.last_survey_at, EXCLUDED.last_survey_at),
    last_event_at = GREATEST(c.last_event_at, EXCLUDED.last_event_at),
    updated_at = EXCLUDED.updated_at
"""


async def add_counters(conn: asyncpg.Connection,
                       rows: Sequence[tuple[str, int, int, int | None, int | None, datetime | None, datetime]],
                       now: datetime) -> None:
    """(customer, +redemptions, +complaints open, nps, csat, survey time, event time)."""
    rows = sorted(rows, key=lambda r: r[0])
    await conn.execute(_ADD_COUNTERS, *(list(col) for col in zip(*rows)), now)


# ---- what scoring reads and writes -------------------------------------------------------

_CUSTOMER_COLUMNS = """
c.customer_id, c.currency, c.first_purchase_at, c.last_purchase_at, c.first_purchase_day, c.last_purchase_day,
c.purchase_days, c.purchases, c.returns, c.gross_spend, c.returned_spend, c.net_spend, c.margin, c.intervals,
c.median_interval_days, c.points_available, c.points_pending, c.tier, c.redemptions, c.last_nps, c.last_csat,
c.complaints_open, c.history_purchases,
s.recency_days, s.recency_score, s.frequency_score, s.monetary_score, s.segment, s.segment_changes, s.p_alive,
s.expected_purchases, s.expected_spend, s.ltv, s.value_score, s.rank_value, s.fit_version, s.snapshot_version,
s.scored_at,
r.state, r.episode, r.entered_at, r.entry_last_purchase_at, r.left_at, r.reasons,
(SELECT q.quadrant FROM customer_quadrants q WHERE q.customer_id = c.customer_id) AS quadrant
"""

_LOAD_FOR_UPDATE = f"""
SELECT {_CUSTOMER_COLUMNS}
FROM customer_state c LEFT JOIN scores s USING (customer_id) LEFT JOIN risk_states r USING (customer_id)
WHERE c.customer_id = ANY($1::text[]) ORDER BY c.customer_id FOR UPDATE OF c
"""

_LOAD_CHUNK = f"""
SELECT {_CUSTOMER_COLUMNS}
FROM customer_state c LEFT JOIN scores s USING (customer_id) LEFT JOIN risk_states r USING (customer_id)
WHERE c.customer_id > $1 ORDER BY c.customer_id LIMIT $2 FOR UPDATE OF c
"""

_LOAD_ONE = f"""
SELECT {_CUSTOMER_COLUMNS}
FROM customer_state c LEFT JOIN scores s USING (customer_id) LEFT JOIN risk_states r USING (customer_id)
WHERE c.customer_id = $1
"""


async def load_for_update(conn: asyncpg.Connection, customer_ids: Sequence[str]) -> list[asyncpg.Record]:
    return await conn.fetch(_LOAD_FOR_UPDATE, sorted(set(customer_ids)))


async def load_chunk(conn: asyncpg.Connection, *, after: str, limit: int) -> list[asyncpg.Record]:
    """The next `limit` customers after `after` (by id), locked: the consumers wait for them."""
    return await conn.fetch(_LOAD_CHUNK, after, limit)


async def load_one(conn: asyncpg.Connection | asyncpg.Pool, customer_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(_LOAD_ONE, customer_id)


_WRITE_SCORES = """
INSERT INTO scores AS s (customer_id, recency_days, recency_score, frequency_score, monetary_score, segment,
                         segment_changes, p_alive, expected_purchases, expected_spend, ltv, value_score, rank_value,
                         fit_version, snapshot_version, scored_at)
SELECT u.*, $16::timestamptz FROM unnest($1::text[], $2::int[], $3::smallint[], $4::smallint[], $5::smallint[],
    $6::text[], $7::int[], $8::float8[], $9::float8[], $10::numeric[], $11::numeric[], $12::smallint[],
    $13::numeric[], $14::int[], $15::int[]) AS u
ON CONFLICT (customer_id) DO UPDATE SET
    recency_days = EXCLUDED.recency_days, recency_score = EXCLUDED.recency_score,
    frequency_score = EXCLUDED.frequency_score, monetary_score = EXCLUDED.monetary_score,
    segment = EXCLUDED.segment, segment_changes = EXCLUDED.segment_changes, p_alive = EXCLUDED.p_alive,
    expected_purchases = EXCLUDED.expected_purchases, expected_spend = EXCLUDED.expected_spend,
    ltv = EXCLUDED.ltv, value_score = EXCLUDED.value_score, rank_value = EXCLUDED.rank_value,
    fit_version = EXCLUDED.fit_version, snapshot_version = EXCLUDED.snapshot_version, scored_at = EXCLUDED.scored_at
"""

SCORE_FIELDS = ("customer_id", "recency_days", "recency_score", "frequency_score", "monetary_score", "segment",
                "segment_changes", "p_alive", "expected_purchases", "expected_spend", "ltv", "value_score",
                "rank_value", "fit_version", "snapshot_version")


async def write_scores(conn: asyncpg.Connection, rows: Sequence[Any], now: datetime) -> None:
    """Rows: objects with SCORE_FIELDS (services/churn/scoring.py Scores)."""
    if rows:
        await conn.execute(_WRITE_SCORES, *([getattr(r, f) for r in rows] for f in SCORE_FIELDS), now)


_WRITE_RISK = """
INSERT INTO risk_states AS r (customer_id, state, episode, entered_at, entry_last_purchase_at, left_at, reasons,
                              updated_at)
SELECT u.*, $8::timestamptz FROM unnest($1::text[], $2::text[], $3::int[], $4::timestamptz[], $5::timestamptz[],
                                        $6::timestamptz[], $7::jsonb[]) AS u
ON CONFLICT (customer_id) DO UPDATE SET
    state = EXCLUDED.state, episode = EXCLUDED.episode, entered_at = EXCLUDED.entered_at,
    entry_last_purchase_at = EXCLUDED.entry_last_purchase_at, left_at = EXCLUDED.left_at,
    reasons = EXCLUDED.reasons, updated_at = EXCLUDED.updated_at
"""


async def write_risks(conn: asyncpg.Connection, rows: Sequence[tuple[str, Any]], now: datetime) -> None:
    """(customer, domain.Risk)."""
    if not rows:
        return
    await conn.execute(_WRITE_RISK, [c for c, _ in rows], [r.state for _, r in rows], [r.episode for _, r in rows],
                       [r.entered_at for _, r in rows], [r.entry_last_purchase_at for _, r in rows],
                       [r.left_at for _, r in rows], [reasons_json(r.reasons) for _, r in rows], now)


def reasons_json(reasons: Sequence[Any]) -> str:
    return json.dumps([{"signal": r.signal, "detail": r.detail, "value": r.value, "threshold": r.threshold}
                       for r in reasons])


_WRITE_ALERTS = """
INSERT INTO alerts (event_id, customer_id, episode, kind, priority, ltv, segment, reasons, created_at)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::numeric[], $7::text[],
                     $8::jsonb[], $9::timestamptz[])
ON CONFLICT (event_id) DO NOTHING
"""


async def write_alerts(conn: asyncpg.Connection, rows: Sequence[tuple]) -> None:
    """(event_id, customer, episode, kind, priority, ltv, segment, reasons json, created_at)."""
    if rows:
        await conn.execute(_WRITE_ALERTS, *(list(col) for col in zip(*rows)))
