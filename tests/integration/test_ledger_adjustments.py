"""Manual adjustments as a replayable input: the admin API writes each adjustment it applied
to ledger.adjustments (AdjustmentRecorded) and to the inbox in the same transaction; the
ledger's consumer of that topic skips what the API applied and applies the rest (a rebuild)
exactly as the API did. Real broker and PostgreSQL."""

import json
import uuid
from datetime import datetime, timedelta

import pytest

from services.ledger.settings import LedgerSettings
from shared.events import derived_event_id
from shared.topics import LEDGER_ADJUSTMENTS, POINTS_DLQ, POINTS_EVENTS
from tests.support.kafka import consume, produce, unique
from tests.support.ledger import (
    ADMIN, adjustment_recorded, caught_up, ledger_rows, ledger_settings, ledger_state, running_ledger,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def settings(base_env) -> LedgerSettings:
    return ledger_settings(base_env)


def adjustment(customer: str, amount_points: int, **extra) -> dict:
    return {"adjustment_id": str(uuid.uuid4()), "customer_id": customer, "amount_points": amount_points,
            "reason_code": "goodwill", "actor": "alice@back-office", "note": "parcel lost", **extra}


async def adjustments_consumed(settings: LedgerSettings, bootstrap: str) -> None:
    await caught_up(bootstrap, settings.group_id("ledger", "adjustments"), settings.topic(LEDGER_ADJUSTMENTS),
                    partitions=settings.topic_partitions)


def without_key(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "_key"} for e in events]


async def test_the_api_writes_each_applied_adjustment_once_to_ledger_adjustments_and_never_a_refused_one(
        settings, kafka_bootstrap):
    customer = unique("c-")
    credit = adjustment(customer, 100)
    debit = adjustment(customer, -30, reason_code="correction", note=None)
    async with running_ledger(settings) as (_, client):
        answers = [(await client.post("/v1/admin/adjustments", headers=ADMIN, json=body)).status_code for body in (
            credit, credit, adjustment(customer, -101), adjustment(customer, 0), debit,
            adjustment(customer, -1_000_000))]
        await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=2)
        recorded = await consume(kafka_bootstrap, settings.topic(LEDGER_ADJUSTMENTS), at_least=2, idle_s=1.5,
                                 timeout_s=30)
    assert answers == [201, 200, 409, 422, 201, 409]
    audit = {r["adjustment_id"]: r for r in await ledger_rows(settings.database_url, "SELECT * FROM adjustments")}
    assert len(recorded) == 2
    for body, event in zip((credit, debit), sorted(recorded, key=lambda e: e["payload"]["amount_points"], reverse=True)):
        adjustment_id = uuid.UUID(body["adjustment_id"])
        assert event["event_id"] == str(derived_event_id("ledger", "AdjustmentRecorded", str(adjustment_id)))
        assert (event["type"], event["producer"], event["customer_id"], event["_key"]) == (
            "AdjustmentRecorded", "ledger", customer, customer)
        p = event["payload"]
        assert {k: p[k] for k in body} == body
        assert p["occurred_at"] == event["occurred_at"]
        # the audit row keeps that time
        assert audit[adjustment_id]["created_at"] == datetime.fromisoformat(p["occurred_at"])


async def test_a_replayed_adjustment_recorded_changes_nothing(settings, kafka_bootstrap):
    customer = unique("c-")
    async with running_ledger(settings) as (_, client):
        for body in (adjustment(customer, 100), adjustment(customer, -30)):
            assert (await client.post("/v1/admin/adjustments", headers=ADMIN, json=body)).status_code == 201
        first = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=2)
        recorded = await consume(kafka_bootstrap, settings.topic(LEDGER_ADJUSTMENTS), count=2)
        await adjustments_consumed(settings, kafka_bootstrap)  # read once already: applied by the API, skipped
        before = await ledger_state(settings.database_url)

        # delivered again, and once more under another event id (the same adjustment id)
        events = without_key(recorded)
        renamed = {**events[0], "event_id": str(uuid.uuid4())}
        await produce(kafka_bootstrap, settings.topic(LEDGER_ADJUSTMENTS), [*events, *events, renamed], key=customer)
        await adjustments_consumed(settings, kafka_bootstrap)
        after = await ledger_state(settings.database_url)
        points = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), at_least=len(first), idle_s=1.0,
                               timeout_s=30)
        dead = await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), idle_s=0.5)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
    assert after == before
    assert [e["event_id"] for e in points] == [e["event_id"] for e in first]  # no PointsAdjusted again
    assert dead == [] and balance["available_points"] == 70
    inbox = await ledger_rows(settings.database_url, "SELECT event_id FROM inbox WHERE consumer = 'ledger.adjustments'")
    assert {str(r["event_id"]) for r in inbox} == {e["event_id"] for e in events} | {renamed["event_id"]}


