"""Engagement's pure rules: what an event says (facts), which journeys it starts, and the
respect rules deciding at send time whether a touchpoint goes now, later, or not at all."""

import uuid
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.engagement.journeys import Journey, JourneysDocument, Step
from shared.events import derived_event_id


@dataclass(frozen=True, slots=True)
class Facts:
    """What the journeys need from one incoming event."""

    event_id: uuid.UUID
    event_type: str
    customer_id: str
    occurred_at: datetime
    history: bool = False
    purchase_id: str | None = None
    source: str | None = None
    store_id: str | None = None
    category: str | None = None
    basket: Decimal | None = None
    tier: str | None = None
    from_tier: str | None = None
    priority: str | None = None
    quadrant: str | None = None
    ltv: Decimal | None = None
    first_purchase: bool = False
    context: dict[str, Any] = field(default_factory=dict)


def journeys_started(doc: JourneysDocument, facts: Facts) -> list[Journey]:
    """The journeys this event starts. History never starts one."""
    if facts.history:
        return []
    return [j for j in doc.journeys if j.trigger.event == facts.event_type and trigger_matches(doc, j, facts)]


def trigger_matches(doc: JourneysDocument, journey: Journey, f: Facts) -> bool:
    t = journey.trigger
    if t.first_purchase is not None and t.first_purchase != f.first_purchase:
        return False
    if t.min_basket is not None and (f.basket is None or f.basket < t.min_basket):
        return False
    if t.max_basket is not None and (f.basket is None or f.basket > t.max_basket):
        return False
    if t.categories is not None and f.category not in t.categories:
        return False
    if t.channels is not None and f.source not in t.channels:
        return False
    if t.tiers is not None and f.tier not in t.tiers:
        return False
    if t.direction is not None and tier_direction(doc, f.from_tier, f.tier) != t.direction:
        return False
    if t.priorities is not None and f.priority not in t.priorities:
        return False
    if t.quadrants is not None and f.quadrant not in t.quadrants:
        return False
    if t.min_ltv is not None and (f.ltv is None or f.ltv < t.min_ltv):
        return False
    return True


def tier_direction(doc: JourneysDocument, from_tier: str | None, to_tier: str | None) -> str | None:
    order = {name: n for n, name in enumerate(doc.tier_order)}
    if from_tier not in order or to_tier not in order or from_tier == to_tier:
        return None
    return "up" if order[to_tier] > order[from_tier] else "down"


def timer_id(journey: str, trigger_event_id: uuid.UUID, step: str) -> uuid.UUID:
    """The idempotency key of a touchpoint: the same trigger never schedules a step twice."""
    return derived_event_id("engagement", "timer", journey, str(trigger_event_id), step)


def instance_id(journey: str, trigger_event_id: uuid.UUID) -> uuid.UUID:
    return derived_event_id("engagement", "instance", journey, str(trigger_event_id))


@dataclass(frozen=True, slots=True)
class PlannedStep:
    timer_id: uuid.UUID
    step: Step
    due_at: datetime
    valid_until: datetime


def plan(journey: Journey, facts: Facts) -> list[PlannedStep]:
    """Each step's due time counts from the trigger's business time."""
    out = []
    for step in journey.steps:
        due = facts.occurred_at + step.delay
        out.append(PlannedStep(timer_id(journey.name, facts.event_id, step.name), step, due, due + step.valid_for))
    return out


# ---- respect rules at send time ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Respect:
    cap_interval: timedelta = timedelta(hours=16)
    cap_per_week: int = 4
    quiet_start: int = 21
    quiet_end: int = 8
    survey_interval: timedelta = timedelta(days=30)


@dataclass(slots=True)
class History:
    """What was sent to one customer on one channel: capped messages' times, last survey."""

    capped_sent: list[datetime] = field(default_factory=list)
    last_survey_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Literal["send", "defer", "skip"]
    reason: str
    until: datetime | None = None


def zone(name: str | None, default: str) -> ZoneInfo:
    for candidate in (name, default):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def in_quiet_hours(moment: datetime, tz: ZoneInfo, rules: Respect) -> bool:
    hour = moment.astimezone(tz).hour
    if rules.quiet_start == rules.quiet_end:
        return False
    if rules.quiet_start > rules.quiet_end:  # across midnight, e.g. 21-08
        return hour >= rules.quiet_start or hour < rules.quiet_end
    return rules.quiet_start <= hour < rules.quiet_end


def quiet_end_after(moment: datetime, tz: ZoneInfo, rules: Respect) -> datetime:
    """The first moment at or after `moment` outside quiet hours (the end hour, local time)."""
    local = moment.astimezone(tz)
    candidate = datetime.combine(local.date(), time(rules.quiet_end), tzinfo=tz)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), time(rules.quiet_end), tzinfo=tz)
    # a DST jump may put the end hour itself in the gap; fold forward an hour until outside
    while in_quiet_hours(candidate, tz, rules):
        candidate += timedelta(hours=1)
    return candidate.astimezone(moment.tzinfo)


def earliest_allowed(now: datetime, step: Step, history: History, rules: Respect) -> datetime:
    """The first time the frequency caps allow this step (now, if they do already)."""
    if not step.capped:
        return now
    t = now
    if history.capped_sent:
        t = max(t, max(history.capped_sent) + rules.cap_interval)
        week = sorted(s for s in history.capped_sent if s > t - timedelta(days=7))
        # At most cap_per_week in any 7 days: wait until enough of them leave the window.
        while len(week) >= rules.cap_per_week:
            t = max(t, week[len(week) - rules.cap_per_week] + timedelta(days=7))
            week = [s for s in week if s > t - timedelta(days=7)]
    return t


def decide(*, now: datetime, step: Step, valid_until: datetime, consent: bool, reachable: bool,
           tz: ZoneInfo, history: History, rules: Respect, condition_holds: bool = True) -> Decision:
    """Send now, defer (within the validity window) or skip, and why. Order matters: a
    touchpoint without consent is never deferred; one past its window is stale."""
    if not condition_holds:
        return Decision("skip", "condition_false")
    if not reachable:
        return Decision("skip", "no_contact")
    if not consent:
        return Decision("skip", "no_consent")
    if now > valid_until:
        return Decision("skip", "stale")
    if step.survey and history.last_survey_at is not None and now - history.last_survey_at < rules.survey_interval:
        return Decision("skip", "survey_cap")
    t = earliest_allowed(now, step, history, rules)
    reason = "frequency_cap" if t > now else ""
    if in_quiet_hours(t, tz, rules):
        t = quiet_end_after(t, tz, rules)
        reason = reason or "quiet_hours"
        # leaving quiet hours later never breaks a cap the earlier time met
    if t > now:
        if t > valid_until:
            return Decision("skip", f"expired_while_deferred:{reason}")
        return Decision("defer", reason, t)
    return Decision("send", "sent")


def record_sent(history: History, step: Step, at: datetime) -> None:
    """Update the in-memory history after a send (several touchpoints of one customer in one batch)."""
    if step.capped:
        history.capped_sent.append(at)
    if step.survey:
        history.last_survey_at = at


def is_detractor(*, nps: int | None, csat: int | None, max_nps: int, max_csat: int) -> bool:
    return (nps is not None and nps <= max_nps) or (csat is not None and csat <= max_csat)
