"""The scheduler (maturity, expiry, reminders, tiers leaving the window) and the admin API
(versioned program, adjustments, simulator, metrics) against the real broker and PostgreSQL."""

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from services.ledger.queries import refresh_gauges
from services.ledger.scheduler import run_scheduler
from services.ledger.settings import LedgerSettings
from shared.topics import LEDGER_PROGRAMS, POINTS_EVENTS, PURCHASES_RECORDED
from tests.support.kafka import consume, produce, unique
from tests.support.ledger import (
    ADMIN,
    ledger_rows,
    ledger_settings,
    purchase_recorded,
    running_ledger,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def settings(base_env) -> LedgerSettings:
    return ledger_settings(base_env, expiry_reminder_days=30)


async def test_the_scheduler_matures_reminds_expires_and_retiers_once_however_often_it_runs(settings, kafka_bootstrap):
    customer = unique("c-")
    async with running_ledger(settings) as (app, client):
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED),
                      [purchase_recorded(customer, amounts=("600.00", "500.00"))], key=customer)
        await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=2)  # earned 1100, Silver
        ledger, pool = app.state.ledger, app.state.runtime.pool
        t0 = ledger.clock()
        runs = {}
        for label, days in (("before", 13), ("matured", 15), ("matured again", 15), ("reminded", 350),
                            ("reminded again", 351), ("window", 366), ("expired", 381), ("expired again", 382)):
            runs[label] = await run_scheduler(pool, ledger, now=t0 + timedelta(days=days))
        app.state.runtime.relay.wake()
        events = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=6)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
    assert runs["before"].matured_points == 0
    assert runs["matured"].matured_points == 1100 and runs["matured again"].matured_points == 0
    assert runs["reminded"].reminders == 1 and runs["reminded again"].reminders == 0
    assert runs["window"].tier_changes == 1
    assert runs["expired"].expired_points == 1100 and runs["expired again"].expired_points == 0
    types = [e["type"] for e in events[2:]]
    assert types == ["PointsMatured", "PointsWillExpire", "TierChanged", "PointsExpired"]
    tier = events[4]["payload"]
    assert (tier["from_tier"], tier["to_tier"], tier["qualifying_points"]) == ("Silver", "Bronze", 0)
    assert events[3]["payload"]["amount_points"] == 1100
    assert balance["available_points"] == 0 and balance["next_expiry_at"] is None


async def test_a_new_program_version_applies_to_later_postings_which_record_it(settings, kafka_bootstrap):
    customer = unique("c-")
    async with running_ledger(settings) as (app, client):
        no_key = await client.get("/v1/admin/program")
        wrong_key = await client.get("/v1/admin/program", headers={"X-Admin-Key": "nope"})
        current = (await client.get("/v1/admin/program", headers=ADMIN)).json()
        program = {**current["program"], "category_multipliers": {"grocery": "2"}, "first_purchase_bonus_points": 10}
        bad = await client.put("/v1/admin/program", headers=ADMIN, json={**program, "tiers": []})
        put = await client.put("/v1/admin/program", headers={**ADMIN, "X-Actor": "alice@ops"}, json=program)
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED),
                      [purchase_recorded(customer, amounts=("10.40",))], key=customer)
        [earned] = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=1)
        simulated = (await client.post("/v1/rules/simulate", headers=ADMIN, json={
            "customer_id": customer,
            "purchase": {"currency": "PLN", "lines": [{"line_id": "1", "sku": "x", "category": "grocery",
                                                       "quantity": 3, "unit_price": "10.00", "discount": "1.00"}]},
        })).json()
        unknown_currency = await client.post("/v1/rules/simulate", headers=ADMIN, json={"purchase": {
            "currency": "XXX", "lines": [{"line_id": "1", "sku": "x", "category": "c", "quantity": 1,
                                          "unit_price": "1", "discount": "0"}]}})
    assert (no_key.status_code, wrong_key.status_code) == (401, 401)
    assert current["version"] == 1 and current["program"]["tiers"][1]["min_qualifying_points"] == 1000
    assert bad.status_code == 422
    assert put.status_code == 200 and put.json()["version"] == 2
    assert put.json()["versions"][0] == {**put.json()["versions"][0], "version": 2, "source": "admin", "actor": "alice@ops"}
    p = earned["payload"]
    assert (p["amount_points"], p["rule_version"]) == (20 + 10, 2)  # 10.40 x 2 = 20.8 -> 20, + 10 bonus
    assert [b["rule"] for b in p["breakdown"]][:2] == ["base 1 pt per 1.00 PLN", "category grocery x2"]
    # the customer has purchased now: no bonus; 29.00 x 2 = 58
    assert simulated["points"] == 58 and simulated["rule_version"] == 2 and simulated["bonus_points"] == 0
    assert simulated["stacking_order"] and unknown_currency.status_code == 422
    rows = await ledger_rows(settings.database_url, "SELECT rule_version FROM transfers WHERE customer_id = $1", customer)
    assert [r["rule_version"] for r in rows] == [2]


