"""Kafka plumbing: client options from settings, the FastStream broker, a raw producer."""

import asyncio
import json
import logging
from itertools import chain
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from faststream.kafka import KafkaBroker
from faststream.kafka.subscriber.usecase import BatchSubscriber
from faststream.security import SASLPlaintext, SASLScram256, SASLScram512, BaseSecurity

from shared.settings import ServiceSettings


def _ssl_context(settings: ServiceSettings):
    if settings.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    from aiokafka.helpers import create_ssl_context

    return create_ssl_context(cafile=settings.kafka_ssl_cafile)


def client_options(settings: ServiceSettings) -> dict[str, Any]:
    """Connection options for raw aiokafka clients (admin, producer, consumer)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password,
        )
    ssl_context = _ssl_context(settings)
    if ssl_context is not None:
        options["ssl_context"] = ssl_context
    return options


def _security(settings: ServiceSettings) -> BaseSecurity | None:
    ssl_context = _ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        cls = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}[
            settings.kafka_sasl_mechanism
        ]
        return cls(
            username=settings.kafka_sasl_username or "",
            password=settings.kafka_sasl_password or "",
            ssl_context=ssl_context,
        )
    if ssl_context is not None:
        return BaseSecurity(ssl_context=ssl_context)
    return None


async def _get_batch(self: BatchSubscriber, consumer: AIOKafkaConsumer) -> tuple:
    """FastStream's BatchSubscriber.get_msg without the sleep after an empty poll.

    FastStream waits batch_timeout_ms in getmany and, when nothing came, sleeps as long
    again: records fetched during that sleep wait for it, so batch_timeout_ms had to be a
    few ms, and every idle subscriber woke ~100 times a second for nothing. getmany already
    returns as soon as a fetch brings records, so a long wait costs no latency: only a poll
    that came back empty *early* (the consumer closing) sleeps the rest of its wait, so the
    loop can never spin."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    messages = await consumer.getmany(timeout_ms=self.batch_timeout_ms, max_records=self.max_records)
    if not messages:
        left = self.batch_timeout_ms / 1000 - (loop.time() - started)
        if left > 0:
            await asyncio.sleep(left)
        return ()
    return tuple(chain(*messages.values()))


BatchSubscriber.get_msg = _get_batch  # FastStream 0.7 (requirements.txt pins it); tests/unit check it still applies


class CoalescedCommits:
    """Commits a consumer's offsets at most once per interval instead of once per batch.

    FastStream acks a batch (after the handler's database transaction committed) with
    `consumer.commit()`: a round trip to the broker per batch, which at a few records per
    batch was one OffsetCommit per record or two. Installed on a consumer, `commit()` with no
    arguments takes the consumed offsets at that moment (what it would have committed: the
    batch just applied) and returns; they are committed `interval_s` later, merged with
    those of the batches acked meanwhile. Offsets are still committed only after their
    transaction committed; what a crash or a lost partition loses is at most one interval of
    commits, so those records come again and the inbox drops them. Stopping the consumer
    commits what is pending first."""

    def __init__(self, consumer: AIOKafkaConsumer, interval_s: float) -> None:
        self._consumer = consumer
        self._interval_s = interval_s
        self._commit_now = consumer.commit
        self._stop_now = consumer.stop
        self._pending: dict = {}
        self._timer: asyncio.Task[None] | None = None
        consumer.commit = self.commit  # type: ignore[method-assign]
        consumer.stop = self.stop  # type: ignore[method-assign]

    async def commit(self, offsets: dict | None = None) -> None:
        subscription = self._consumer._subscription.subscription
        assignment = subscription.assignment if subscription is not None else None
        if offsets is not None or assignment is None:
            await self._commit_now(offsets)  # explicit offsets, or the errors commit() raises
            return
        self._pending.update(assignment.all_consumed_offsets())
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._interval_s)
        self._timer = None
        await self.flush(retry=True)

    async def flush(self, *, retry: bool = False) -> None:
        pending, self._pending = self._pending, {}
        assigned = self._consumer.assignment()
        offsets = {tp: offset for tp, offset in pending.items() if tp in assigned}  # a lost partition: its new owner reads again
        if not offsets:
            return
        try:
            await self._commit_now(offsets)
        except Exception as exc:  # e.g. a rebalance in between
            logging.getLogger(__name__).warning("offset commit failed%s", "; trying again" if retry else "",
                                                extra={"error": repr(exc)})
            if retry:  # the same offsets once more, unless a later ack has newer ones
                self._pending = offsets | self._pending
                self._schedule()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            await self.flush()
        finally:
            await self._stop_now()


