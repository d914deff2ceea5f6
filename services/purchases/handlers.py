"""The Kafka door: `purchases.raw` consumed in micro-batches. Publishers are declared here
for the AsyncAPI document; the outbox relay does the actual publishing."""

import asyncio
import logging
from typing import Any, Union

import asyncpg
from faststream import AckPolicy
from faststream.kafka import KafkaBroker

from services.purchases import domain
from services.purchases.service import Inbound, PurchaseRecorder, record_one_by_one
from services.purchases.settings import PurchasesSettings
from shared.events import DeadLetter
from shared.events.purchases import PurchaseClaimed, PurchaseRecorded, ReturnRecorded
from shared.kafka import consumer_options, the_message
from shared.logging import correlation_id
from shared.metrics import observe_consumer_lag
from shared.topics import PURCHASES_DLQ, PURCHASES_IMPORT, PURCHASES_RAW, PURCHASES_RECORDED

log = logging.getLogger(__name__)

# Infrastructure failures: the batch is not the problem, so it is retried (offsets are not
# committed) after a pause, never dead-lettered.
RETRYABLE = (OSError, asyncpg.exceptions.ConnectionFailureError, asyncpg.exceptions.CannotConnectNowError,
             asyncpg.exceptions.InterfaceError, asyncpg.exceptions.TooManyConnectionsError, asyncio.TimeoutError)


def _header(record, name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            # NUL cannot go into PostgreSQL text/jsonb (the outbox row's headers)
            return value.decode(errors="replace").replace("\x00", "\ufffd")
    return None


IMPORT_POLICIES = ("analytics", "as-earned")


def inbound_from_record(record, *, door: str = "kafka") -> Inbound:
    """A purchases.raw record (door kafka) or a purchases.import one (door import: history,
    its policy in the `import_policy` header, analytics when absent: history earns nothing
    unless the sender says so)."""
    parsed = domain.parse_purchase(record.value or b"")
    policy = None
    if door == "import":
        policy = _header(record, "import_policy") or "analytics"
        if policy not in IMPORT_POLICIES and not isinstance(parsed, domain.Rejection):
            parsed = domain.Rejection("import_policy", [{"loc": ["headers", "import_policy"], "type": "import_policy",
                                                         "msg": f"import_policy must be one of {IMPORT_POLICIES}"}])
            policy = "analytics"
    return Inbound(
        door=door,
        import_policy=policy,
        original=record.value or b"",
        parsed=parsed,
        correlation_id=_header(record, "correlation_id"),
        kafka={"topic": record.topic, "partition": record.partition, "offset": record.offset,
               # NUL cannot go into a PostgreSQL text column (the dead letter's key)
               "key": record.key.decode(errors="replace").replace("\x00", "\ufffd") if record.key else None},
    )


def register_handlers(broker: KafkaBroker, *, settings: PurchasesSettings, recorder: PurchaseRecorder,
                      pool_getter, on_committed) -> None:
    broker.publisher(settings.topic(PURCHASES_RECORDED), title="purchases.recorded",
                     description="Validated, de-duplicated sales, returns and claims; key customer_id",
                     schema=Union[PurchaseRecorded, ReturnRecorded, PurchaseClaimed])
    broker.publisher(settings.topic(PURCHASES_DLQ), title="purchases.dlq",
                     description="Refused inputs with the original payload, the reason and the door",
                     schema=DeadLetter)
    _subscribe(broker, settings, recorder, pool_getter, on_committed, topic=PURCHASES_RAW, door="kafka",
               purpose="ingest", description="Purchases as POS terminals and e-shops produce them (the inbound "
                                            "contract, JSON)")
    # History in bigger batches: nobody waits on it, and a batch costs the same round trips.
    _subscribe(broker, settings.model_copy(update={"consumer_batch_max_records": settings.import_batch_max_records}),
               recorder, pool_getter, on_committed, topic=PURCHASES_IMPORT, door="import", purpose="import",
               description="Imported history (the inbound contract, JSON; header import_policy: analytics | "
                           "as-earned); recorded as history on purchases.recorded")


def _subscribe(broker: KafkaBroker, settings: PurchasesSettings, recorder: PurchaseRecorder, pool_getter,
               on_committed, *, topic: str, door: str, purpose: str, description: str) -> None:
    retry_state = {"backoff_s": 0.1}

    @broker.subscriber(
        settings.topic(topic),
        batch=True,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=the_message,
        title=topic,
        description=description,
        **consumer_options(settings, service="purchases", purpose=purpose, bulk=True),
    )
    async def ingest(message: Any) -> None:  # the batch, a KafkaMessage (decoder the_message)
        records = message.raw_message if isinstance(message.raw_message, tuple) else (message.raw_message,)
        items = [inbound_from_record(r, door=door) for r in records]
        correlation_id.set(items[0].correlation_id if items else None)
        pool: asyncpg.Pool = pool_getter()
        try:
            try:
                async with pool.acquire() as conn:
                    await recorder.record(conn, items)
            except RETRYABLE:
                raise
            except asyncpg.PostgresError:
                log.exception("batch failed on a data error; recording one by one", extra={"items": len(items)})
                await record_one_by_one(recorder, pool, items)
        except RETRYABLE:
            log.warning("infrastructure error; batch will be redelivered", exc_info=True,
                        extra={"backoff_s": retry_state["backoff_s"]})
            await asyncio.sleep(retry_state["backoff_s"])
            retry_state["backoff_s"] = min(retry_state["backoff_s"] * 2, 5.0)
            raise
        retry_state["backoff_s"] = 0.1
        on_committed()
        observe_consumer_lag(message.consumer, records)
