"""The Kafka door of the purchases service: what it reads (purchases.raw, through the shared
pipeline) and what it publishes (declared for the AsyncAPI document; the outbox relay
publishes)."""

from datetime import datetime
from typing import Any, Union

from faststream.kafka import KafkaBroker

from services.purchases import domain, metrics
from services.purchases.service import Inbound, PurchaseRecorder, dead_letter
from services.purchases.settings import PurchasesSettings
from shared.events import DeadLetter
from shared.events.purchases import PurchaseClaimed, PurchaseRecorded, ReturnRecorded
from shared.outbox import OutboxMessage
from shared.pipeline import Record, Subscription
from shared.topics import PURCHASES_DLQ, PURCHASES_RAW, PURCHASES_RECORDED

DOOR = "kafka"


def inbound_from_record(record: Record) -> Inbound:
    """Never refuses: a purchase that does not parse is a Rejection the recorder dead-letters
    (it de-duplicates by purchase key, so the raw input needs no event_id)."""
    return Inbound(
        door=DOOR,
        original=record.value,
        parsed=domain.parse_purchase(record.value),
        correlation_id=record.header("correlation_id"),
        kafka={"topic": record.topic, "partition": record.partition, "offset": record.offset,
               "key": record.key_text()},
    )


def subscriptions(settings: PurchasesSettings, recorder: PurchaseRecorder) -> list[Subscription[Inbound]]:
    dlq = settings.topic(PURCHASES_DLQ)

    def failed(record: Record, reason: str, errors: list[dict[str, Any]], now: datetime) -> OutboxMessage:
        # A record that failed on its own keeps the door's dead-letter shape (reason
        # processing_error, a huge original truncated), like every other refusal of the door.
        reason = "processing_error" if reason == "processing_failed" else reason
        return dead_letter(dlq, inbound_from_record(record), domain.Rejection(reason, errors))

    def counted(reason: str) -> None:
        metrics.REJECTED.labels(DOOR, "processing_error" if reason == "processing_failed" else reason).inc()

    return [Subscription(
        topic=settings.topic(PURCHASES_RAW), consumer=None, decode=inbound_from_record, apply=recorder.apply,
        dead_letter_topic=dlq, door=DOOR, lane="ingest", dead_letter=failed, on_dead_letter=counted,
        schema=domain.PurchaseIn,
        description="Purchases as POS terminals and e-shops produce them (the inbound contract, JSON)",
    )]


def declare_publishers(broker: KafkaBroker, settings: PurchasesSettings) -> None:
    broker.publisher(settings.topic(PURCHASES_RECORDED), title="purchases.recorded",
                     description="Validated, de-duplicated sales, returns and claims; key customer_id",
                     schema=Union[PurchaseRecorded, ReturnRecorded, PurchaseClaimed])
    broker.publisher(settings.topic(PURCHASES_DLQ), title="purchases.dlq",
                     description="Refused inputs with the original payload, the reason and the door",
                     schema=DeadLetter)
