"""Read-side SQL of the HTTP API and the gauges (no locks, no writes)."""

import json
from decimal import Decimal
from typing import Any

import asyncpg

from services.churn import repository

_CATEGORIES = ("SELECT category, net_spend, margin FROM category_spend WHERE customer_id = $1 "
               "ORDER BY net_spend DESC, category")
_SEGMENTS = """
SELECT coalesce(s.segment, 'none') AS segment, count(*) AS customers, sum(c.net_spend) AS net_spend,
       sum(s.ltv) AS ltv, count(*) FILTER (WHERE r.state = 'at_risk') AS at_risk,
       count(*) FILTER (WHERE r.state = 'lost') AS lost
FROM customer_state c LEFT JOIN scores s USING (customer_id) LEFT JOIN risk_states r USING (customer_id)
WHERE c.purchase_days > 0
GROUP BY 1 ORDER BY 1
"""
_AT_RISK = """
SELECT r.customer_id, r.state, r.episode, r.entered_at, r.reasons, s.ltv, s.rank_value, s.segment, s.value_score,
       c.last_purchase_at
FROM risk_states r JOIN scores s USING (customer_id) JOIN customer_state c USING (customer_id)
WHERE r.state <> 'active' AND ($1::numeric IS NULL OR s.ltv >= $1)
  AND ($2::numeric IS NULL OR s.rank_value < $2 OR (s.rank_value = $2 AND r.customer_id > $3::text))
ORDER BY s.rank_value DESC, r.customer_id
LIMIT $4
"""
_FITS = """
SELECT version, fitted_at, trigger, model, customers, frequency_params, frequency_log_likelihood,
       frequency_converged, spend_params, spend_customers, spend_log_likelihood, spend_converged, seconds, error
FROM model_fits ORDER BY version DESC LIMIT $1
"""
_RISK_COUNTS = "SELECT state, count(*) AS n FROM risk_states GROUP BY state"


async def customer(pool: asyncpg.Pool, customer_id: str) -> asyncpg.Record | None:
    return await repository.load_one(pool, customer_id)


async def categories(pool: asyncpg.Pool, customer_id: str) -> list[dict[str, Any]]:
    return [{"category": r["category"], "net_spend": format(r["net_spend"], "f"),
             "margin": format(r["margin"].quantize(Decimal("0.01")), "f")}
            for r in await pool.fetch(_CATEGORIES, customer_id)]


async def segments(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    return [{"segment": r["segment"], "customers": r["customers"], "net_spend": format(r["net_spend"] or 0, "f"),
             "ltv": format(r["ltv"], "f") if r["ltv"] is not None else None, "at_risk": r["at_risk"],
             "lost": r["lost"]} for r in await pool.fetch(_SEGMENTS)]


async def at_risk(pool: asyncpg.Pool, *, min_ltv: Decimal | None, limit: int,
                  after: tuple[Decimal, str] | None) -> list[asyncpg.Record]:
    value, customer_id = after if after else (None, None)
    return await pool.fetch(_AT_RISK, min_ltv, value, customer_id, limit)


async def fits(pool: asyncpg.Pool, *, limit: int) -> list[dict[str, Any]]:
    out = []
    for r in await pool.fetch(_FITS, limit):
        row = dict(r)
        for key in ("frequency_params", "spend_params"):
            if isinstance(row[key], str):
                row[key] = json.loads(row[key])
        out.append(row)
    return out


async def risk_counts(pool: asyncpg.Pool) -> dict[str, int]:
    return {r["state"]: r["n"] for r in await pool.fetch(_RISK_COUNTS)}
