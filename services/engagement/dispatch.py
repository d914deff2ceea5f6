"""The dispatcher: claims due touchpoints (FOR UPDATE SKIP LOCKED on the due index),
re-checks each step's condition, consent, caps and quiet hours, sends, and records the
outcome in the same transaction as the claim's completion.

A crash after a send and before the commit leaves the row scheduled: it is sent once more
after the restart, with the same idempotency key (Message-ID / Idempotency-Key)."""

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import httpx

from services.engagement import domain as d
from services.engagement import metrics as m
from services.engagement import repository as repo
from services.engagement import tokens
from services.engagement.channels import DeliveryError, Outgoing, language
from services.engagement.journeys import Step
from services.engagement.service import Engagement, event_message, skipped_message
from shared.db import transaction
from shared.events import derived_event_id
from shared.events.engagement import TouchpointSent, TouchpointSentPayload
from shared.outbox import OutboxMessage, enqueue

log = logging.getLogger(__name__)


@dataclass
class Pending:
    timer: asyncpg.Record
    step: Step
    outgoing: Outgoing
    variables: dict
    error: str | None = None


def links(engine: Engagement, customer_id: str, channel: str) -> tuple[str, str, str]:
    s = engine.settings
    secret = s.link_secret.get_secret_value()
    unsub = tokens.sign(secret, "unsubscribe", {"c": customer_id, "ch": channel})
    complaint = tokens.sign(secret, "complaint", {"c": customer_id},
                            expires_at=engine.clock() + timedelta(days=365))
    base = s.public_base_url.rstrip("/")
    return f"{base}/u/{unsub}", f"{base}/u/{unsub}", f"{base}/c/{complaint}"


def survey_url(engine: Engagement, survey_id: uuid.UUID, expires_at: datetime) -> str:
    token = tokens.sign(engine.settings.link_secret.get_secret_value(), "survey", {"s": str(survey_id)},
                        expires_at=expires_at)
    return f"{engine.settings.public_base_url.rstrip('/')}/s/{token}"


async def dispatch_due(pool: asyncpg.Pool, engine: Engagement) -> int:
    """One round: claim up to dispatch_batch due touchpoints and settle each. Returns how many
    were claimed (the caller loops while a round was full)."""
    now = engine.clock()
    async with pool.acquire() as conn:
        async with transaction(conn):
            timers = await repo.claim_due(conn, now=now, limit=engine.settings.dispatch_batch)
            if not timers:
                return 0
            messages = await _settle(conn, engine, timers, now)
            await enqueue(conn, messages)
    return len(timers)


