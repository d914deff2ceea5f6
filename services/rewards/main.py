"""Composition root of the rewards service: builds the runtime, the use-case context, the
subscriptions, the periodic jobs and the HTTP app. Nothing connects before the app's lifespan starts."""

from pathlib import Path

from fastapi import FastAPI

from services.rewards import catalog, redemptions, shipping
from services.rewards.api import create_routers, install_error_handlers
from services.rewards.handlers import declare_publishers, subscriptions
from services.rewards.service import RewardsContext
from services.rewards.settings import RewardsSettings
from shared.http import create_service_app
from shared.runtime import ServiceRuntime

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
        # What rewards sends the ledger is answered on points.events: out of idle mode now.
        runtime.wake_lane("points-events")

    ctx = RewardsContext(settings=settings, pool_getter=pool, wake_relay=wake_relay)
    declare_publishers(runtime.broker, ctx)
    runtime.lane("points-events")  # a latency lane: a customer waits on the saga
    for subscription in subscriptions(ctx):
        runtime.subscribe(subscription)
    runtime.every(settings.recovery_interval_s, "rewards-recovery", lambda: redemptions.recover_unanswered(ctx))
    runtime.every(settings.saga_poll_interval_ms / 1000, "rewards-outcome-poll",
                  lambda: ctx.waiters.poll_once(ctx.pool))
    runtime.every(settings.metrics_sample_interval_s, "rewards-stock-metrics",
                  lambda: catalog.sample_stock_levels(ctx))
    runtime.every(settings.metrics_sample_interval_s, "rewards-shipment-metrics",
                  lambda: shipping.sample_shipment_queue(ctx))

    app = create_service_app(runtime, title="rewards", description=DESCRIPTION)
    app.state.rewards = ctx
    install_error_handlers(app)
    for router in create_routers(ctx, verifier):
        app.include_router(router)
    return app
