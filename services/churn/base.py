"""Base-wide knowledge: the RFM snapshot (quintile boundaries and the typical rhythm) and the
model fits, each stored as a version; and the instance's cache of the latest of both."""

import asyncio
import dataclasses
import json
import logging
import time
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np

from services.churn import metrics, models, scoring
from services.churn.service import ChurnContext
from shared.events import utcnow

log = logging.getLogger(__name__)

# Session-level advisory locks: one instance does base-wide work at a time; a crashed
# instance's lock goes with its connection.
FIT_LOCK = 7_305_001
EVALUATION_LOCK = 7_305_002

_BASE_VALUES = """
SELECT ($1::date - last_purchase_day) AS recency_days, purchase_days, net_spend::float8 AS net_spend
FROM customer_state WHERE purchase_days > 0
"""
_BASE_RHYTHM = """
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY median_interval_days) FILTER (WHERE intervals >= $1) AS own,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY median_interval_days) FILTER (WHERE intervals >= 1) AS any
FROM customer_state
"""
_INSERT_SNAPSHOT = """
INSERT INTO rfm_snapshots (computed_at, customers, recency_edges, frequency_edges, monetary_edges, ltv_edges,
                           base_median_interval_days)
VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING version
"""
_LATEST_SNAPSHOT = "SELECT * FROM rfm_snapshots ORDER BY version DESC LIMIT 1"
_LATEST_FIT = "SELECT * FROM model_fits WHERE frequency_params IS NOT NULL ORDER BY version DESC LIMIT 1"
_MODEL_INPUTS = """
SELECT customer_id, purchase_days, first_purchase_day, last_purchase_day, net_spend, margin, redemptions, purchases
FROM customer_state WHERE purchase_days > 0
ORDER BY customer_id  -- the same base in the same order gives the same fit, to the last bit
"""
_INSERT_FIT = """
INSERT INTO model_fits (fitted_at, trigger, model, customers, frequency_params, frequency_log_likelihood,
                        frequency_converged, spend_params, spend_customers, spend_log_likelihood, spend_converged,
                        seconds, error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING version
"""


def _edges(values: list[float]) -> list[float]:
    return [float(e) for e in models.quintile_edges(np.asarray(values, dtype=float))]


async def refresh_snapshot(ctx: ChurnContext, conn: asyncpg.Connection, *, now: datetime | None = None) -> int | None:
    """Quintile boundaries of recency (days since the last purchase day), frequency (purchase
    days) and monetary value (net spend) over every customer who bought, the LTV boundaries
    over those with an LTV, and the base's median interval. None for an empty base."""
    now = now or utcnow()
    rows = await conn.fetch(_BASE_VALUES, now.date())
    if not rows:
        return None
    ltvs = [float(v) for v in await conn.fetchval("SELECT coalesce(array_agg(ltv::float8), '{}') FROM scores "
                                                   "WHERE ltv IS NOT NULL")]
    rhythm = await conn.fetchrow(_BASE_RHYTHM, ctx.settings.min_intervals)
    base_median = rhythm["own"] if rhythm["own"] is not None else rhythm["any"]
    version = await conn.fetchval(
        _INSERT_SNAPSHOT, now, len(rows), _edges([r["recency_days"] for r in rows]),
        _edges([r["purchase_days"] for r in rows]), _edges([r["net_spend"] for r in rows]),
        _edges(ltvs) if len(ltvs) >= 5 else None, base_median)
    await load_knowledge(ctx, conn)
    log.info("RFM snapshot refreshed", extra={"version": version, "customers": len(rows)})
    return version


def _params(fit: Any) -> str:
    return json.dumps({k: v for k, v in dataclasses.asdict(fit).items()}, default=float)