async def test_adjustments_are_audited_idempotent_and_never_overdraw(settings, kafka_bootstrap):
    customer, adjustment_id = unique("c-"), str(uuid.uuid4())
    body = {"adjustment_id": adjustment_id, "customer_id": customer, "amount_points": 70,
            "reason_code": "service_recovery", "actor": "bob@support", "note": "late delivery"}
    async with running_ledger(settings) as (app, client):
        first = await client.post("/v1/admin/adjustments", headers=ADMIN, json=body)
        again = await client.post("/v1/admin/adjustments", headers=ADMIN, json=body)
        overdraw = await client.post("/v1/admin/adjustments", headers=ADMIN, json={
            **body, "adjustment_id": str(uuid.uuid4()), "amount_points": -71})
        zero = await client.post("/v1/admin/adjustments", headers=ADMIN, json={
            **body, "adjustment_id": str(uuid.uuid4()), "amount_points": 0})
        debit = await client.post("/v1/admin/adjustments", headers=ADMIN, json={
            **body, "adjustment_id": str(uuid.uuid4()), "amount_points": -20, "reason_code": "correction"})
        [adjusted, _] = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=2)
        history = (await client.get(f"/v1/customers/{customer}/transactions", headers=ADMIN)).json()
        await refresh_gauges(app.state.runtime.pool)
        metrics = (await client.get("/metrics")).text
    assert (first.status_code, again.status_code, overdraw.status_code, zero.status_code, debit.status_code) == (
        201, 200, 409, 422, 201)
    assert first.json()["balance"]["available_points"] == 70 and again.json()["created"] is False
    assert debit.json()["balance"]["available_points"] == 50
    assert adjusted["payload"]["actor"] == "bob@support" and adjusted["payload"]["reason_code"] == "service_recovery"
    assert [(t["code"], t["amount_points"], t["actor"]) for t in history["items"]] == [
        ("adjust", 20, "bob@support"), ("adjust", 70, "bob@support")]
    audit = await ledger_rows(settings.database_url, "SELECT reason_code, note FROM adjustments ORDER BY created_at")
    assert [(r["reason_code"], r["note"]) for r in audit] == [("service_recovery", "late delivery"),
                                                            ("correction", "late delivery")]
    assert 'ledger_invariant_imbalance_points{phase="posted"} 0.0' in metrics
    assert 'ledger_liability_points{state="available"}' in metrics


async def test_oversized_bodies_get_413_unread_and_refused_admin_calls_are_counted(base_env):
    settings = ledger_settings(base_env, max_body_bytes=10_000)
    big = b'{"customer_id": "c", "note": "' + b"x" * 50_000 + b'"}'

    async def chunks():
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    async with running_ledger(settings) as (_, client):
        declared = await client.post("/v1/admin/adjustments", content=big,
                                     headers={**ADMIN, "Content-Type": "application/json"})
        streamed = await client.post("/v1/rules/simulate", content=chunks(), headers={**ADMIN, "Content-Type": "application/json"})
        small = await client.post("/v1/rules/simulate", headers=ADMIN, json={"purchase": {"currency": "PLN", "lines": [
            {"line_id": "1", "sku": "s", "category": "c", "quantity": 1, "unit_price": "2.50", "discount": "0"}]}})
        await client.get("/v1/admin/program", headers={"X-Admin-Key": "wrong"})
        await client.get("/v1/admin/program")
        metrics = (await client.get("/metrics")).text
    assert (declared.status_code, streamed.status_code, small.status_code) == (413, 413, 200)
    assert "larger than 10000 bytes" in declared.json()["detail"]
    for reason in ("body_too_large", "invalid_admin_key", "missing_admin_key"):
        assert f'ledger_http_refusals_total{{reason="{reason}"}}' in metrics


async def test_a_scheduled_program_version_governs_what_is_recorded_from_its_time_and_is_published(
        settings, kafka_bootstrap):
    customer = unique("c-")
    now = datetime.now(timezone.utc)
    async with running_ledger(settings) as (_, client):
        program = (await client.get("/v1/admin/program", headers=ADMIN)).json()["program"]
        tripled = {**program, "category_multipliers": {"grocery": "3"}}
        past = await client.put("/v1/admin/program", headers=ADMIN, json=tripled,
                                params={"effective_from": (now - timedelta(hours=1)).isoformat()})
        starts = now + timedelta(hours=1)
        scheduled = await client.put("/v1/admin/program", headers=ADMIN, json=tripled,
                                     params={"effective_from": starts.isoformat()})
        in_force = (await client.get("/v1/admin/program", headers=ADMIN)).json()
        before = purchase_recorded(customer, amounts=("10.00",))
        after = {**purchase_recorded(customer, amounts=("10.00",)),
                 "recorded_at": (starts + timedelta(seconds=1)).isoformat()}
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), [before, after], key=customer)
        earned = [e for e in await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=2)
                  if e["type"] == "PointsEarned"]
        published = await consume(kafka_bootstrap, settings.topic(LEDGER_PROGRAMS), count=2)
    assert past.status_code == 422 and past.json()["detail"]["reason"] == "effective_from_in_the_past"
    assert scheduled.status_code == 200 and scheduled.json()["version"] == 2
    assert datetime.fromisoformat(scheduled.json()["effective_from"]) == starts
    assert in_force["version"] == 1  # not yet
    assert [(e["payload"]["amount_points"], e["payload"]["rule_version"]) for e in earned] == [(10, 1), (30, 2)]
    assert [(e["type"], e["payload"]["version"], e["payload"]["source"]) for e in published] == [
        ("ProgramVersionPublished", 1, "file"), ("ProgramVersionPublished", 2, "admin")]
    assert datetime.fromisoformat(published[1]["payload"]["effective_from"]) == starts
    assert published[1]["payload"]["document"]["category_multipliers"] == {"grocery": "3"}
