"""The ledger against the real broker and PostgreSQL: earning, returns, claims, duplicates,
dead letters, the read API."""

import asyncio
import uuid
from datetime import timedelta

import pytest

from services.ledger.scheduler import run_scheduler
from services.ledger.settings import LedgerSettings
from shared.topics import POINTS_DLQ, POINTS_EVENTS, PURCHASES_RECORDED, REWARDS_EVENTS
from tests.support.kafka import consume, produce, unique
from tests.support.ledger import (
    ADMIN,
    ledger_rows,
    ledger_settings,
    purchase_claimed,
    purchase_recorded,
    redemption,
    return_recorded,
    running_ledger,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def settings(base_env) -> LedgerSettings:
    return ledger_settings(base_env)


async def points_events(settings: LedgerSettings, bootstrap: str, count: int, **kw) -> list[dict]:
    return await consume(bootstrap, settings.topic(POINTS_EVENTS), count=count, **kw)


async def ledger_state(dsn: str) -> tuple:
    """Everything that an input could change, for before/after comparisons."""
    transfers = await ledger_rows(dsn, "SELECT transfer_id, amount_points FROM transfers ORDER BY seq")
    accounts = await ledger_rows(dsn, "SELECT * FROM accounts ORDER BY account_id")
    lots = await ledger_rows(dsn, "SELECT lot_id, remaining_points, held_points, reversed_points FROM lots ORDER BY lot_id")
    holds = await ledger_rows(dsn, "SELECT redemption_id, state FROM holds ORDER BY redemption_id")
    return [tuple(r) for r in transfers], [tuple(r) for r in accounts], [tuple(r) for r in lots], [tuple(r) for r in holds]


async def test_a_sale_earns_pending_points_shown_by_the_balance_and_history_apis(settings, kafka_bootstrap):
    customer = unique("c-")
    async with running_ledger(settings) as (_, client):
        sale = purchase_recorded(customer, amounts=("10.50", "20.00", "0.99"))
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), [sale], key=customer)
        [earned] = await points_events(settings, kafka_bootstrap, 1)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
        history = (await client.get(f"/v1/customers/{customer}/transactions", headers=ADMIN)).json()
        unknown = await client.get("/v1/customers/nobody/balance", headers=ADMIN)
    assert earned["type"] == "PointsEarned" and earned["_key"] == customer
    p = earned["payload"]
    assert p["amount_points"] == 31 and p["pending"] is True and p["rule_version"] == 1  # 31.49 floored
    assert p["balance"]["pending_points"] == 31 and p["balance"]["available_points"] == 0
    assert sum(float(b["points"]) for b in p["breakdown"]) == pytest.approx(31)
    assert balance["pending_points"] == 31 and balance["tier"] == "Bronze" and balance["qualifying_points"] == 31
    [tx] = history["items"]
    assert (tx["code"], tx["amount_points"], tx["credit_account"], tx["rule_version"]) == ("earn", 31, "pending", 1)
    assert tx["breakdown"] == p["breakdown"] and history["next_cursor"] is None
    assert unknown.status_code == 404


