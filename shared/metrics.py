"""Metrics every service exposes the same way; each service adds its own in metrics.py."""

from collections.abc import Iterable

from aiokafka import TopicPartition
from prometheus_client import Gauge

CONSUMER_LAG = Gauge(
    "kafka_consumer_lag_messages",
    "Messages in a partition behind the last one this process consumed (highwater - next offset)",
    ["topic", "partition"],
)


def observe_consumer_lag(consumer, records: Iterable) -> None:
    """Sample lag after a batch: for each partition in it, the broker's highwater mark
    (known to the consumer from its last fetch) minus the offset after the batch. A fetch's
    high watermark is the true end also on the embedded broker, whose ListOffsets end falls
    short after a multi-record batch (see bench/harness.py fetched_ends)."""
    next_offsets: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        next_offsets[key] = max(next_offsets.get(key, 0), r.offset + 1)
    for (topic, partition), next_offset in next_offsets.items():
        highwater = consumer.highwater(TopicPartition(topic, partition))
        if highwater is not None:
            CONSUMER_LAG.labels(topic, str(partition)).set(max(highwater - next_offset, 0))
