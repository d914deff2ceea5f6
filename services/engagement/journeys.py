"""Journeys as data: the model of the journeys document (journeys.yaml, or an admin's
replacement through the API) and its validation. Pure: no I/O but reading a given file."""

import hashlib
import json
import re
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    model_validator,
)

from shared.events.churn import Quadrant

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> timedelta:
    """"90s", "15m", "1h", "2d", "1w" (or a number of seconds) -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 15m, 1h, 2d, 1w)")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


def format_duration(value: timedelta) -> str:
    """The largest unit that divides it: 2d, 15m, 90s (read back by parse_duration)."""
    seconds = int(value.total_seconds())
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


Duration = Annotated[timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)]

TriggerEvent = Literal["PurchaseRecorded", "PointsEarned", "PointsWillExpire", "TierChanged", "CustomerAtRisk",
                       "CustomerLost", "CustomerRecovered", "SegmentChanged"]
ExitRule = Literal["return", "newer_purchase", "unsubscribe"]


class Trigger(BaseModel):
    """The event that starts a journey and the conditions it must meet (all of them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event: TriggerEvent
    first_purchase: bool | None = None
    min_basket: Decimal | None = None
    max_basket: Decimal | None = None
    categories: tuple[str, ...] | None = None
    channels: tuple[Literal["pos", "eshop"], ...] | None = None
    tiers: tuple[str, ...] | None = Field(None, description="The customer's tier (TierChanged: the new one)")
    direction: Literal["up", "down"] | None = Field(None, description="TierChanged only, by tier_order")
    priorities: tuple[Literal["high", "medium", "low"], ...] | None = Field(None, description="Alerts' priority")
    quadrants: tuple[Quadrant, ...] | None = None
    min_ltv: Decimal | None = None


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    # Counted from the trigger's business time (occurred_at), not from when it was read.
    delay: Duration = timedelta(0)
    # How long after its due time the step is still worth sending; past it, it is dropped
    # as stale (after downtime, or deferred beyond it by caps and quiet hours).
    valid_for: Duration = timedelta(days=3)
    channel: Literal["email", "webhook"] = "email"
    template: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    # Re-checked when due: not_returned skips the step if the trigger's purchase was returned.
    condition: Literal["always", "not_returned"] = "always"
    survey: bool = False
    # False for an acknowledgment the customer expects (the thank-you after a sale): it neither
    # waits for nor counts against the frequency cap. Quiet hours and consent still apply.
    capped: bool = True
    # Points credited through the ledger's adjustment API before the message (win-back).
    incentive_points: int | None = Field(None, gt=0, le=100_000)


class Journey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    description: str = ""
    trigger: Trigger
    steps: tuple[Step, ...] = Field(min_length=1)
    # single: one active instance per customer (a new trigger meanwhile is ignored);
    # always: every trigger starts its own instance (the thank-you after every sale).
    reentry: Literal["single", "always"] = "single"
    exit_on: tuple[ExitRule, ...] = ()
    # For CustomerAtRisk / CustomerLost journeys: skipped unless min_ltv / quadrants say so.

    @model_validator(mode="after")
    def _unique_steps(self) -> "Journey":
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"journey {self.name}: step names repeat")
        return self


class JourneysDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Lowest first: TierChanged's direction is read from it.
    tier_order: tuple[str, ...] = ("Bronze", "Silver", "Gold")
    journeys: tuple[Journey, ...]

    @model_validator(mode="after")
    def _unique_names(self) -> "JourneysDocument":
        names = [j.name for j in self.journeys]
        if len(set(names)) != len(names):
            raise ValueError("journey names repeat")
        return self

    def by_name(self, name: str) -> Journey | None:
        return next((j for j in self.journeys if j.name == name), None)

    def canonical(self) -> dict:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()


def load_file(path: Path) -> JourneysDocument:
    return JourneysDocument.model_validate(yaml.safe_load(path.read_text()))


def parse_document(text: str) -> JourneysDocument:
    """YAML (or JSON, which is YAML) text -> a validated document; ValueError if it is not one."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML: {exc}") from None
    return JourneysDocument.model_validate(data)
