"""Metrics every service exposes the same way; each service adds its own in metrics.py."""

from prometheus_client import Gauge

CONSUMER_LAG = Gauge(
    "kafka_consumer_lag_messages",
    "Messages in a partition behind the last one this process consumed (highwater - next offset; "
    "a fetch's high watermark, the true end also on the embedded broker; set by shared/consumer.py)",
    ["topic", "partition"],
)