async def _settle(conn: asyncpg.Connection, engine: Engagement, timers: list[asyncpg.Record],
                  now: datetime) -> list[OutboxMessage]:
    s, rules = engine.settings, engine.respect
    ids = [t["customer_id"] for t in timers]
    customers = await repo.lock_customers(conn, ids)
    consents = await repo.consents_of(conn, ids)
    histories: dict[tuple[str, str], d.History] = {}
    for r in await repo.recent_messages(conn, ids, now - max(timedelta(days=7), rules.survey_interval)):
        h = histories.setdefault((r["customer_id"], r["channel"]), d.History())
        if r["capped"] and r["sent_at"] > now - timedelta(days=7):
            h.capped_sent.append(r["sent_at"])
        if r["survey"] and (h.last_survey_at is None or r["sent_at"] > h.last_survey_at):
            h.last_survey_at = r["sent_at"]
    sales = await repo.sales_of(conn, [(t["customer_id"], t["purchase_id"]) for t in timers if t["purchase_id"]])
    out: list[OutboxMessage] = []
    completed, rescheduled, decisions, pending = [], [], [], []
    for timer in timers:
        doc = await engine.journeys.of_version(conn, timer["journey_version"])
        journey = doc.by_name(timer["journey"]) if doc else None
        step = next((x for x in journey.steps if x.name == timer["step"]), None) if journey else None
        if step is None:  # a version that lost the step: nothing to send
            completed.append((timer["timer_id"], "skipped", "step_unknown", now))
            decisions.append((timer["timer_id"], now, "skipped", "step_unknown", None))
            out.append(skipped_message(engine, timer, "step_unknown", None))
            continue
        customer = customers.get(timer["customer_id"])
        channel_consent = "email" if step.channel == "email" else "sms"
        address = (customer["email"] if step.channel == "email" else customer["phone"]) if customer else None
        sold = sales.get((timer["customer_id"], timer["purchase_id"]))
        holds = step.condition != "not_returned" or not (sold and sold["returned"])
        history = histories.setdefault((timer["customer_id"], step.channel), d.History())
        decision = d.decide(now=now, step=step, valid_until=timer["valid_until"],
                            consent=consents.get((timer["customer_id"], channel_consent), False),
                            reachable=bool(address), tz=d.zone(customer["time_zone"] if customer else None,
                                                               s.default_time_zone),
                            history=history, rules=rules, condition_holds=holds)
        m.DECISIONS.labels(timer["journey"], decision.kind, decision.reason).inc()
        decisions.append((timer["timer_id"], now, decision.kind, decision.reason, decision.until))
        if decision.kind == "skip":
            completed.append((timer["timer_id"], "skipped", decision.reason, now))
            out.append(skipped_message(engine, timer, decision.reason, step.channel))
        elif decision.kind == "defer":
            rescheduled.append((timer["timer_id"], decision.until, timer["attempts"], decision.reason))
        else:
            d.record_sent(history, step, now)
            pending.append(_outgoing(engine, timer, step, customer, address, now, sold))
    await _incentives(engine, [p for p in pending if p.step.incentive_points])
    await _send_all(engine, [p for p in pending if p.error is None])
    sent_rows, touches = [], []
    for p in pending:
        t = p.timer
        if p.error is None:
            completed.append((t["timer_id"], "sent", None, now))
            sent_rows.append((t["timer_id"], t["customer_id"], p.step.channel, t["journey"], t["step"], p.step.capped,
                              p.step.survey, now, p.outgoing.rendered.subject, p.outgoing.rendered.body))
            if t["purchase_id"]:
                touches.append((t["customer_id"], t["purchase_id"], now))
            m.DISPATCH_LAG.observe(max(0.0, (now - t["due_at"]).total_seconds()))
            out.append(_sent_message(engine, t, p.step, now))
            continue
        attempts = t["attempts"] + 1
        if attempts >= s.delivery_max_attempts:
            completed.append((t["timer_id"], "failed", p.error[:500], now))
            decisions.append((t["timer_id"], now, "failed", p.error[:500], None))
            m.DECISIONS.labels(t["journey"], "failed", "delivery_failed").inc()
            out.append(skipped_message(engine, t, "failed", p.step.channel))
        else:
            retry_at = now + timedelta(seconds=s.delivery_backoff_s * 2 ** (attempts - 1))
            rescheduled.append((t["timer_id"], retry_at, attempts, "retry"))
            decisions.append((t["timer_id"], now, "retry", p.error[:500], retry_at))
            m.DECISIONS.labels(t["journey"], "retry", "delivery_failed").inc()
    survey_rows = [(p.timer["timer_id"], p.timer["customer_id"], p.timer["journey"], p.timer["purchase_id"],
                    *_survey_place(p), now, now + timedelta(days=s.survey_link_valid_days))
                   for p in pending if p.error is None and p.step.survey]
    if survey_rows:
        await conn.executemany(
            """INSERT INTO surveys (survey_id, customer_id, journey, purchase_id, store_id, category, sent_at,
                 expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING""", survey_rows)
    await repo.complete_timers(conn, completed)
    await repo.reschedule_timers(conn, rescheduled)
    await repo.record_decisions(conn, decisions)
    await repo.insert_messages(conn, sent_rows)
    await repo.first_touch(conn, touches)
    finished = list({t["instance_id"] for t in timers})
    await repo.finish_instances_without_timers(conn, finished, now)
    return out


def _survey_place(p: "Pending") -> tuple[str | None, str | None]:
    return p.variables.get("store_id"), p.variables.get("category")