async def test_every_input_delivered_twice_changes_nothing_the_second_time(settings, kafka_bootstrap):
    customer = unique("c-")
    anonymous_sale = purchase_recorded(None, amounts=("40.00",))
    sale = purchase_recorded(customer, amounts=("300.00", "200.00"))
    inputs = [
        sale,
        return_recorded(customer, sale, ["l2"]),
        purchase_claimed(customer, anonymous_sale),
        purchase_recorded(customer, amounts=("1000.00",)),
    ]
    async with running_ledger(settings) as (app, client):
        credit = await client.post("/v1/admin/adjustments", headers={"X-Admin-Key": settings.admin_api_key}, json={
            "customer_id": customer, "amount_points": 500, "reason_code": "goodwill", "actor": "ops@test"})
        assert credit.status_code == 201
        rid = uuid.uuid4()
        inputs += [redemption("RedemptionRequested", customer, rid, 120),
                   redemption("RedemptionFulfilled", customer, rid, 120)]
        purchases_topic, rewards_topic = settings.topic(PURCHASES_RECORDED), settings.topic(REWARDS_EVENTS)
        # once, then wait until all effects are out
        await produce(kafka_bootstrap, purchases_topic, inputs[:4], key=customer)
        await produce(kafka_bootstrap, rewards_topic, inputs[4:], key=customer)
        once = await points_events(settings, kafka_bootstrap, 8, timeout_s=20)
        await asyncio.sleep(0.3)
        before = await ledger_state(settings.database_url)
        # every input again, then a probe behind them in the same partitions
        probe_sale = purchase_recorded(customer, amounts=("1.00",))
        probe_rid = uuid.uuid4()
        await produce(kafka_bootstrap, purchases_topic, inputs[:4] + [probe_sale], key=customer)
        await produce(kafka_bootstrap, rewards_topic, inputs[4:] + [redemption("RedemptionRequested", customer,
                                                                               probe_rid, 1)], key=customer)
        after_all = await points_events(settings, kafka_bootstrap, 10, timeout_s=20)
        await asyncio.sleep(0.3)
        after = await ledger_state(settings.database_url)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
    types = sorted(e["type"] for e in once)
    assert types == sorted(["PointsAdjusted", "PointsEarned", "PointsReversed", "PointsEarned", "PointsEarned",
                            "TierChanged", "PointsHeld", "PointsRedeemed"])
    new_events = [e for e in after_all if e["event_id"] not in {x["event_id"] for x in once}]
    assert sorted(e["type"] for e in new_events) == ["PointsEarned", "PointsHeld"]
    assert {e["payload"].get("purchase_id") for e in new_events} >= {probe_sale["payload"]["purchase_id"]}
    # the state moved only by the probes: one earn transfer, one hold transfer
    assert after[0][: len(before[0])] == before[0] and len(after[0]) == len(before[0]) + 2
    assert [h for h in after[3] if h[0] != probe_rid] == before[3]
    # 500 + 40 + 1000 earned (tier Silver from 1,000 qualifying: the 1,000 PLN purchase earned at Bronze),
    # -200 returned, +500 adjusted, 120 redeemed, 1 earned by the probe (x1.25 floored: 1), 1 held
    assert balance["pending_points"] == 300 + 40 + 1000 + 1
    assert balance["available_points"] == 500 - 120 - 1 and balance["held_points"] == 1
    assert balance["tier"] == "Silver" and balance["qualifying_points"] == 300 + 40 + 1000 + 1


async def test_anonymous_sales_earn_only_when_claimed_and_only_once(settings, kafka_bootstrap):
    customer = unique("c-")
    anonymous = purchase_recorded(None, amounts=("55.00",))
    credited = purchase_recorded(customer, amounts=("10.00",))
    async with running_ledger(settings):
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), [anonymous, credited], key=customer)
        [first] = await points_events(settings, kafka_bootstrap, 1)
        # a claim of the anonymous sale earns; a claim of a sale already credited does not
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED),
                      [purchase_claimed(customer, anonymous), purchase_claimed(customer, credited),
                       purchase_claimed(customer, anonymous)], key=customer)
        events = await points_events(settings, kafka_bootstrap, 3, timeout_s=4)
    assert first["payload"]["purchase_id"] == credited["payload"]["purchase_id"]
    assert [(e["payload"]["purchase_id"], e["payload"]["amount_points"]) for e in events] == [
        (credited["payload"]["purchase_id"], 10), (anonymous["payload"]["purchase_id"], 55)]
    rows = await ledger_rows(settings.database_url, "SELECT count(*) AS n FROM lots WHERE customer_id = $1", customer)
    assert rows[0]["n"] == 2


