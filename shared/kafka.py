"""Kafka plumbing: client options from settings, the FastStream broker (it describes the
topics for AsyncAPI; consuming is shared/consumer.py's), a raw producer, reading a topic whole."""

import asyncio
import json
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from faststream.kafka import KafkaBroker
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
