"""The shared envelope's times are aware: a naive one is refused where the event is made or
read, not later where it meets an aware one."""

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import BaseModel, ValidationError

from shared.events import DeadLetter, Envelope, envelope


class Ping(BaseModel):
    n: int


class Pinged(Envelope[Ping]):
    type: str = "Pinged"


AWARE = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
NAIVE = datetime(2026, 12, 7, 12, 0)


def ping(**times: datetime) -> Pinged:
    return envelope(Pinged, event_id=uuid.uuid4(), occurred_at=times.get("occurred_at", AWARE), producer="test",
                    correlation_id="c", customer_id=None, payload=Ping(n=1), recorded_at=times.get("recorded_at"))


def test_aware_times_in_any_offset_are_accepted_and_keep_their_instant():
    warsaw = AWARE.astimezone(timezone(timedelta(hours=1)))
    event = ping(occurred_at=warsaw, recorded_at=AWARE)
    assert event.occurred_at == AWARE and event.recorded_at == AWARE
    assert ping().recorded_at.tzinfo is not None  # the default: now, aware


@pytest.mark.parametrize("field", ["occurred_at", "recorded_at"])
def test_a_naive_envelope_time_is_refused_when_the_event_is_made(field):
    with pytest.raises(ValidationError, match="timezone_aware|timezone"):
        ping(**{field: NAIVE})


def test_a_naive_time_on_the_wire_is_refused_when_the_event_is_read():
    wire = ping().model_dump(mode="json")
    wire["occurred_at"] = "2026-12-07T12:00:00"
    with pytest.raises(ValidationError) as refused:
        Pinged.model_validate_json(json.dumps(wire))
    assert refused.value.errors()[0]["type"] == "timezone_aware"


def test_a_dead_letter_is_recorded_at_an_aware_time():
    letter = dict(dead_letter_id=uuid.uuid4(), door="kafka", reason="schema", original="{}", producer="test")
    assert DeadLetter(**letter, recorded_at=AWARE).recorded_at == AWARE
    with pytest.raises(ValidationError):
        DeadLetter(**letter, recorded_at=NAIVE)
