"""Engagement's use cases on incoming events and on customers' data: starting and ending
journeys, contact data and consent, erasure. The dispatcher (sending what is due) is in
dispatch.py, surveys and complaints in feedback.py."""

import dataclasses
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from services.engagement import domain as d
from services.engagement import metrics as m
from services.engagement import repository as repo
from services.engagement.channels import EmailChannel, Templates, WebhookChannel
from services.engagement.journeys import JourneysDocument, load_file, parse_document
from services.engagement.settings import EngagementSettings
from shared.errors import TransientError
from shared.events import derived_event_id, envelope, utcnow
from shared.events.engagement import (
    ConsentChanged,
    ConsentChangedPayload,
    TouchpointSkipped,
    TouchpointSkippedPayload,
)
from shared.outbox import OutboxMessage
from shared.topics import ENGAGEMENT_EVENTS

log = logging.getLogger(__name__)

PRODUCER = "engagement"
Clock = Callable[[], datetime]


def make_clock(settings: EngagementSettings) -> Clock:
    if settings.clock_override is not None:
        fixed = settings.clock_override if settings.clock_override.tzinfo else settings.clock_override.replace(
            tzinfo=UTC)
        return lambda: fixed
    if settings.clock_offset_s:
        offset = timedelta(seconds=settings.clock_offset_s)
        return lambda: utcnow() + offset
    return utcnow


class JourneysNotLoaded(TransientError):
    """Retried by the pipeline until the journeys are loaded; never a dead letter."""


@dataclass
class JourneyBook:
    """The journeys in force (the latest version) and the versions timers were planned under."""

    file: Any
    current: JourneysDocument | None = None
    version: int = 0
    versions: dict[int, JourneysDocument] = field(default_factory=dict)

    async def load(self, conn: asyncpg.Connection) -> None:
        """At start: the file becomes a new version when it differs from the last file version."""
        doc = load_file(self.file)
        async with conn.transaction():
            last_file = await repo.latest_journeys(conn, source="file")
            if last_file is None or last_file["digest"] != doc.digest():
                await repo.save_journeys(conn, document=doc.canonical(), digest=doc.digest(), source="file",
                                         actor=str(self.file))
        await self.refresh(conn)

    async def refresh(self, conn: asyncpg.Connection) -> None:
        latest = await repo.latest_journeys(conn)
        if latest is not None and latest["version"] != self.version:
            self.current = self._parse(latest)
            self.version = latest["version"]
            self.versions[self.version] = self.current

    async def of_version(self, conn: asyncpg.Connection, version: int) -> JourneysDocument | None:
        if version not in self.versions:
            row = await repo.journeys_version(conn, version)
            if row is None:
                return None
            self.versions[version] = self._parse(row)
        return self.versions[version]

    @staticmethod
    def _parse(row: asyncpg.Record) -> JourneysDocument:
        return JourneysDocument.model_validate_json(row["document"])

    async def replace(self, conn: asyncpg.Connection, text: str, *, actor: str) -> int:
        doc = parse_document(text)  # ValueError / ValidationError -> 422 in the API
        version = await repo.save_journeys(conn, document=doc.canonical(), digest=doc.digest(), source="admin",
                                           actor=actor)
        return version


@dataclass
class Engagement:
    """What every use case needs."""

    settings: EngagementSettings
    clock: Clock
    journeys: JourneyBook
    templates: Templates
    email: EmailChannel
    webhook: WebhookChannel

    @property
    def respect(self) -> d.Respect:
        s = self.settings
        return d.Respect(cap_interval=timedelta(hours=s.cap_interval_h), cap_per_week=s.cap_per_week,
                         quiet_start=s.quiet_start_hour, quiet_end=s.quiet_end_hour,
                         survey_interval=timedelta(days=s.survey_interval_days))

    def topic(self) -> str:
        return self.settings.topic(ENGAGEMENT_EVENTS)