async def fit_models(ctx: ChurnContext, conn: asyncpg.Connection, *, trigger: str) -> dict[str, Any]:
    """Fit the frequency model (buy-till-you-die) and Gamma-Gamma on the whole base, in a
    worker thread (the event loop keeps consuming), and store the fit as a new version, also
    a fit that failed (with its error) or did not converge."""
    now = utcnow()
    rows = await conn.fetch(_MODEL_INPUTS)
    started = time.perf_counter()
    model = ctx.settings.frequency_model
    freq = spend = None
    error = None
    spend_customers = 0
    if rows:
        x, t_x, T, mean_value = scoring.model_inputs(rows, now.date())
        try:
            freq = await asyncio.to_thread(models.fit_frequency_model, x, t_x, T, model=model)
            repeat = (x > 0) & (mean_value > 0)
            spend_customers = int(repeat.sum())
            spend = await asyncio.to_thread(models.fit_gamma_gamma, x[repeat], mean_value[repeat])
        except models.NotEnoughData as exc:
            error = f"not enough data: {exc}"
    else:
        error = "not enough data: no customer has purchased"
    seconds = time.perf_counter() - started
    version = await conn.fetchval(
        _INSERT_FIT, now, trigger, model, len(rows), _params(freq) if freq else None,
        getattr(freq, "log_likelihood", None), getattr(freq, "converged", None), _params(spend) if spend else None,
        spend_customers, getattr(spend, "log_likelihood", None), getattr(spend, "converged", None), seconds, error)
    metrics.FIT_SECONDS.observe(seconds)
    if freq is not None:
        metrics.FIT_LOG_LIKELIHOOD.labels("frequency").set(freq.log_likelihood)
    if spend is not None:
        metrics.FIT_LOG_LIKELIHOOD.labels("spend").set(spend.log_likelihood)
    await load_knowledge(ctx, conn)
    log.info("models fitted", extra={"version": version, "customers": len(rows), "seconds": round(seconds, 3),
                                      "error": error})
    return {"version": version, "customers": len(rows), "seconds": seconds, "error": error,
            "converged": getattr(freq, "converged", None)}


def _fit_from_json(cls: type, params: Any) -> Any:
    values = json.loads(params) if isinstance(params, str) else params
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


async def load_knowledge(ctx: ChurnContext, conn: asyncpg.Connection | asyncpg.Pool) -> None:
    """The latest snapshot and fit, into this instance's cache."""
    snap = await conn.fetchrow(_LATEST_SNAPSHOT)
    if snap is not None and (ctx.knowledge.snapshot is None or ctx.knowledge.snapshot.version != snap["version"]):
        ctx.knowledge.snapshot = scoring.Snapshot(
            snap["version"], snap["computed_at"], snap["customers"], list(snap["recency_edges"]),
            list(snap["frequency_edges"]), list(snap["monetary_edges"]),
            list(snap["ltv_edges"]) if snap["ltv_edges"] else None, snap["base_median_interval_days"])
    fit = await conn.fetchrow(_LATEST_FIT)
    if fit is not None and (ctx.knowledge.fit is None or ctx.knowledge.fit.version != fit["version"]):
        ctx.knowledge.fit = scoring.Fit(
            fit["version"], fit["fitted_at"], _fit_from_json(models.FrequencyFit, fit["frequency_params"]),
            _fit_from_json(models.SpendFit, fit["spend_params"]) if fit["spend_params"] else None)


async def growth_refresh(ctx: ChurnContext, conn: asyncpg.Connection | asyncpg.Pool) -> str | None:
    """What the base's growth calls for (an import, the first days), so that an imported base
    has sensible segments, fits and alerts straight after the import rather than at the next
    scheduled time. "rescore" while it grows fast (the customers who bought grew by a fifth,
    plus 10, since the snapshot): a snapshot, a fit and new scores, but no risk transitions on
    a half-imported history; then "evaluate" once the growth stops (no new customer since the
    last look, not even for a known customer): the same with the transitions. None otherwise."""
    row = await conn.fetchrow("SELECT count(*) FILTER (WHERE purchase_days > 0) AS buyers, "
                              "coalesce(sum(purchases + returns), 0) AS events FROM customer_state")
    buyers = row["buyers"]
    k = ctx.knowledge
    known = k.snapshot.customers if k.snapshot is not None else 0
    # quiet: not one purchase applied since the last look
    quiet, k.last_buyers = (buyers, row["events"]) == k.last_buyers, (buyers, row["events"])
    if buyers > 0 and buyers >= known * 1.2 + 10:
        k.growth_pending = True
        return "rescore"
    if k.growth_pending and quiet:
        k.growth_pending = False
        return "evaluate"
    return None


async def with_lock(pool: asyncpg.Pool, key: int, work) -> Any:
    """Run `work(conn)` holding the session advisory lock `key`, or return None at once when
    another instance holds it."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            return None
        try:
            return await work(conn)
        finally:
            try:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)
            except BaseException:
                # The pool does not reset sessions (shared/db.py): a connection that might
                # still hold the lock never goes back to it; the lock ends with the session.
                conn.terminate()
                raise
