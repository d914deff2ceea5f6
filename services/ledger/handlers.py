"""What the ledger reads and publishes. Reads go through the shared pipeline (decode, inbox,
one transaction per batch holding program_versions' lock, dead letters to points.dlq);
publishers are declared for the AsyncAPI document, the outbox relay does the publishing."""

from functools import partial
from typing import Annotated, Union

from faststream.kafka import KafkaBroker
from pydantic import Field, TypeAdapter

from services.ledger import repository as repo
from services.ledger.service import (
    ADJUSTMENTS_CONSUMER, PURCHASES_CONSUMER, REWARDS_CONSUMER, Ledger, apply_adjustments, apply_purchases,
    apply_rewards, count_dead_letter,
)
from services.ledger.settings import LedgerSettings
from shared.events import DeadLetter
from shared.events.adjustments import AdjustmentRecorded
from shared.events.points import POINTS_EVENT_TYPES
from shared.events.programs import ProgramVersionPublished
from shared.events.purchases import PurchaseClaimed, PurchaseRecorded, ReturnRecorded
from shared.events.rewards import (
    RedemptionCancelled, RedemptionDelivered, RedemptionFailed, RedemptionFulfilled, RedemptionRequested,
    RedemptionShipped,
)
from shared.pipeline import Subscription, pydantic_decoder
from shared.topics import (
    LEDGER_ADJUSTMENTS, LEDGER_PROGRAMS, POINTS_DLQ, POINTS_EVENTS, PURCHASES_RECORDED, REWARDS_EVENTS,
)

PurchaseEvent = Union[PurchaseRecorded, ReturnRecorded, PurchaseClaimed]
RewardsEvent = Union[RedemptionRequested, RedemptionFulfilled, RedemptionFailed, RedemptionCancelled,
                     RedemptionShipped, RedemptionDelivered]
PURCHASE_EVENT = TypeAdapter(Annotated[PurchaseEvent, Field(discriminator="type")])
REWARDS_EVENT = TypeAdapter(Annotated[RewardsEvent, Field(discriminator="type")])
ADJUSTMENT_EVENT = TypeAdapter(Annotated[Union[AdjustmentRecorded], Field(discriminator="type")])


def subscriptions(settings: LedgerSettings, ledger: Ledger) -> list[Subscription]:
    # Every input is applied under the program version in force at its time: the program is
    # loaded before the transaction, which holds program_versions so no save slips in between.
    common = dict(dead_letter_topic=ledger.dlq_topic, door="kafka", opening=repo.APPLYING_INPUTS,
                  prepare=ledger.programs.ensure_loaded, on_dead_letter=count_dead_letter)
    return [
        Subscription(topic=settings.topic(PURCHASES_RECORDED), consumer=PURCHASES_CONSUMER,
                     decode=pydantic_decoder(PURCHASE_EVENT), apply=partial(apply_purchases, ledger),
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