def event_message(engine: Engagement, cls, *, event_id: uuid.UUID, customer_id: str, payload, occurred_at: datetime,
                  correlation_id: str, causation_id: str | None = None) -> OutboxMessage:
    event = envelope(cls, event_id=event_id, occurred_at=occurred_at, producer=PRODUCER,
                     correlation_id=correlation_id, causation_id=causation_id, customer_id=customer_id,
                     payload=payload, recorded_at=engine.clock())
    return OutboxMessage.event(engine.topic(), event, key=customer_id)


def skipped_message(engine: Engagement, timer: asyncpg.Record, reason: str, channel: str | None) -> OutboxMessage:
    payload = TouchpointSkippedPayload(touchpoint_id=timer["timer_id"], journey=timer["journey"],
                                       journey_version=timer["journey_version"], step=timer["step"],
                                       channel=channel, trigger_event_id=timer["trigger_event_id"], reason=reason)
    return event_message(engine, TouchpointSkipped, event_id=derived_event_id("engagement", "skipped",
                                                                              str(timer["timer_id"])),
                         customer_id=timer["customer_id"], payload=payload, occurred_at=engine.clock(),
                         correlation_id=str(timer["trigger_event_id"]))


# ---- events -> journeys ------------------------------------------------------------------------

async def on_facts(conn: asyncpg.Connection, engine: Engagement, facts: d.Facts,
                   publish: Callable[..., None]) -> None:
    """Start the journeys this event starts (planning their steps as timers)."""
    doc, version = engine.journeys.current, engine.journeys.version
    if doc is None:
        # First start: consumers may read before the start hook stored the file's version.
        raise JourneysNotLoaded("journeys not loaded yet")
    now = engine.clock()
    started: list[uuid.UUID] = []
    for journey in d.journeys_started(doc, facts):
        instance = d.instance_id(journey.name, facts.event_id)
        if not await repo.start_instance(conn, instance_id=instance, customer_id=facts.customer_id,
                                         journey=journey.name, version=version, trigger_event_id=facts.event_id,
                                         purchase_id=facts.purchase_id, single=journey.reentry == "single", now=now):
            m.JOURNEYS.labels(journey.name, "already_active").inc()
            continue
        m.JOURNEYS.labels(journey.name, "started").inc()
        started.append(instance)
        context = {k: v for k, v in facts.context.items() if v is not None}
        await repo.insert_timers(conn, [
            (p.timer_id, instance, facts.customer_id, journey.name, version, p.step.name, facts.event_id,
             facts.purchase_id, facts.source, p.due_at, p.valid_until, "scheduled", _json(context), now)
            for p in d.plan(journey, facts)])


async def exit_journeys(conn: asyncpg.Connection, engine: Engagement, *, customer_id: str, rule: str,
                        publish: Callable[..., None], purchase_id: str | None = None,
                        keep_purchase_id: str | None = None) -> int:
    """End the customer's active instances of the journeys that exit on `rule`; their
    scheduled steps are skipped (TouchpointSkipped, reason exited:<rule>)."""
    doc = engine.journeys.current
    if doc is None:
        raise JourneysNotLoaded("journeys not loaded yet")
    names = [j.name for j in doc.journeys if rule in j.exit_on]
    if not names:
        return 0
    rows = await repo.active_instances(conn, customer_id=customer_id, journeys=names, purchase_id=purchase_id)
    ids = [r["instance_id"] for r in rows if keep_purchase_id is None or r["purchase_id"] != keep_purchase_id]
    timers = await repo.end_instances(conn, instance_ids=ids, status="exited", reason=f"exited:{rule}",
                                      now=engine.clock())
    for timer in timers:
        publish(skipped_message(engine, timer, f"exited:{rule}", None))
        m.DECISIONS.labels(timer["journey"], "skipped", f"exited:{rule}").inc()
    await repo.record_decisions(conn, [(t["timer_id"], engine.clock(), "skipped", f"exited:{rule}", None)
                                       for t in timers])
    for r in rows:
        if r["instance_id"] in ids:
            m.JOURNEYS.labels(r["journey"], "exited").inc()
    return len(ids)


