"""The scheduled evaluation of the whole base: time passes without events, so every customer
is rescored against now and the time-driven transitions (entering at-risk, lost) applied.

In chunks of customers by id, each chunk one transaction that locks its customers (the
consumers wait for them), writes scores, risk states, alert rows and outbox rows together,
and advances the run's cursor. A run killed half-way is resumed from its cursor by the next
one (on any instance); a chunk done twice finds the transitions already made (hysteresis),
so no alert is ever emitted twice for one episode. One instance evaluates at a time (a
session advisory lock)."""

import logging
import time
from typing import Any

import asyncpg

from services.churn import base, domain, metrics, repository, scoring
from services.churn.alerts import AlertSink, risk_from_row
from services.churn.service import ChurnContext
from shared.db import transaction
from shared.events import utcnow
from shared.outbox import enqueue

log = logging.getLogger(__name__)

_OPEN_RUN = "SELECT run_id, cursor FROM evaluations WHERE finished_at IS NULL ORDER BY run_id LIMIT 1"
_NEW_RUN = "INSERT INTO evaluations (trigger, started_at) VALUES ($1, $2) RETURNING run_id, cursor"
_ADVANCE = ("UPDATE evaluations SET cursor = $2, customers = customers + $3, transitions = transitions + $4 "
            "WHERE run_id = $1")
_FINISH = "UPDATE evaluations SET finished_at = $2 WHERE run_id = $1"


async def run_evaluation(ctx: ChurnContext, *, trigger: str = "schedule") -> dict[str, Any] | None:
    """Evaluate the whole base (or finish the run left unfinished). None when another
    instance is evaluating."""
    return await base.with_lock(ctx.pool(), base.EVALUATION_LOCK, lambda conn: _evaluate(ctx, conn, trigger))


async def _evaluate(ctx: ChurnContext, conn: asyncpg.Connection, trigger: str) -> dict[str, Any]:
    started = time.perf_counter()
    await base.load_knowledge(ctx, conn)
    run = await conn.fetchrow(_OPEN_RUN)
    resumed = run is not None
    if run is None:
        run = await conn.fetchrow(_NEW_RUN, trigger, utcnow())
    run_id, cursor = run["run_id"], run["cursor"]
    customers = transitions = 0
    while True:
        async with transaction(conn):
            now = utcnow()
            rows = await repository.load_chunk(conn, after=cursor, limit=ctx.settings.evaluation_chunk_size)
            if not rows:
                await conn.execute(_FINISH, run_id, now)
                break
            sink = AlertSink(ctx.settings)
            changed = evaluate_chunk(ctx, rows, now=now, sink=sink, correlation_id=f"churn-evaluation-{run_id}")
            scores, risks = changed
            await repository.write_scores(conn, scores, now)
            await repository.write_risks(conn, risks, now)
            await sink.record(conn)
            await enqueue(conn, sink.messages)
            cursor = rows[-1]["customer_id"]
            await conn.execute(_ADVANCE, run_id, cursor, len(rows), len(risks))
        sink.count_after_commit()
        if sink.messages:
            ctx.wake_relay()
        customers += len(rows)
        transitions += len(risks)
    seconds = time.perf_counter() - started
    metrics.EVALUATION_SECONDS.observe(seconds)
    log.info("base evaluated", extra={"run_id": run_id, "customers": customers, "transitions": transitions,
                                       "resumed": resumed, "seconds": round(seconds, 3)})
    return {"run_id": run_id, "customers": customers, "transitions": transitions, "resumed": resumed,
            "seconds": seconds}


def evaluate_chunk(ctx: ChurnContext, rows: list[Any], *, now, sink: AlertSink, correlation_id: str,
                   ) -> tuple[list[scoring.Scores], list[tuple[str, domain.Risk]]]:
    """Rescore `rows` against now and apply the time-driven transitions (pure but for the sink)."""
    scores = scoring.score(rows, now=now, snapshot=ctx.knowledge.snapshot, fit=ctx.knowledge.fit,
                           policy=ctx.value_policy)
    risks = []
    for row, s in zip(rows, scores):
        customer = row["customer_id"]
        if s.segment_changed:
            sink.segment_changed(customer, s, now=now, correlation_id=correlation_id)
        transition = domain.evaluate_risk(risk_from_row(row), now=now, last_purchase_at=row["last_purchase_at"],
                                          rhythm_=ctx.rhythm(row), p_alive=s.p_alive, policy=ctx.risk_policy)
        if transition is not None:
            risks.append((customer, transition.risk))
            sink.alert(customer, transition, s, row, now=now, correlation_id=correlation_id)
    return scores, risks


async def refresh_base(ctx: ChurnContext, *, trigger: str, fit: bool = True) -> dict[str, Any] | None:
    """Snapshot (and fit), then an evaluation: what runs at start, on schedule and on demand.
    None when another instance is doing it."""

    async def work(conn: asyncpg.Connection) -> dict[str, Any]:
        out: dict[str, Any] = {"snapshot_version": await base.refresh_snapshot(ctx, conn)}
        if fit:
            out["fit"] = await base.fit_models(ctx, conn, trigger=trigger)
        return out

    result = await base.with_lock(ctx.pool(), base.FIT_LOCK, work)
    if result is None:
        return None
    result["evaluation"] = await run_evaluation(ctx, trigger=trigger)
    return result
