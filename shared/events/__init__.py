"""The event envelope and the event models of every stream. JSON on the wire; money is a
decimal string plus an ISO 4217 code; points are integers."""

import hashlib
import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

def _not_a_sequence(value: Any) -> Any:
    # pydantic would read a JSON array as a Decimal tuple: [0, [1, 2, 5], -1] is 12.5
    if isinstance(value, (list, tuple)):
        raise ValueError("an amount must be a decimal string or a number")
    return value


# Decimals travel as strings ("12.50"), never as JSON numbers.
Money = Annotated[Decimal, BeforeValidator(_not_a_sequence),
                  PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json")]

SCHEMA_VERSION = 1
EVENT_NAMESPACE = uuid.UUID("6f1c1a52-5a38-4c39-9a3c-2f1f4f0a7c11")

PayloadT = TypeVar("PayloadT", bound=BaseModel)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


_NAMESPACE_BYTES = EVENT_NAMESPACE.bytes


def derived_event_id(*parts: str) -> uuid.UUID:
    """A deterministic event id: the same cause always yields the same id, so a re-emitted
    event is recognised downstream as the one already processed.

    Exactly uuid.uuid5(EVENT_NAMESPACE, "\x1f".join(parts)), computed directly: hot paths
    derive several ids per event and uuid5 spends most of its time outside the hash."""
    digest = hashlib.sha1(_NAMESPACE_BYTES + "\x1f".join(parts).encode()).digest()
    return uuid.UUID(bytes=digest[:16], version=5)


# Hot paths write some events from templates instead of building and serialising pydantic
# models (several times cheaper). Every string from outside goes through the C JSON string
# encoder, ASCII-only, so no value can break the document; each template has a unit test
# holding it to the contract model, hostile strings included.
json_str = json.encoder.encode_basestring_ascii  # a JSON string literal, quotes included


def json_opt_str(value: str | None) -> str:
    return "null" if value is None else json_str(value)


class Envelope(BaseModel, Generic[PayloadT]):
    """Every event on every topic."""

    model_config = ConfigDict(frozen=True)

    event_id: uuid.UUID
    type: str
    schema_version: int = SCHEMA_VERSION
    # Aware only: a naive time means a different instant in every process that reads it (and
    # fails later, comparing with an aware one); refused here, where the event is made or read.
    occurred_at: AwareDatetime
    recorded_at: AwareDatetime
    producer: str
    correlation_id: str
    causation_id: str | None = None
    customer_id: str | None
    payload: PayloadT


class DeadLetter(BaseModel):
    """What a `.dlq` topic carries: the original input, why it was refused and where from."""

    dead_letter_id: uuid.UUID
    door: str
    reason: str
    errors: list[dict[str, Any]] = []
    original: str = Field(description="The original payload, verbatim (decoded as UTF-8 with replacement)")
    original_key: str | None = None
    original_topic: str | None = None
    original_partition: int | None = None
    original_offset: int | None = None
    producer: str
    recorded_at: AwareDatetime


def envelope(
    cls: type[Envelope[Any]],
    *,
    event_id: uuid.UUID,
    occurred_at: datetime,
    producer: str,
    correlation_id: str,
    customer_id: str | None,
    payload: BaseModel,
    causation_id: str | None = None,
    recorded_at: datetime | None = None,
) -> Envelope[Any]:
    return cls(
        event_id=event_id,
        occurred_at=occurred_at,
        recorded_at=recorded_at or utcnow(),
        producer=producer,
        correlation_id=correlation_id,
        causation_id=causation_id,
        customer_id=customer_id,
        payload=payload,
    )