async def sale_recorded(conn: asyncpg.Connection, engine: Engagement, facts: d.Facts, *, total: Decimal,
                        currency: str, publish: Callable[..., None]) -> None:
    count = await repo.count_purchase(conn, customer_id=facts.customer_id, occurred_at=facts.occurred_at)
    await repo.insert_sale(conn, purchase_id=facts.purchase_id, source=facts.source, customer_id=facts.customer_id,
                           store_id=facts.store_id, category=facts.category, total=total, currency=currency,
                           occurred_at=facts.occurred_at)
    if facts.history:
        return  # counted (a customer with a past is not new), but never news for them
    await exit_journeys(conn, engine, customer_id=facts.customer_id, rule="newer_purchase", publish=publish,
                        keep_purchase_id=facts.purchase_id)
    facts = dataclasses.replace(facts, first_purchase=count == 1)
    await on_facts(conn, engine, facts, publish)


async def return_recorded(conn: asyncpg.Connection, engine: Engagement, *, customer_id: str,
                          original_purchase_id: str | None, source: str, publish: Callable[..., None]) -> None:
    if original_purchase_id is None:
        return
    await repo.mark_returned(conn, purchase_id=original_purchase_id, source=source)
    await exit_journeys(conn, engine, customer_id=customer_id, rule="return", publish=publish,
                        purchase_id=original_purchase_id)


def _json(value: dict) -> str:
    return json.dumps(value, default=str)


# ---- contact data and consent ------------------------------------------------------------------

@dataclass(frozen=True)
class ContactChange:
    email: str | None
    phone: str | None
    locale: str | None
    time_zone: str | None
    consent: dict[str, bool]
    source: str


async def set_contact(conn: asyncpg.Connection, engine: Engagement, customer_id: str,
                      change: ContactChange) -> list[OutboxMessage]:
    """Contact data replaced; consent changed only for the channels named. Each change of
    consent is a ConsentChanged (without contact data); a revocation stops journeys."""
    now = engine.clock()
    await repo.set_contact(conn, customer_id=customer_id, email=change.email, phone=change.phone,
                           locale=change.locale, time_zone=change.time_zone, now=now)
    return await change_consent(conn, engine, customer_id, change.consent, source=change.source)


async def change_consent(conn: asyncpg.Connection, engine: Engagement, customer_id: str,
                         wanted: dict[str, bool], *, source: str) -> list[OutboxMessage]:
    now = engine.clock()
    await repo.ensure_customer(conn, customer_id)
    current = await repo.consents(conn, customer_id)
    messages: list[OutboxMessage] = []
    revoked = False
    for channel, granted in sorted(wanted.items()):
        if channel in current and current[channel]["granted"] == granted:
            continue
        await repo.set_consent(conn, customer_id=customer_id, channel=channel, granted=granted, source=source,
                               now=now)
        m.CONSENT_CHANGES.labels(channel, "granted" if granted else "revoked", source).inc()
        revoked = revoked or not granted
        payload = ConsentChangedPayload(channel=channel, granted=granted, source=source, changed_at=now)
        messages.append(event_message(engine, ConsentChanged, event_id=uuid.uuid4(), customer_id=customer_id,
                                      payload=payload, occurred_at=now, correlation_id=f"consent:{customer_id}"))
    if revoked:
        await exit_journeys(conn, engine, customer_id=customer_id, rule="unsubscribe", publish=messages.append)
    return messages


async def erase_customer(conn: asyncpg.Connection, engine: Engagement, customer_id: str) -> list[OutboxMessage]:
    """The right to erasure: contact data and consent gone, personal content of messages and
    answers removed, pending touchpoints skipped (reason erased)."""
    now = engine.clock()
    rows = await conn.fetch("SELECT instance_id FROM journey_instances WHERE customer_id = $1 AND status = 'active'",
                            customer_id)
    timers = await repo.end_instances(conn, instance_ids=[r["instance_id"] for r in rows], status="exited",
                                      reason="erased", now=now)
    await repo.erase_customer(conn, customer_id=customer_id, now=now)
    m.ERASURES.inc()
    return [skipped_message(engine, t, "erased", None) for t in timers]
