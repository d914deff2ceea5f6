"""What the rewards service reads (points.events, through the shared pipeline) and publishes
(declared for the AsyncAPI document; the outbox relay publishes)."""

from functools import partial
from typing import Union

from faststream.kafka import KafkaBroker

from services.rewards.consuming import (
    apply_points_events,
    count_dead_letter,
    decode_points_record,
    points_dead_letter,
)
from services.rewards.service import POINTS_CONSUMER, RewardsContext
from shared.events import DeadLetter
from shared.events.points import POINTS_EVENT_TYPES
from shared.events.rewards import REWARDS_EVENT_TYPES
from shared.pipeline import Subscription
from shared.topics import POINTS_EVENTS, REWARDS_DLQ, REWARDS_EVENTS


def subscriptions(ctx: RewardsContext) -> list[Subscription]:
    settings = ctx.settings
    return [Subscription(
        topic=settings.topic(POINTS_EVENTS), consumer=POINTS_CONSUMER, decode=decode_points_record,
        apply=partial(apply_points_events, ctx), dead_letter_topic=settings.topic(REWARDS_DLQ),
        door="points.events consumer", lane="points-events", dead_letter=partial(points_dead_letter, ctx),
        on_dead_letter=count_dead_letter, schema=Union[POINTS_EVENT_TYPES],  # type: ignore[valid-type]
        description="The ledger's answers to redemptions (PointsHeld, PointsHoldRejected, PointsRedeemed, "
                    "PointsReleased) and every BalanceAfter for the customer standing projection",
    )]


def declare_publishers(broker: KafkaBroker, ctx: RewardsContext) -> None:
    settings = ctx.settings
    broker.publisher(
        settings.topic(REWARDS_EVENTS), title="rewards.events", schema=Union[REWARDS_EVENT_TYPES],  # type: ignore[valid-type]
        description="The redemption saga, keyed by customer_id: RedemptionRequested, RedemptionFulfilled, "
        "RedemptionFailed, RedemptionCancelled; then, for physical rewards, RedemptionShipped and "
        "RedemptionDelivered (shared/events/rewards.py).",
    )
    broker.publisher(settings.topic(REWARDS_DLQ), title="rewards.dlq", schema=DeadLetter,
                     description="points.events records this service could not process, with the reason")
