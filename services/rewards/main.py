"""Composition root of the rewards service: builds the runtime, the use-case context, the
Kafka handlers and the HTTP app. Nothing connects before the app's lifespan starts."""

from pathlib import Path

from fastapi import FastAPI

from services.rewards import service
from services.rewards.api import create_routers, install_error_handlers
from services.rewards.handlers import register_handlers
from services.rewards.service import RewardsContext
from services.rewards.settings import RewardsSettings
from shared.events.rewards import RedemptionRequested
from shared.http import create_service_app
from shared.runtime import ServiceRuntime
from shared.topics import REWARDS_DLQ, REWARDS_EVENTS

SERVICE = "rewards"
DESCRIPTION = (
    "Rewards catalog, coupon pools and the redemption saga: consumes points.events (the ledger's holds), "
    "produces rewards.events (RedemptionRequested, RedemptionFulfilled, RedemptionFailed, RedemptionCancelled, "
    "RedemptionShipped, RedemptionDelivered)."
)


def create_app(settings: RewardsSettings | None = None) -> FastAPI:
    settings = settings or RewardsSettings()
    verifier = settings.token_verifier()
    runtime = ServiceRuntime(
        settings, service=SERVICE, schema="rewards", migrations_dir=Path(__file__).parent / "migrations",
        description=DESCRIPTION,
    )

    def pool():
        assert runtime.pool is not None, "the runtime is not started"
        return runtime.pool

    def wake_relay() -> None:
        if runtime.relay is not None:
            runtime.relay.wake()

    ctx = RewardsContext(settings=settings, pool_getter=pool, wake_relay=wake_relay)
    register_handlers(runtime.broker, ctx)
    # Declared for the AsyncAPI document only: events are published by the outbox relay.
    runtime.broker.publisher(
        settings.topic(REWARDS_EVENTS), title="rewards.events", schema=RedemptionRequested,
        description="The redemption saga, keyed by customer_id: RedemptionRequested, RedemptionFulfilled, "
        "RedemptionFailed, RedemptionCancelled; then, for physical rewards, RedemptionShipped and "
        "RedemptionDelivered (shared/events/rewards.py).",
    )
    runtime.broker.publisher(settings.topic(REWARDS_DLQ), title="rewards.dlq",
                             description="points.events records this service could not process (DeadLetter)")

    async def start_loops() -> None:
        runtime.spawn(
            service.run_periodically("recovery", settings.recovery_interval_s,
                                     lambda: service.recover_unanswered(ctx)),
            name="rewards-recovery",
        )
        runtime.spawn(
            service.run_periodically("outcome-poll", settings.saga_poll_interval_ms / 1000,
                                     lambda: ctx.waiters.poll_once(ctx.pool)),
            name="rewards-outcome-poll",
        )
        runtime.spawn(
            service.run_periodically("stock-metrics", settings.metrics_sample_interval_s,
                                     lambda: service.sample_stock_levels(ctx)),
            name="rewards-stock-metrics",
        )
        runtime.spawn(
            service.run_periodically("shipment-metrics", settings.metrics_sample_interval_s,
                                     lambda: service.sample_shipment_queue(ctx)),
            name="rewards-shipment-metrics",
        )

    runtime.on_start(start_loops)

    app = create_service_app(runtime, title="rewards", description=DESCRIPTION)
    app.state.rewards = ctx
    install_error_handlers(app)
    for router in create_routers(ctx, verifier):
        app.include_router(router)
    return app
