"""What the ledger reads and publishes. Reads go through the shared pipeline (decode, inbox,
one transaction per batch holding program_versions' lock, dead letters to points.dlq);
publishers are declared for the AsyncAPI document, the outbox relay does the publishing."""

import uuid
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Union

import msgspec
from faststream.kafka import KafkaBroker
from pydantic import Field, TypeAdapter

from services.ledger import domain as d
from services.ledger import repository as repo
from services.ledger.adjustments import apply_adjustments
from services.ledger.earning import apply_purchases
from services.ledger.redemptions import apply_rewards
from services.ledger.service import (
    ADJUSTMENTS_CONSUMER,
    PURCHASES_CONSUMER,
    REWARDS_CONSUMER,
    Ledger,
    count_dead_letter,
)
from services.ledger.settings import LedgerSettings
from shared.events import DeadLetter
from shared.events.adjustments import AdjustmentRecorded
from shared.events.points import POINTS_EVENT_TYPES
from shared.events.programs import ProgramVersionPublished
from shared.events.purchases import PurchaseClaimed, PurchaseRecorded, ReturnRecorded
from shared.events.wire import fast_or
from shared.events.rewards import (
    RedemptionCancelled,
    RedemptionDelivered,
    RedemptionFailed,
    RedemptionFulfilled,
    RedemptionRequested,
    RedemptionShipped,
)
from shared.pipeline import Record, Subscription, pydantic_decoder
from shared.topics import (
    LEDGER_ADJUSTMENTS,
    LEDGER_PROGRAMS,
    POINTS_DLQ,
    POINTS_EVENTS,
    PURCHASES_RECORDED,
    REWARDS_EVENTS,
)

PurchaseEvent = Union[PurchaseRecorded, ReturnRecorded, PurchaseClaimed]
RewardsEvent = Union[RedemptionRequested, RedemptionFulfilled, RedemptionFailed, RedemptionCancelled,
                     RedemptionShipped, RedemptionDelivered]
PURCHASE_EVENT = TypeAdapter(Annotated[PurchaseEvent, Field(discriminator="type")])
_PURCHASE_TYPES = frozenset(("PurchaseRecorded", "ReturnRecorded", "PurchaseClaimed"))


class _HistoryMarker(msgspec.Struct):
    history: bool = False
    import_policy: str | None = None


class HistoryForAnalytics(msgspec.Struct):
    """What the ledger reads of imported history that earns nothing (policy analytics): the
    id for the inbox and the marker. The rest of the event is never looked at."""

    event_id: uuid.UUID
    type: str
    recorded_at: datetime
    payload: _HistoryMarker
    customer_id: str | None = None


_PEEK = msgspec.json.Decoder(HistoryForAnalytics)
_decode_purchase_event = fast_or(pydantic_decoder(PURCHASE_EVENT))


def decode_purchase_event(record: Record) -> Any:
    """purchases.recorded. History imported for the analytics only is read with a minimal
    decoder (a few microseconds, against ~50 for the whole contract model): the ledger only
    claims it in the inbox. Everything else, and anything the minimal one cannot read, goes
    through the full decoding: msgspec where it can, the pydantic contract for the rest and
    its refusals (shared/events/wire.py)."""
    if b'"history":true' in record.value:
        try:
            peek = _PEEK.decode(record.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            peek = None
        if peek is not None and peek.type in _PURCHASE_TYPES and peek.payload.history \
                and not d.history_earns(True, peek.payload.import_policy):
            return peek
    return _decode_purchase_event(record)
REWARDS_EVENT = TypeAdapter(Annotated[RewardsEvent, Field(discriminator="type")])
ADJUSTMENT_EVENT = TypeAdapter(Annotated[Union[AdjustmentRecorded], Field(discriminator="type")])


def subscriptions(settings: LedgerSettings, ledger: Ledger) -> list[Subscription]:
    # Every input is applied under the program version in force at its time: the program is
    # loaded before the transaction, which holds program_versions so no save slips in between.
    common = dict(dead_letter_topic=ledger.dlq_topic, door="kafka", opening=repo.APPLYING_INPUTS,
                  prepare=ledger.programs.ensure_loaded, on_dead_letter=count_dead_letter)
    return [
        Subscription(topic=settings.topic(PURCHASES_RECORDED), consumer=PURCHASES_CONSUMER,
                     decode=decode_purchase_event, apply=partial(apply_purchases, ledger),
                     lane="purchases", schema=PurchaseEvent,
                     description="Sales, returns and claims: earn, reverse, earn on claim", **common),
        Subscription(topic=settings.topic(REWARDS_EVENTS), consumer=REWARDS_CONSUMER,
                     decode=pydantic_decoder(REWARDS_EVENT), apply=partial(apply_rewards, ledger),
                     lane="rewards", schema=RewardsEvent,
                     description="The redemption saga: hold, post, void, refund (shipments move no points)",
                     **common),
        # The admin API applied each of these already and put its id in the inbox: here they
        # are no-ops. Read from offset 0 into an empty database (a rebuild), they apply the
        # adjustments again, with the same ids.
        Subscription(topic=settings.topic(LEDGER_ADJUSTMENTS), consumer=ADJUSTMENTS_CONSUMER,
                     decode=pydantic_decoder(ADJUSTMENT_EVENT), apply=partial(apply_adjustments, ledger),
                     lane="adjustments", schema=AdjustmentRecorded,
                     description="Manual adjustments: already applied by the admin API (inbox); applied again "
                                 "by a rebuild", **common),
    ]


def declare_publishers(broker: KafkaBroker, settings: LedgerSettings) -> None:
    broker.publisher(settings.topic(POINTS_EVENTS), title="points.events",
                     description="Everything the ledger did to a customer's points, each with the balance after it; "
                                 "key customer_id", schema=Union[POINTS_EVENT_TYPES])  # type: ignore[valid-type]
    broker.publisher(settings.topic(POINTS_DLQ), title="points.dlq",
                     description="Inputs the ledger could not apply, with the reason", schema=DeadLetter)
    broker.publisher(settings.topic(LEDGER_ADJUSTMENTS), title="ledger.adjustments",
                     description="Manual adjustments accepted by the admin API, written in the transaction that "
                                 "applied them (never a refused one); event_id derives from adjustment_id; "
                                 "key customer_id. The ledger's own replayable input", schema=AdjustmentRecorded)
    broker.publisher(settings.topic(LEDGER_PROGRAMS), title="ledger.programs",
                     description="Every program version saved (file or admin API), with its effective time; key "
                                 "\"program\". Read whole by the ledger at start (not a subscription), so that a "
                                 "rebuild earns under the original versions", schema=ProgramVersionPublished)
