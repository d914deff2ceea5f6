"""FastStream subscribers of the rewards service: take the batch, call the use case."""

from typing import Any

from faststream import AckPolicy
from faststream.kafka import KafkaBroker

from services.rewards import service
from services.rewards.service import RawRecord, RewardsContext
from shared.kafka import consumer_options, the_message
from shared.metrics import observe_consumer_lag
from shared.topics import POINTS_EVENTS


def register_handlers(broker: KafkaBroker, ctx: RewardsContext) -> None:
    settings = ctx.settings

    @broker.subscriber(
        settings.topic(POINTS_EVENTS),
        batch=True,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=the_message,
        title="rewards.points-events",
        description="The ledger's answers to redemptions (PointsHeld, PointsHoldRejected, PointsRedeemed, "
        "PointsReleased) and every BalanceAfter for the customer standing projection.",
        **consumer_options(settings, service="rewards", purpose="points-events"),
    )
    async def on_points_events(msg: Any) -> None:  # the batch, a KafkaMessage (decoder the_message)
        records = [
            RawRecord(value=r.value, key=r.key, topic=r.topic, partition=r.partition, offset=r.offset)
            for r in msg.raw_message
        ]
        await service.apply_points_records(ctx, records)
        observe_consumer_lag(msg.consumer, msg.raw_message)
