"""Composition root of the purchases service: the only place that wires real adapters."""

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from services.purchases.api import body_limit, create_router, validation_error_handler
from services.purchases.handlers import declare_publishers, subscriptions
from services.purchases.service import Clock, PurchaseRecorder
from services.purchases.settings import PurchasesSettings
from shared.events import utcnow
from shared.http import create_service_app
from shared.runtime import ServiceRuntime
from shared.topics import PURCHASES_DLQ, PURCHASES_IMPORT, PURCHASES_RAW, PURCHASES_RECORDED

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Front door for POS terminals and e-shops: validates, de-duplicates and records purchases and "
    "returns from Kafka (purchases.raw; imported history from purchases.import), HTTP (per-store API key) and Shopify/WooCommerce webhooks, "
    "and publishes them on purchases.recorded; refusals go to purchases.dlq."
)


def create_app(settings: PurchasesSettings | None = None, *, clock: Clock = utcnow) -> FastAPI:
    settings = settings or PurchasesSettings()
    runtime = ServiceRuntime(
        settings,
        service="purchases",
        schema="purchases",
        migrations_dir=Path(__file__).parent / "migrations",
        description=DESCRIPTION,
        topics=(PURCHASES_RAW, PURCHASES_IMPORT, PURCHASES_RECORDED, PURCHASES_DLQ),
    )
    recorder = PurchaseRecorder(settings=settings, clock=clock)
    # An HTTP purchase refused (e.g. a store unknown then) is the inbound contract, as the Kafka
    # door reads it: replayed there. Webhook bodies are the shop's own format: not replayable.
    runtime.dead_letter_doors = {"http": settings.topic(PURCHASES_RAW)}
    declare_publishers(runtime.broker, settings)
    runtime.lane("ingest", bulk=True)
    # Two consumers of the history: one batch is computed while the other waits for PostgreSQL.
    runtime.lane("import", bulk=True, max_records=settings.import_batch_max_records,
                 instances=settings.import_consumers)
    for subscription in subscriptions(settings, recorder):
        runtime.subscribe(subscription)

    async def expire_parked_returns() -> None:
        async with runtime.pool.acquire() as conn:
            if await recorder.expire_parked_returns(conn):
                runtime.relay.wake()

    runtime.every(max(1.0, min(settings.return_park_s / 4, 30.0)), "parked-returns", expire_parked_returns)
    app = create_service_app(runtime, title="Loyalty purchases", description=DESCRIPTION,
                             body_limit=body_limit(settings.max_body_bytes))
    app.include_router(create_router(runtime, recorder, settings))
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    return app
