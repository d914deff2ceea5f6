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
from shared.topics import PURCHASES_DLQ, PURCHASES_IMPORT, PURCHASES_RAW, PURCHASES_RECORDED

DOOR = "kafka"
IMPORT_DOOR = "import"
IMPORT_POLICIES = ("analytics", "as-earned")


def inbound_from_record(record: Record, *, door: str = DOOR) -> Inbound:
    """Never refuses: a purchase that does not parse is a Rejection the recorder dead-letters
    (it de-duplicates by purchase key, so the raw input needs no event_id).

    On purchases.import (door import) the purchase is history, its policy in the
    `import_policy` header; analytics when absent (history earns nothing unless its sender
    says so), refused (`import_policy`) when it names no policy."""
    parsed = domain.parse_purchase(record.value)
    policy = None
    if door == IMPORT_DOOR:
        policy = record.header("import_policy") or "analytics"
        if policy not in IMPORT_POLICIES:
            if not isinstance(parsed, domain.Rejection):
                parsed = domain.Rejection("import_policy", [{
                    "loc": ["headers", "import_policy"], "type": "import_policy",
                    "msg": f"import_policy must be one of {', '.join(IMPORT_POLICIES)}, not {policy!r}"}])
            policy = "analytics"
    return Inbound(
        door=door,
        import_policy=policy,
        original=record.value,
        parsed=parsed,
        correlation_id=record.header("correlation_id"),
        kafka={"topic": record.topic, "partition": record.partition, "offset": record.offset,
               "key": record.key_text()},
    )


def subscriptions(settings: PurchasesSettings, recorder: PurchaseRecorder) -> list[Subscription[Inbound]]:
    dlq = settings.topic(PURCHASES_DLQ)

    def door_subscription(topic: str, door: str, lane: str, description: str) -> Subscription[Inbound]:
        def decode(record: Record) -> Inbound:
            return inbound_from_record(record, door=door)

        def failed(record: Record, reason: str, errors: list[dict[str, Any]], now: datetime) -> OutboxMessage:
            # A record that failed on its own keeps the door's dead-letter shape (reason
            # processing_error, a huge original truncated), like every other refusal of the door.
            reason = "processing_error" if reason == "processing_failed" else reason
            return dead_letter(dlq, decode(record), domain.Rejection(reason, errors))

        def counted(reason: str) -> None:
            metrics.REJECTED.labels(door, "processing_error" if reason == "processing_failed" else reason).inc()

        return Subscription(
            topic=settings.topic(topic), consumer=None, decode=decode, apply=recorder.apply, dead_letter_topic=dlq,
            door=door, lane=lane, dead_letter=failed, on_dead_letter=counted, schema=domain.PurchaseIn,
            description=description)

    return [
        door_subscription(PURCHASES_RAW, DOOR, "ingest",
                          "Purchases as POS terminals and e-shops produce them (the inbound contract, JSON)"),
        # History in its own bulk lane (main.py: larger batches), so an import never holds
        # up the live door, nor the live door an import.
        door_subscription(PURCHASES_IMPORT, IMPORT_DOOR, "import",
                          "Imported history: the inbound contract, JSON, with the header import_policy "
                          "(analytics | as-earned); recorded as history on purchases.recorded"),
    ]


def declare_publishers(broker: KafkaBroker, settings: PurchasesSettings) -> None:
    broker.publisher(settings.topic(PURCHASES_RECORDED), title="purchases.recorded",
                     description="Validated, de-duplicated sales, returns and claims; key customer_id",
                     schema=Union[PurchaseRecorded, ReturnRecorded, PurchaseClaimed])
    broker.publisher(settings.topic(PURCHASES_DLQ), title="purchases.dlq",
                     description="Refused inputs with the original payload, the reason and the door",
                     schema=DeadLetter)
