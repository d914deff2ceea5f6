"""Settings every service shares; each service subclasses with its own env prefix."""

from datetime import timedelta
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Common settings. A service sets `model_config = SettingsConfigDict(env_prefix="X_")`."""

    model_config = SettingsConfigDict(env_prefix="LOYALTY_", extra="ignore")

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    # SASL/TLS for a real cluster; PLAINTEXT for the embedded broker.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: str | None = None
    # Prefix for every topic name: lets tests and several environments share one cluster.
    topic_prefix: str = ""
    topic_partitions: int = Field(default=4, ge=1)
    consumer_group_prefix: str = "loyalty"
    consumer_session_timeout_ms: int = 10_000
    consumer_heartbeat_interval_ms: int = 3_000
    consumer_batch_max_records: int = Field(default=1000, ge=1)
    # How long the broker may hold an idle fetch. The embedded broker answers an idle fetch
    # only at this wait, so it bounds the latency of a quiet stream (aiokafka's default: 500).
    # Saga consumers (a customer waits on them) use consumer_fetch_max_wait_ms; bulk streams
    # (purchases.raw, purchases.recorded) the longer wait: under load a fetch finds data at
    # once anyway, and every idle fetch costs the broker CPU (about 1 ms each for Tansu; at
    # 20 ms a handful of idle consumers kept ~40% of a core busy).
    consumer_fetch_max_wait_ms: int = 20
    consumer_bulk_fetch_max_wait_ms: int = 100
    # Idle mode (shared/consumer.py): a consumer that read nothing for consumer_idle_after_ms
    # pauses its partitions (no fetch at all) and asks once per idle poll, with one ListOffsets
    # request, whether anything came. Measured (bench.idle, five services): fetching every wait
    # costs 28% of a core idle; idle mode 3.8-4.5%. The price: the first record after a quiet
    # spell waits up to one idle poll on each hop (250 ms on a saga lane, 2 s on a bulk one; a
    # service that sends a request wakes the lane its answer comes on). 0 = never idle.
    consumer_idle_after_ms: int = Field(default=2000, ge=0)
    consumer_idle_poll_ms: int = Field(default=250, ge=0)
    consumer_bulk_idle_poll_ms: int = Field(default=2000, ge=0)
    # A consumer commits its offsets (always after the batch's transaction committed) at most
    # once per this interval rather than once per batch (shared/consumer.py ConsumerLoop): an
    # OffsetCommit costs both the service and the broker about as much as a fetch. After a
    # crash or a rebalance at most this much is read again; the inbox drops the repeats.
    # 0: commit every batch at once.
    consumer_commit_interval_ms: int = Field(default=250, ge=0)
    # Bounded retries before a message that fails processing goes to the dead-letter topic.
    max_delivery_attempts: int = Field(default=5, ge=1)

    database_url: str = "postgresql://loyalty@127.0.0.1:5432/loyalty"
    database_pool_min: int = 1
    database_pool_max: int = 8

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    # The request line and headers together: past this, 431 and the connection is closed
    # (shared/http_protocol.py). Bodies have their own limit (max_body_bytes, 413).
    max_head_bytes: int = Field(default=32 * 1024, ge=4096)

    # Inbox retention (shared/inbox.py): an event id is kept for as long as its topic can
    # deliver it again, plus a margin (consumers lagging, clocks). topic_retention_days is
    # what the cluster keeps (retention.ms; Kafka's default is 7 days); 0 = the topics are
    # kept forever, and so is the inbox.
    topic_retention_days: float = Field(default=7.0, ge=0)
    inbox_retention_margin_days: float = Field(default=7.0, ge=0)
    inbox_sweep_interval_s: float = Field(default=3600.0, gt=0)
    inbox_sweep_chunk_rows: int = Field(default=5000, ge=1)

    outbox_batch_size: int = 2000
    # Every commit in this process wakes its relay at once; the poll only finds rows a relay
    # was not woken for (another instance's, or left by a crash), so it can be slow.
    outbox_poll_interval_ms: int = 1000

    log_level: str = "INFO"
    log_json: bool = True

    def inbox_keep_for(self) -> timedelta | None:
        """How long inbox rows are kept (None: forever)."""
        if self.topic_retention_days == 0:
            return None
        return timedelta(days=self.topic_retention_days + self.inbox_retention_margin_days)

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group_id(self, service: str, purpose: str = "main") -> str:
        return f"{self.consumer_group_prefix}.{service}.{purpose}"