def coalesce_commits(broker: KafkaBroker, interval_ms: int) -> None:
    """Install CoalescedCommits on every started subscriber's consumer (0: commit every batch)."""
    if interval_ms <= 0:
        return
    for subscriber in broker.subscribers:
        consumer = getattr(subscriber, "consumer", None)
        if consumer is not None and not isinstance(getattr(consumer.commit, "__self__", None), CoalescedCommits):
            CoalescedCommits(consumer, interval_ms / 1000)


def create_broker(settings: ServiceSettings, *, client_id: str, description: str) -> KafkaBroker:
    """The FastStream broker of one service. Nothing connects until `broker.start()`."""
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        client_id=client_id,
        security=_security(settings),
        # The embedded broker cannot do idempotent producers; delivery is at-least-once and
        # consumers de-duplicate by event_id (the inbox).
        enable_idempotence=False,
        acks="all",
        allow_auto_create_topics=False,
        description=description,
        # FastStream logs every consumed message or batch at this level: keep it below INFO so
        # the hot path does not pay for a log line per batch.
        log_level=logging.DEBUG,
    )


async def the_message(message: Any) -> Any:
    """A subscriber decoder that makes the message itself the handler's body: the handler
    reads the raw records (and decodes them itself, so malformed input reaches the dead-letter
    topic instead of failing before the handler), and needs no `Context("message")` parameter.
    FastStream resolves such a parameter with a synchronous function, which fast_depends runs
    in a worker thread: one thread round trip per batch, the "AnyIO worker thread" of every
    profile."""
    return message


def consumer_options(settings: ServiceSettings, *, service: str, purpose: str = "main",
                     bulk: bool = False) -> dict[str, Any]:
    """Subscriber options shared by every consumer: a group, manual-style commits after
    the database transaction, and micro-batches. `bulk` streams may wait longer when idle
    (ServiceSettings.consumer_bulk_fetch_max_wait_ms and consumer_bulk_batch_timeout_ms)."""
    return {
        "group_id": settings.group_id(service, purpose),
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.consumer_session_timeout_ms,
        "heartbeat_interval_ms": settings.consumer_heartbeat_interval_ms,
        "max_records": settings.consumer_batch_max_records,
        "batch_timeout_ms": settings.consumer_bulk_batch_timeout_ms if bulk else settings.consumer_batch_timeout_ms,
        "fetch_max_wait_ms": settings.consumer_bulk_fetch_max_wait_ms if bulk else settings.consumer_fetch_max_wait_ms,
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
    }


def create_producer(settings: ServiceSettings, *, client_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **client_options(settings),
        client_id=client_id,
        acks="all",
        linger_ms=2,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
        compression_type=None,
    )


async def read_topic(settings: ServiceSettings, topic: str, *, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Every record of `topic`, from offset 0 to (at least) its end as of the call,
    partition by partition in offset order; no consumer group (nothing is committed). For the
    small topics a service reads whole when it starts. Raises asyncio.TimeoutError when the
    broker does not answer in time, KeyError when the topic does not exist.

    The end offsets only say when to stop: every record fetched is kept, also past them. The
    embedded broker (Tansu 0.6) under-reports a partition's end when its last record batch
    holds several records (base offset + 1), and a fetch returns whole batches anyway."""
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=50)

    async def read() -> list[ConsumerRecord]:
        await consumer.start()
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer.topics()  # refresh the metadata once
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise KeyError(f"topic {topic} does not exist")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: dict[TopicPartition, list[ConsumerRecord]] = {tp: [] for tp in tps}
        behind = [tp for tp in tps if end[tp] > 0]
        while behind:
            for tp, got in (await consumer.getmany(*behind, timeout_ms=200)).items():
                records[tp].extend(got)
            behind = [tp for tp in behind if await consumer.position(tp) < end[tp]]
        return [r for tp in tps for r in records[tp]]

    try:
        return await asyncio.wait_for(read(), timeout=timeout_s)
    finally:
        await consumer.stop()


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()
