"""SQL of the churn service's reports, over the churn schema (0001_churn.sql's per-customer
state and scores, 0010_reports.sql's tables). Reads, plus the quadrant and departure writes
of the scheduled jobs; never commits (the caller owns the transaction)."""

from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal

import asyncpg

from services.churn.indicators import SurveyAnswer
from services.churn.matrix import CustomerValue

_PURCHASE_DAYS = """
SELECT customer_id, array_agg(day ORDER BY day) AS days FROM purchase_days WHERE day <= $1 GROUP BY customer_id
"""


async def purchase_days(conn: asyncpg.Connection, *, up_to: date) -> dict[str, list[date]]:
    return {r["customer_id"]: r["days"] for r in await conn.fetch(_PURCHASE_DAYS, up_to)}


_ANSWERS = """
SELECT answered_at, csat, nps FROM survey_answers WHERE answered_at >= $1 AND answered_at < $2
"""


async def survey_answers(conn: asyncpg.Connection, *, since: datetime, until: datetime) -> list[SurveyAnswer]:
    return [SurveyAnswer(r["answered_at"].date(), r["csat"], r["nps"]) for r in await conn.fetch(_ANSWERS, since, until)]


# Profitability: the LTV where a fit scored the customer, else the realised margin. Loyalty:
# P(alive) x purchase days per month of tenure; without a fit, activity (bought within the
# active window) stands in for P(alive).
_VALUES = """
SELECT c.customer_id,
       coalesce(s.ltv, c.margin)::numeric AS profitability,
       coalesce(s.p_alive, CASE WHEN $1::date - c.last_purchase_day < $2 THEN 1.0 ELSE 0.0 END)
         * c.purchase_days / greatest(($1::date - c.first_purchase_day + 1) / 30.4375, 1.0) AS loyalty,
       c.net_spend AS revenue, c.margin
FROM customer_state c LEFT JOIN scores s USING (customer_id)
WHERE c.first_purchase_day IS NOT NULL
"""


async def customer_values(conn: asyncpg.Connection, *, as_of: date, active_window_days: int) -> list[CustomerValue]:
    return [CustomerValue(r["customer_id"], Decimal(r["profitability"]), float(r["loyalty"]), r["revenue"],
                          Decimal(r["margin"])) for r in await conn.fetch(_VALUES, as_of, active_window_days)]


_REPLACE_QUADRANTS = """
INSERT INTO customer_quadrants AS q (customer_id, quadrant, profitability, loyalty, computed_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[], $4::float8[], $5::timestamptz[])
ON CONFLICT (customer_id) DO UPDATE SET quadrant = EXCLUDED.quadrant, profitability = EXCLUDED.profitability,
    loyalty = EXCLUDED.loyalty, computed_at = EXCLUDED.computed_at
"""


async def write_quadrants(conn: asyncpg.Connection, rows: Sequence[tuple[str, str, Decimal, float]],
                          now: datetime) -> None:
    rows = sorted(rows)
    await conn.execute(_REPLACE_QUADRANTS, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                       [r[3] for r in rows], [now] * len(rows))
    await conn.execute("DELETE FROM customer_quadrants WHERE computed_at < $1", now)


async def quadrant_of(conn: asyncpg.Connection | asyncpg.Pool, customer_id: str) -> str | None:
    """The customer's quadrant as of the latest refresh (for the profile and the alerts)."""
    return await conn.fetchval("SELECT quadrant FROM customer_quadrants WHERE customer_id = $1", customer_id)