async def test_a_return_of_spent_points_becomes_debt_that_the_next_purchase_pays_first(settings, kafka_bootstrap):
    customer = unique("c-")
    sale = purchase_recorded(customer, amounts=("60.00", "40.00"))
    async with running_ledger(settings) as (app, client):
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), [sale], key=customer)
        await points_events(settings, kafka_bootstrap, 1)
        # let the points mature (the scheduler with a clock 15 days ahead), then spend 80
        ledger, pool = app.state.ledger, app.state.runtime.pool
        run = await run_scheduler(pool, ledger, now=ledger.clock() + timedelta(days=15))
        assert run.matured_points == 100
        rid = uuid.uuid4()
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS),
                      [redemption("RedemptionRequested", customer, rid, 80),
                       redemption("RedemptionFulfilled", customer, rid, 80)], key=customer)
        await points_events(settings, kafka_bootstrap, 4)
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED),
                      [return_recorded(customer, sale, ["l1"]), return_recorded(customer, sale, ["l2"]),
                       purchase_recorded(customer, amounts=("50.00",))], key=customer)
        events = await points_events(settings, kafka_bootstrap, 7)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
    reversed_ = [e["payload"] for e in events if e["type"] == "PointsReversed"]
    # first return: 60 back, 20 from the lot and 40 as debt; second: 40 more debt
    assert [(r["amount_points"], r["debt_points_added"]) for r in reversed_] == [(60, 40), (40, 40)]
    earned = [e["payload"] for e in events if e["type"] == "PointsEarned"][-1]
    assert earned["amount_points"] == 50 and earned["balance"]["debt_points"] == 30
    assert (balance["available_points"], balance["pending_points"], balance["debt_points"]) == (0, 0, 30)
    assert balance["qualifying_points"] == 50


async def test_unknown_currencies_and_undecodable_inputs_go_to_the_dead_letter_topic(settings, kafka_bootstrap):
    customer = unique("c-")
    async with running_ledger(settings):
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED),
                      [purchase_recorded(customer, currency="USD"), b"{not json", {"type": "Mystery"},
                       purchase_recorded(customer, amounts=("5.00",))], key=customer)
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS), [b"\xff\xfe"], key=customer)
        dead = await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), count=4)
        [earned] = await points_events(settings, kafka_bootstrap, 1)
    assert sorted(d["reason"] for d in dead) == ["malformed_json", "malformed_json", "unknown_currency",
                                                 "unknown_event_type"]
    assert all(d["producer"] == "ledger" and d["original_topic"] for d in dead)
    assert earned["payload"]["amount_points"] == 5


async def test_a_pos_sale_and_an_eshop_order_with_the_same_id_are_two_purchases(settings, kafka_bootstrap):
    """The purchases service keys a purchase by (source, purchase_id): the ledger must too.
    Each earns its own lot, and a return reverses only the lot of its own channel."""
    customer = unique("c-")
    shared_id = unique("order-")
    pos_sale = purchase_recorded(customer, purchase_id=shared_id, amounts=("100.00",), source="pos")
    eshop_sale = purchase_recorded(customer, purchase_id=shared_id, amounts=("40.00", "60.00"), source="eshop")
    eshop_return = return_recorded(customer, eshop_sale, ["l1"])
    async with running_ledger(settings) as (_, client):
        topic = settings.topic(PURCHASES_RECORDED)
        await produce(kafka_bootstrap, topic, [pos_sale, eshop_sale], key=customer)
        earned = await points_events(settings, kafka_bootstrap, 2)
        await produce(kafka_bootstrap, topic, [eshop_return], key=customer)
        [*_, reversed_] = await points_events(settings, kafka_bootstrap, 3)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
        history = (await client.get(f"/v1/customers/{customer}/transactions", headers=ADMIN)).json()
    assert sorted((e["type"], e["payload"]["source"], e["payload"]["amount_points"]) for e in earned) == [
        ("PointsEarned", "eshop", 100), ("PointsEarned", "pos", 100)]
    assert len({e["event_id"] for e in earned}) == 2
    assert reversed_["type"] == "PointsReversed" and reversed_["payload"]["amount_points"] == 40
    assert reversed_["payload"]["source"] == "eshop" and reversed_["payload"]["original_purchase_id"] == shared_id
    # The history tells the two purchases apart by their channel.
    assert sorted((t["code"], t["purchase_id"], t["channel"], t["amount_points"]) for t in history["items"]) == [
        ("earn", shared_id, "eshop", 100), ("earn", shared_id, "pos", 100), ("reverse", shared_id, "eshop", 40)]
    assert balance["pending_points"] == 160 and balance["qualifying_points"] == 160
    lots = await ledger_rows(settings.database_url, "SELECT purchase_source, amount_points, reversed_points "
                             "FROM lots WHERE purchase_id = $1 ORDER BY purchase_source", shared_id)
    assert [tuple(r) for r in lots] == [("eshop", 100, 40), ("pos", 100, 0)]
