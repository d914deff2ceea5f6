"""FastStream subscribers of the rewards service: take the batch, call the use case."""

from faststream import AckPolicy, Context
from faststream.kafka import KafkaBroker
from faststream.kafka.message import KafkaMessage

from services.rewards import service
from services.rewards.service import RawRecord, RewardsContext
from shared.kafka import consumer_options
from shared.metrics import observe_consumer_lag
from shared.topics import POINTS_EVENTS


async def _raw_batch(msg: KafkaMessage) -> list[bytes]:
    # The use case decodes (and dead-letters what it cannot): FastStream must not fail first.
    return [r.value or b"" for r in msg.raw_message]


def register_handlers(broker: KafkaBroker, ctx: RewardsContext) -> None:
    settings = ctx.settings

    @broker.subscriber(
        settings.topic(POINTS_EVENTS),
        batch=True,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=_raw_batch,
        title="rewards.points-events",
        description="The ledger's answers to redemptions (PointsHeld, PointsHoldRejected, PointsRedeemed, "
        "PointsReleased) and every BalanceAfter for the customer standing projection.",
        **consumer_options(settings, service="rewards", purpose="points-events"),
    )
    async def on_points_events(_body: list[bytes], msg: KafkaMessage = Context("message")) -> None:
        records = [
            RawRecord(value=r.value, key=r.key, topic=r.topic, partition=r.partition, offset=r.offset)
            for r in msg.raw_message
        ]
        await service.apply_points_records(ctx, records)
        observe_consumer_lag(msg.consumer, msg.raw_message)