def _outgoing(engine: Engagement, timer: asyncpg.Record, step: Step, customer: asyncpg.Record, address: str,
              now: datetime, sold: asyncpg.Record | None) -> Pending:
    s = engine.settings
    variables = repo.json_context(timer["context"])
    if sold is not None:  # the trigger may have been read before its sale (another topic)
        variables.setdefault("store_id", sold["store_id"])
        variables.setdefault("category", sold["category"])
    if step.survey:
        variables["survey_url"] = survey_url(engine, timer["timer_id"], now + timedelta(days=s.survey_link_valid_days))
    if step.incentive_points:
        variables["incentive_points"] = step.incentive_points
    unsubscribe_page, unsubscribe_post, complaint = links(engine, timer["customer_id"],
                                                         "email" if step.channel == "email" else "sms")
    rendered = engine.templates.render(step.template, language(customer["locale"], s.default_locale), variables,
                                       unsubscribe_url=unsubscribe_page, complaint_url=complaint)
    return Pending(timer, step, Outgoing(timer["timer_id"], timer["customer_id"],
                                         address if step.channel == "email" else None,
                                         address if step.channel != "email" else None,
                                         rendered, unsubscribe_page, unsubscribe_post), variables)


async def _send_all(engine: Engagement, pending: list[Pending]) -> None:
    gate = asyncio.Semaphore(engine.settings.dispatch_concurrency)

    async def one(p: Pending) -> None:
        channel = engine.email if p.step.channel == "email" else engine.webhook
        async with gate:
            try:
                await channel.send(p.outgoing)
                m.DELIVERIES.labels(p.step.channel, "delivered").inc()
            except DeliveryError as exc:
                p.error = str(exc) or "delivery_failed"
                m.DELIVERIES.labels(p.step.channel, "failed").inc()
                log.warning("delivery failed", extra={"channel": p.step.channel, "error": p.error})

    await asyncio.gather(*(one(p) for p in pending))


async def _incentives(engine: Engagement, pending: list[Pending]) -> None:
    """Points through the ledger's adjustment API; the adjustment id derives from the
    touchpoint, so a resend never credits twice. A failure holds the message back (retried)."""
    s = engine.settings
    for p in pending:
        if not s.ledger_url or not s.ledger_admin_api_key:
            p.error = "incentive: ENGAGEMENT_LEDGER_URL / ENGAGEMENT_LEDGER_ADMIN_API_KEY not set"
            continue
        body = {"adjustment_id": str(derived_event_id("engagement", "incentive", str(p.timer["timer_id"]))),
                "customer_id": p.timer["customer_id"], "amount_points": p.step.incentive_points,
                "reason_code": "goodwill", "actor": f"engagement:{p.timer['journey']}",
                "note": f"{p.timer['journey']}/{p.timer['step']}"}
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.post(f"{s.ledger_url.rstrip('/')}/v1/admin/adjustments", json=body,
                                      headers={"X-Admin-Key": s.ledger_admin_api_key.get_secret_value()})
            if r.status_code not in (200, 201):
                p.error = f"incentive: ledger answered {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            p.error = f"incentive: {type(exc).__name__}: {exc}"


def _sent_message(engine: Engagement, timer: asyncpg.Record, step: Step, now: datetime) -> OutboxMessage:
    payload = TouchpointSentPayload(touchpoint_id=timer["timer_id"], journey=timer["journey"],
                                    journey_version=timer["journey_version"], step=timer["step"],
                                    channel=step.channel, trigger_event_id=timer["trigger_event_id"],
                                    purchase_id=timer["purchase_id"], sent_at=now)
    return event_message(engine, TouchpointSent, event_id=derived_event_id("engagement", "sent",
                                                                           str(timer["timer_id"])),
                         customer_id=timer["customer_id"], payload=payload, occurred_at=now,
                         correlation_id=str(timer["trigger_event_id"]))


async def dispatch_until_idle(pool: asyncpg.Pool, engine: Engagement, on_committed=lambda: None) -> int:
    """Rounds until one comes back short (the periodic job's body)."""
    total = 0
    while True:
        n = await dispatch_due(pool, engine)
        total += n
        if n:
            on_committed()
        if n < engine.settings.dispatch_batch:
            return total


def explain_due_scan() -> str:
    return "EXPLAIN (FORMAT JSON) " + repo.CLAIM_DUE.replace("$1", "now()").replace("$2", "200")


def plan_nodes(plan_json: str | list) -> list[str]:
    plan = json.loads(plan_json) if isinstance(plan_json, str) else plan_json
    nodes: list[str] = []

    def walk(node: dict) -> None:
        nodes.append(f"{node['Node Type']}" + (f" on {node['Index Name']}" if "Index Name" in node else ""))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return nodes
