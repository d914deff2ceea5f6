"""Kafka plumbing: client options from settings, the FastStream broker, a raw producer."""

import json
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
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


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()
