"""Composition root of the churn service: the runtime with its four subscriptions, the
schedules (evaluation, fits, RFM boundaries, cache, gauges) and the HTTP app. Nothing
connects before the app's lifespan starts."""

import logging
from pathlib import Path
from typing import Union

from fastapi import FastAPI

from services.churn import base, evaluation, metrics, queries
from services.churn.api import create_routers, install_error_handlers
from services.churn.handlers import subscriptions
from services.churn.reports_wiring import install_reports
from services.churn.service import ChurnContext
from services.churn.settings import ChurnSettings
from shared.events import DeadLetter
from shared.events.churn import CHURN_EVENT_TYPES
from shared.http import create_service_app
from shared.runtime import ServiceRuntime
from shared.topics import (
    CHURN_ALERTS,
    CHURN_DLQ,
    ENGAGEMENT_EVENTS,
    POINTS_EVENTS,
    PURCHASES_RECORDED,
    REWARDS_EVENTS,
)

log = logging.getLogger(__name__)

SERVICE = "churn"
DESCRIPTION = (
    "Customer knowledge and churn alerts: consumes purchases.recorded, points.events, rewards.events and "
    "engagement.events; keeps per-customer state, RFM segments, model fits and LTV; produces churn.alerts "
    "(CustomerAtRisk, CustomerRecovered, CustomerLost, SegmentChanged)."
)
TOPICS = (PURCHASES_RECORDED, POINTS_EVENTS, REWARDS_EVENTS, ENGAGEMENT_EVENTS, CHURN_ALERTS, CHURN_DLQ)
SEGMENTS = ("Champions", "Loyal", "Potential loyalist", "New", "Promising", "Need attention", "About to sleep",
            "At risk", "Can't lose them", "Hibernating", "Lost", "none")


def create_app(settings: ChurnSettings | None = None) -> FastAPI:
    settings = settings or ChurnSettings()
    runtime = ServiceRuntime(settings, service=SERVICE, schema="churn",
                             migrations_dir=Path(__file__).parent / "migrations", description=DESCRIPTION,
                             topics=TOPICS)

    def pool():
        assert runtime.pool is not None, "the runtime is not started"
        return runtime.pool

    def wake_relay() -> None:
        if runtime.relay is not None:
            runtime.relay.wake()

    ctx = ChurnContext(settings=settings, pool=pool, wake_relay=wake_relay)
    # Bulk lane: nobody waits on churn's consumers, so a longer fetch wait costs nothing.
    runtime.lane("main", bulk=True)
    for sub in subscriptions(ctx):
        runtime.subscribe(sub)
    runtime.broker.publisher(
        settings.topic(CHURN_ALERTS), title="churn.alerts", schema=Union[CHURN_EVENT_TYPES],  # type: ignore[valid-type]
        description="Risk transitions (CustomerAtRisk, CustomerRecovered, CustomerLost; event_id derived from "
                    "customer, episode and kind) and SegmentChanged, keyed by customer_id (shared/events/churn.py)")
    runtime.broker.publisher(settings.topic(CHURN_DLQ), title="churn.dlq", schema=DeadLetter,
                             description="Input events the churn service could not apply, with the reason")

    async def refresh_cache() -> None:
        await base.load_knowledge(ctx, pool())
        if settings.refresh_on_growth:
            due = await base.growth_refresh(ctx, pool())
            if due is not None:
                await evaluation.refresh_base(ctx, trigger="growth", transitions=due == "evaluate")

    async def scheduled_evaluation() -> None:
        await evaluation.run_evaluation(ctx, trigger="schedule")

    async def sample_gauges() -> None:
        counts = {r["segment"]: r for r in await queries.segments(pool())}
        for segment in SEGMENTS:
            row = counts.get(segment)
            metrics.CUSTOMERS_BY_SEGMENT.labels(segment).set(row["customers"] if row else 0)
            metrics.SEGMENT_VALUE.labels(segment).set(float(row["ltv"]) if row and row["ltv"] else 0)
        risks = await queries.risk_counts(pool())
        for state in ("active", "at_risk", "lost"):
            metrics.CUSTOMERS_BY_RISK.labels(state).set(risks.get(state, 0))

    async def at_start() -> None:
        await base.load_knowledge(ctx, pool())

        async def first_round() -> None:
            try:
                if settings.refresh_at_start:
                    await evaluation.refresh_base(ctx, trigger="start")
                elif await pool().fetchval("SELECT count(*) FROM evaluations WHERE finished_at IS NULL"):
                    await evaluation.run_evaluation(ctx, trigger="resume")  # finish what a crash left
            except Exception:  # the schedules try again
                log.exception("the first refresh failed")

        runtime.spawn(first_round(), "churn-first-round")

    runtime.on_start(at_start)
    runtime.every(settings.cache_refresh_interval_s, "churn-cache", refresh_cache,
                  first_delay_s=settings.cache_refresh_interval_s)
    runtime.every(settings.evaluation_interval_s, "churn-evaluation", scheduled_evaluation,
                  first_delay_s=settings.evaluation_interval_s)
    runtime.every(settings.fit_interval_s, "churn-fit", lambda: evaluation.refresh_base(ctx, trigger="schedule"),
                  first_delay_s=settings.fit_interval_s)
    runtime.every(settings.rfm_refresh_interval_s, "churn-rfm",
                  lambda: evaluation.refresh_base(ctx, trigger="schedule", fit=False),
                  first_delay_s=settings.rfm_refresh_interval_s)
    runtime.every(settings.metrics_interval_s, "churn-gauges", sample_gauges)

    app = create_service_app(runtime, title="churn", description=DESCRIPTION)
    app.state.churn = ctx
    install_error_handlers(app)
    for router in create_routers(ctx):
        app.include_router(router)
    install_reports(app, runtime, admin_key=lambda: settings.admin_api_key)  # issue 13: reports, /dashboard
    return app
