"""Composition root of the engagement service: the only place that wires real adapters.
Nothing connects at import or in create_app; the ASGI lifespan starts everything."""

import logging
from pathlib import Path

from fastapi import FastAPI

from services.engagement.api import create_router
from services.engagement.channels import EmailChannel, Templates, WebhookChannel
from services.engagement.dispatch import dispatch_until_idle
from services.engagement.feedback import refresh_gauges
from services.engagement.handlers import subscriptions
from services.engagement.responses import body_limit
from services.engagement.service import Clock, Engagement, JourneyBook, make_clock
from services.engagement.settings import EngagementSettings
from shared.http import create_service_app
from shared.runtime import ServiceRuntime
from shared.topics import (
    CHURN_ALERTS,
    ENGAGEMENT_DLQ,
    ENGAGEMENT_EVENTS,
    POINTS_EVENTS,
    PURCHASES_RECORDED,
    REWARDS_EVENTS,
)

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Engagement: keeps the relationship going after a sale. Journeys (data, versioned) start on purchases, "
    "points, rewards and churn alerts; their steps are durable timers in PostgreSQL that a dispatcher sends "
    "when due, with consent, frequency caps and quiet hours checked at send time; surveys, complaints and "
    "follow-ups; everything it does goes out on engagement.events (no contact data)."
)


def create_app(settings: EngagementSettings | None = None, *, clock: Clock | None = None) -> FastAPI:
    settings = settings or EngagementSettings()
    runtime = ServiceRuntime(
        settings, service="engagement", schema="engagement", migrations_dir=Path(__file__).parent / "migrations",
        description=DESCRIPTION,
        topics=(PURCHASES_RECORDED, POINTS_EVENTS, REWARDS_EVENTS, CHURN_ALERTS, ENGAGEMENT_EVENTS, ENGAGEMENT_DLQ),
    )
    engine = Engagement(settings=settings, clock=clock or make_clock(settings),
                        journeys=JourneyBook(settings.journeys_file), templates=Templates(),
                        email=EmailChannel(settings), webhook=WebhookChannel(settings))
    runtime.lane("main", bulk=True)
    for sub in subscriptions(engine, refresh=engine.journeys.refresh):
        runtime.subscribe(sub)

    async def load_journeys() -> None:
        async with runtime.pool.acquire() as conn:
            await engine.journeys.load(conn)

    async def dispatch() -> None:
        await dispatch_until_idle(runtime.pool, engine, on_committed=runtime.relay.wake)

    async def close_channels() -> None:
        await engine.email.close()
        await engine.webhook.close()

    async def journeys_loaded() -> bool:
        return engine.journeys.current is not None

    # Loaded before any consumer applies a batch: the runtime starts consumers before
    # on_start hooks, but every batch's prepare refreshes the journeys from the table first.
    runtime.on_start(load_journeys)
    runtime.on_stop(close_channels)
    for n in range(settings.dispatch_workers):
        runtime.every(settings.dispatch_interval_s, f"engagement-dispatcher-{n}", dispatch)
    runtime.every(settings.metrics_interval_s, "engagement-gauges", lambda: refresh_gauges(runtime.pool, engine))
    runtime.add_readiness_check("journeys", journeys_loaded)
    app = create_service_app(runtime, title="Loyalty engagement", description=DESCRIPTION,
                             body_limit=body_limit(settings.max_body_bytes))
    app.state.engine = engine
    app.include_router(create_router(runtime, engine))
    return app