async def test_an_adjustment_delivered_only_through_the_topic_writes_the_rows_the_api_wrote(
        settings, base_env, kafka_bootstrap, pg_cluster):
    customer = unique("c-")
    async with running_ledger(settings) as (_, client):
        for body in (adjustment(customer, 100), adjustment(customer, 60, reason_code="service_recovery"),
                     adjustment(customer, -130, reason_code="fraud", note=None)):  # from both lots
            assert (await client.post("/v1/admin/adjustments", headers=ADMIN, json=body)).status_code == 201
        by_api = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=3)
    original = await ledger_state(settings.database_url)
    assert len(original["lots"]) == 2 and len(original["transfers"]) == 3 and len(original["adjustments"]) == 3

    # another ledger on an empty database, reading the same topics from offset 0, later than
    # the API applied them (its clock a day ahead: nothing may depend on when it applies them)
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_cluster.psql("postgres", f'CREATE DATABASE "{name}"')
    rebuilt = ledger_settings(base_env, database_url=pg_cluster.dsn(name), consumer_group_prefix=unique("rebuild-"),
                              clock_offset_s=int(timedelta(days=1).total_seconds()))
    async with running_ledger(rebuilt):
        await adjustments_consumed(rebuilt, kafka_bootstrap)
        by_topic = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=6)
    assert await ledger_state(rebuilt.database_url) == original
    # the same PointsAdjusted (ids, amounts, balances after each), emitted once more
    assert len(by_topic) == 6
    payloads: dict[str, list[dict]] = {}
    for e in by_topic:
        payloads.setdefault(e["event_id"], []).append(e["payload"])
    assert set(payloads) == {e["event_id"] for e in by_api}
    assert all(len(p) == 2 and p[0] == p[1] for p in payloads.values()), json.dumps(payloads, indent=1)


async def test_an_adjustment_the_balance_cannot_cover_or_that_cannot_be_read_goes_to_the_dead_letter_topic(
        settings, kafka_bootstrap):
    customer, probe = unique("c-"), unique("probe-")
    overdraft = adjustment_recorded(customer, -50)
    other_customer = {**adjustment_recorded(customer, 10), "customer_id": unique("c-")}
    async with running_ledger(settings) as (_, client):
        await produce(kafka_bootstrap, settings.topic(LEDGER_ADJUSTMENTS),
                      [overdraft, b"{not json", other_customer, adjustment_recorded(customer, 0)], key=customer)
        await produce(kafka_bootstrap, settings.topic(LEDGER_ADJUSTMENTS), [adjustment_recorded(probe, 10)], key=probe)
        dead = await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), count=4)
        [adjusted] = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=1)
        await adjustments_consumed(settings, kafka_bootstrap)
    assert sorted(d["reason"] for d in dead) == ["insufficient_points", "invalid_amount", "malformed_json", "schema"]
    assert (adjusted["type"], adjusted["customer_id"], adjusted["payload"]["amount_points"]) == (
        "PointsAdjusted", probe, 10)
    rows = await ledger_rows(settings.database_url, "SELECT customer_id FROM adjustments")
    assert [r["customer_id"] for r in rows] == [probe]


async def test_an_adjustment_id_replayed_with_other_fields_is_409_and_changes_nothing(settings):
    customer = unique("c-")
    credit = adjustment(customer, 100)
    async with running_ledger(settings) as (_, client):
        first = await client.post("/v1/admin/adjustments", headers=ADMIN, json=credit)
        same = await client.post("/v1/admin/adjustments", headers=ADMIN, json=credit)
        other = await client.post("/v1/admin/adjustments", headers=ADMIN, json={**credit, "amount_points": 5000})
        elsewhere = await client.post("/v1/admin/adjustments", headers=ADMIN,
                                      json={**credit, "customer_id": unique("c-")})
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
    assert (first.status_code, same.status_code, other.status_code, elsewhere.status_code) == (201, 200, 409, 409)
    assert other.json()["detail"]["reason"] == "adjustment_id_reused"
    assert "amount_points" in other.json()["detail"]["msg"] and "customer_id" in elsewhere.json()["detail"]["msg"]
    assert balance["available_points"] == 100
