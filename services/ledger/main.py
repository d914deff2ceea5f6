"""Composition root of the ledger service: the only place that wires real adapters.
Nothing connects at import or in create_app; the ASGI lifespan starts everything."""

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI

from services.ledger.api import body_limit, create_router
from services.ledger.handlers import declare_publishers, subscriptions
from services.ledger.queries import refresh_gauges
from services.ledger.scheduler import run_scheduler
from services.ledger.service import Clock, Ledger, make_clock
from services.ledger.settings import LedgerSettings
from services.ledger.versions import ProgramHistoryUnavailable, ProgramStore
from shared.http import create_service_app
from shared.kafka import read_topic
from shared.runtime import ServiceRuntime
from shared.topics import (
    LEDGER_ADJUSTMENTS,
    LEDGER_PROGRAMS,
    POINTS_DLQ,
    POINTS_EVENTS,
    PURCHASES_RECORDED,
    REWARDS_EVENTS,
)

log = logging.getLogger(__name__)

DESCRIPTION = (
    "The points ledger: double-entry accounts and append-only transfers, earning by versioned program "
    "rules from purchases.recorded, lots with expiry, returns and debt, two-phase redemption holds from "
    "rewards.events, tiers, manual adjustments (admin API, also written to ledger.adjustments so that a "
    "rebuild from the topics keeps them), program versions (ledger.programs, read whole at start); everything it "
    "does goes out on points.events."
)


def create_app(settings: LedgerSettings | None = None, *, clock: Clock | None = None) -> FastAPI:
    settings = settings or LedgerSettings()
    runtime = ServiceRuntime(
        settings,
        service="ledger",
        schema="ledger",
        migrations_dir=Path(__file__).parent / "migrations",
        description=DESCRIPTION,
        topics=(PURCHASES_RECORDED, REWARDS_EVENTS, LEDGER_ADJUSTMENTS, LEDGER_PROGRAMS, POINTS_EVENTS, POINTS_DLQ),
    )
    clock = clock or make_clock(settings)
    programs_topic = settings.topic(LEDGER_PROGRAMS)

    async def published_versions() -> list[bytes]:
        return [r.value or b"" for r in await read_topic(settings, programs_topic)]

    programs = ProgramStore(settings.program_file, topic=programs_topic, history=published_versions, clock=clock)
    ledger = Ledger(settings, programs, clock)
    declare_publishers(runtime.broker, settings)
    # Several consumers of purchases.recorded in one group and one process: each owns some
    # partitions (so, some customers), and while one batch waits for PostgreSQL another is
    # computed. Adjustments keep a group of their own: a rebuild reads them only once the
    # purchases they spend from are applied (tests/e2e/test_ledger_replay.py).
    runtime.lane("purchases", bulk=True, instances=settings.purchases_consumers)
    runtime.lane("rewards")
    runtime.lane("adjustments", bulk=True)
    for subscription in subscriptions(settings, ledger):
        runtime.subscribe(subscription)

    async def scheduler_round() -> None:
        async with runtime.pool.acquire() as conn:
            await ledger.programs.ensure_loaded(conn)
            await ledger.programs.refresh(conn)
        run = await run_scheduler(runtime.pool, ledger)
        if run.customers:
            runtime.relay.wake()
            log.info("scheduler run", extra=run.__dict__)

    async def load_program() -> bool:
        try:
            async with runtime.pool.acquire() as conn:
                await ledger.programs.ensure_loaded(conn)
            return True
        except ProgramHistoryUnavailable:
            log.warning("program versions not loaded; trying again in %.0f s", ProgramStore.RETRY_AFTER_S,
                        exc_info=True)
            return False

    async def load_program_until_loaded() -> None:
        # /readyz turns ready on its own once the topic can be read, without waiting for an
        # input or the scheduler (which load it too before they apply anything).
        while not ledger.programs.loaded and not await load_program():
            await asyncio.sleep(ProgramStore.RETRY_AFTER_S)

    async def start_background() -> None:
        if not await load_program():
            runtime.spawn(load_program_until_loaded(), "ledger-program-loader")

    async def program_loaded() -> bool:
        # False until the program is loaded (ledger.programs read): until then no input is
        # applied and the endpoints that need the program answer 503.
        return ledger.programs.loaded

    runtime.on_start(start_background)
    runtime.every(settings.scheduler_interval_s, "ledger-scheduler", scheduler_round)
    runtime.every(settings.metrics_interval_s, "ledger-gauges", lambda: refresh_gauges(runtime.pool))
    runtime.add_readiness_check("program", program_loaded)
    app = create_service_app(runtime, title="Loyalty ledger", description=DESCRIPTION,
                             body_limit=body_limit(settings.max_body_bytes))
    app.state.ledger = ledger
    app.include_router(create_router(runtime, ledger))
    return app