_BY_CATEGORY = """
SELECT category AS key, count(*) AS customers, sum(net_spend) AS revenue, sum(margin) AS margin
FROM category_spend GROUP BY category ORDER BY sum(margin) DESC, category
"""
_BY_SEGMENT = """
SELECT coalesce(s.segment, 'unscored') AS key, count(*) AS customers, sum(c.net_spend) AS revenue,
       sum(c.margin) AS margin
FROM customer_state c LEFT JOIN scores s USING (customer_id) WHERE c.first_purchase_day IS NOT NULL
GROUP BY 1 ORDER BY sum(c.margin) DESC, 1
"""
_BY_QUADRANT = """
SELECT coalesce(q.quadrant, 'unassigned') AS key, count(*) AS customers, sum(c.net_spend) AS revenue,
       sum(c.margin) AS margin
FROM customer_state c LEFT JOIN customer_quadrants q USING (customer_id) WHERE c.first_purchase_day IS NOT NULL
GROUP BY 1 ORDER BY sum(c.margin) DESC, 1
"""
PROFITABILITY = {"category": _BY_CATEGORY, "segment": _BY_SEGMENT, "quadrant": _BY_QUADRANT}


async def profitability(conn: asyncpg.Connection, *, by: str) -> list[asyncpg.Record]:
    return await conn.fetch(PROFITABILITY[by])


async def rfm_grid(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch("""
        SELECT recency_score, frequency_score, count(*) AS customers FROM scores
        WHERE recency_score IS NOT NULL AND frequency_score IS NOT NULL GROUP BY 1, 2""")


_AT_RISK = """
SELECT r.customer_id, r.entered_at, r.reasons, s.segment, s.rank_value, s.ltv, s.p_alive, q.quadrant,
       c.net_spend, c.last_purchase_day
FROM risk_states r LEFT JOIN scores s USING (customer_id) LEFT JOIN customer_quadrants q USING (customer_id)
     LEFT JOIN customer_state c USING (customer_id)
WHERE r.state = 'at_risk'
ORDER BY coalesce(s.rank_value, 0) DESC, r.customer_id LIMIT $1 OFFSET $2
"""


async def at_risk(conn: asyncpg.Connection, *, limit: int, offset: int) -> list[asyncpg.Record]:
    return await conn.fetch(_AT_RISK, limit, offset)


async def risk_counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {r["state"]: r["n"] for r in await conn.fetch("SELECT state, count(*) AS n FROM risk_states GROUP BY 1")}


# The facts behind the departure factors, for lost customers not recorded yet or for every
# retained (active, bought within the active window) customer.
_FACTS = """
SELECT c.customer_id, r.episode, r.entered_at, c.last_nps, c.last_csat, c.complaints_open, c.gross_spend,
       c.returned_spend, coalesce(c.points_available, 0) + coalesce(c.points_pending, 0) AS points,
       g.tier_lost_at, coalesce(g.failed_redemptions, 0) AS failed_redemptions, g.last_contact_at, q.quadrant
FROM customer_state c LEFT JOIN risk_states r USING (customer_id)
     LEFT JOIN relationship_signals g USING (customer_id) LEFT JOIN customer_quadrants q USING (customer_id)
"""
_UNRECORDED_LOST = _FACTS + """
WHERE r.state = 'lost' AND NOT EXISTS (SELECT 1 FROM departures d WHERE d.customer_id = r.customer_id
                                       AND d.episode = r.episode)
ORDER BY c.customer_id
"""
_RETAINED = _FACTS + """
WHERE coalesce(r.state, 'active') <> 'lost' AND $1::date - c.last_purchase_day < $2
"""


async def unrecorded_departures(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(_UNRECORDED_LOST)


async def retained_facts(conn: asyncpg.Connection, *, as_of: date, active_window_days: int) -> list[asyncpg.Record]:
    return await conn.fetch(_RETAINED, as_of, active_window_days)


async def write_departures(conn: asyncpg.Connection, rows: Sequence[tuple], now: datetime) -> None:
    """rows: (customer_id, episode, lost_at, factors, facts json)."""
    await conn.executemany("""
        INSERT INTO departures (customer_id, episode, lost_at, factors, facts, recorded_at)
        VALUES ($1, $2, $3, $4, $5::jsonb, $6) ON CONFLICT DO NOTHING""", [(*r, now) for r in rows])


async def departure_factors(conn: asyncpg.Connection, *, since: datetime | None) -> list[list[str]]:
    rows = await conn.fetch("SELECT factors FROM departures WHERE $1::timestamptz IS NULL OR lost_at >= $1", since)
    return [r["factors"] for r in rows]
