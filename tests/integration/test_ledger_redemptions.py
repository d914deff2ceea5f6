"""The redemption saga against the real broker and PostgreSQL: holds under a race, posts,
voids, refunds, timeouts, fulfilments after a timeout."""

import asyncio
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from services.ledger.scheduler import run_scheduler
from services.ledger.settings import LedgerSettings
from shared.pipeline import Record
from shared.topics import POINTS_DLQ, POINTS_EVENTS, PURCHASES_RECORDED, REWARDS_EVENTS
from tests.support.kafka import consume, produce, unique
from tests.support.ledger import (
    ADMIN,
    ledger_rows,
    ledger_settings,
    purchase_recorded,
    redemption,
    running_ledger,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def settings(base_env) -> LedgerSettings:
    return ledger_settings(base_env)


async def credit(client, customer: str, points: int) -> None:
    r = await client.post("/v1/admin/adjustments", headers=ADMIN, json={
        "customer_id": customer, "amount_points": points, "reason_code": "goodwill", "actor": "test"})
    assert r.status_code == 201, r.text


async def test_500_concurrent_requests_against_a_balance_covering_k_give_exactly_k_holds(settings, kafka_bootstrap):
    customer, k, cost = unique("c-"), 37, 10
    requests = [redemption("RedemptionRequested", customer, uuid.uuid4(), cost) for _ in range(500)]
    async with running_ledger(settings) as (_, client):
        await credit(client, customer, k * cost + cost - 1)  # one point short of k + 1
        topic = settings.topic(REWARDS_EVENTS)
        # five producers at once, interleaving their requests
        await asyncio.gather(*(produce(kafka_bootstrap, topic, requests[i::5], key=customer) for i in range(5)))
        events = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=501, timeout_s=240)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
    held = [e for e in events if e["type"] == "PointsHeld"]
    rejected = [e for e in events if e["type"] == "PointsHoldRejected"]
    assert len(held) == k and len(rejected) == 500 - k
    assert {e["payload"]["reason"] for e in rejected} == {"insufficient_points"}
    assert (balance["available_points"], balance["held_points"]) == (cost - 1, k * cost)
    assert min(e["payload"]["balance"]["available_points"] for e in events if e["type"] != "PointsAdjusted") >= 0


async def test_concurrent_transactions_on_one_customer_never_overdraw(settings, kafka_bootstrap):
    """The same race without the partition's ordering: 50 batches applied at once by
    separate transactions; the customer's row lock alone must keep the holds to k."""
    customer, k, cost = unique("c-"), 23, 7
    async with running_ledger(settings) as (app, client):
        await credit(client, customer, k * cost)
        runtime = app.state.runtime
        [rewards_events] = [s for s in runtime.subscriptions if s.topic == settings.topic(REWARDS_EVENTS)]
        batches = [[Record(json.dumps(redemption("RedemptionRequested", customer, uuid.uuid4(), cost)).encode())
                     for _ in range(10)] for _ in range(50)]
        # the pipeline retries a deadlock or serialization failure; nothing may fail for good
        reports = await asyncio.gather(*(runtime.pipeline.process(rewards_events, b) for b in batches))
    assert sum(r.dead_lettered for r in reports) == 0
    holds = await ledger_rows(settings.database_url, "SELECT amount_points FROM holds WHERE customer_id = $1", customer)
    [account] = await ledger_rows(settings.database_url, "SELECT * FROM accounts WHERE account_id = $1",
                                  f"customer:{customer}:available")
    assert len(holds) == k
    assert account["debits_pending"] == k * cost and account["credits_posted"] == k * cost


async def test_a_shipment_or_delivery_is_read_and_ignored_not_dead_lettered(settings, kafka_bootstrap):
    """RedemptionShipped and RedemptionDelivered tell the customer about a physical reward
    after the saga: no points move, and the ledger must not take them for unknown input."""
    customer, rid, probe = unique("c-"), uuid.uuid4(), uuid.uuid4()
    R = redemption
    shipped, delivered = R("RedemptionShipped", customer, rid, 30), R("RedemptionDelivered", customer, rid, 30)
    async with running_ledger(settings) as (_, client):
        await credit(client, customer, 100)
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS), [
            R("RedemptionRequested", customer, rid, 30), R("RedemptionFulfilled", customer, rid, 30),
            shipped, delivered, shipped,  # the repeat is a duplicate in the inbox
            R("RedemptionRequested", customer, probe, 20),
        ], key=customer)
        events = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=4, timeout_s=60,
                               distinct="event_id")
        dead = await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), idle_s=1.0, timeout_s=5)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
        metrics = (await client.get("/metrics")).text
    assert [e["type"] for e in events] == ["PointsAdjusted", "PointsHeld", "PointsRedeemed", "PointsHeld"]
    assert events[-1]["payload"]["redemption_id"] == str(probe)  # what came after was applied
    assert [d for d in dead if d["original_key"] == customer] == []
    assert (balance["available_points"], balance["held_points"]) == (50, 20)
    claimed = await ledger_rows(settings.database_url, "SELECT event_id FROM inbox WHERE event_id = ANY($1::uuid[])",
                                [shipped["event_id"], delivered["event_id"]])
    assert len(claimed) == 2
    assert 'ledger_events_total{outcome="ignored",type="RedemptionShipped"}' in metrics


async def test_the_saga_posts_voids_refunds_and_rejects_with_reasons(settings, kafka_bootstrap):
    customer = unique("c-")
    fulfilled, failed, cancelled, resent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    R = redemption
    async with running_ledger(settings) as (_, client):
        await credit(client, customer, 100)
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS), [
            R("RedemptionRequested", customer, fulfilled, 30), R("RedemptionFulfilled", customer, fulfilled, 30),
            R("RedemptionRequested", customer, failed, 20), R("RedemptionFailed", customer, failed, 20),
            R("RedemptionRequested", customer, cancelled, 25), R("RedemptionFulfilled", customer, cancelled, 25),
            R("RedemptionCancelled", customer, cancelled, 25, was_fulfilled=True),
            R("RedemptionRequested", customer, resent, 5), R("RedemptionRequested", customer, resent, 5),
            R("RedemptionRequested", customer, uuid.uuid4(), 0),
            R("RedemptionRequested", customer, uuid.uuid4(), 1000),
            R("RedemptionRequested", unique("stranger-"), uuid.uuid4(), 1),
            R("RedemptionFulfilled", customer, uuid.uuid4(), 10),
        ], key=customer)
        # 13 distinct events, however long a loaded machine takes, a redelivery not counted.
        events = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=13, timeout_s=60,
                               distinct="event_id")
        dead = await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), count=1, timeout_s=60)
        assert len(events) == 13
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
        history = (await client.get(f"/v1/customers/{customer}/transactions", headers=ADMIN, params={"limit": 4})).json()
        older = (await client.get(f"/v1/customers/{customer}/transactions", headers=ADMIN,
                                  params={"limit": 50, "cursor": history["next_cursor"]})).json()
    by_type: dict[str, list] = {}
    for e in events:  # partitions come back in any order: the stranger's event may be first
        by_type.setdefault(e["type"], []).append(e["payload"])
    assert len(by_type.pop("PointsAdjusted")) == 1
    assert [p["redemption_id"] for p in by_type["PointsRedeemed"]] == [str(fulfilled), str(cancelled)]
    assert [(p["redemption_id"], p["phase"]) for p in by_type["PointsReleased"]] == [
        (str(failed), "void"), (str(cancelled), "refund")]
    assert sorted(p["reason"] for p in by_type["PointsHoldRejected"]) == [
        "account_unknown", "duplicate_redemption", "insufficient_points", "invalid_amount"]
    assert dead[0]["reason"] == "fulfilled_without_hold"
    # 100 - 30 redeemed - 5 still held
    assert (balance["available_points"], balance["held_points"]) == (65, 5)
    codes = [t["code"] for t in history["items"] + older["items"]]
    assert len(history["items"]) == 4 and older["next_cursor"] is None
    assert sorted(codes) == sorted(["adjust", "hold", "post", "hold", "void", "hold", "post", "refund", "hold"])


async def earn(settings, kafka_bootstrap, customer: str, amount: str) -> dict:
    """A sale old enough to be past its return window: its points are available at once."""
    sale = purchase_recorded(customer, amounts=(amount,), occurred_at=datetime.now(timezone.utc) - timedelta(days=30))
    await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), [sale], key=customer)
    return sale


async def points_events(settings, kafka_bootstrap, count: int) -> list[dict]:
    return await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=count, timeout_s=30,
                         distinct="event_id")


async def ledger_state(dsn: str) -> tuple:
    """Every row an input could change (transfers, accounts, lots, holds), to compare."""
    tables = ("SELECT transfer_id, amount_points FROM transfers ORDER BY seq",
              "SELECT * FROM accounts ORDER BY account_id",
              "SELECT lot_id, remaining_points, held_points FROM lots ORDER BY lot_id",
              "SELECT redemption_id, state, allocations FROM holds ORDER BY redemption_id")
    return tuple([[tuple(r) for r in await ledger_rows(dsn, sql)] for sql in tables])


async def books_of(dsn: str, customer: str) -> dict:
    """What the invariants are checked on, straight from the tables."""
    [totals] = await ledger_rows(dsn, "SELECT sum(debits_posted) - sum(credits_posted) AS posted,"
                                      " sum(debits_pending) - sum(credits_pending) AS pending FROM accounts")
    [lots] = await ledger_rows(dsn, "SELECT coalesce(sum(remaining_points), 0) AS remaining,"
                                    " coalesce(min(remaining_points), 0) AS lowest FROM lots"
                                    " WHERE customer_id = $1 AND NOT pending", customer)
    [available] = await ledger_rows(dsn, "SELECT credits_posted - debits_posted - debits_pending AS points"
                                         " FROM accounts WHERE account_id = $1", f"customer:{customer}:available")
    return {"trial_balance": (totals["posted"], totals["pending"]), "available": available["points"],
            "lots_remaining": lots["remaining"], "lowest_lot": lots["lowest"]}


async def test_a_fulfilment_after_the_scheduler_voided_the_hold_takes_the_points_once(settings, kafka_bootstrap):
    """Never a reward without points: the fulfilment reached the ledger after its hold timed
    out, so the points are redeemed then, from the balance; delivered again (the same event,
    or a re-sent fulfilment with a new id), nothing changes."""
    customer, rid = unique("c-"), uuid.uuid4()
    fulfilled = redemption("RedemptionFulfilled", customer, rid, 40)
    async with running_ledger(settings) as (app, client):
        await earn(settings, kafka_bootstrap, customer, "100.00")
        await points_events(settings, kafka_bootstrap, 1)
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS),
                      [redemption("RedemptionRequested", customer, rid, 40, hold_timeout_s=60)], key=customer)
        await points_events(settings, kafka_bootstrap, 2)
        ledger, pool = app.state.ledger, app.state.runtime.pool
        early = await run_scheduler(pool, ledger, now=ledger.clock() + timedelta(seconds=30))
        late = await run_scheduler(pool, ledger, now=ledger.clock() + timedelta(seconds=61))
        again = await run_scheduler(pool, ledger, now=ledger.clock() + timedelta(seconds=62))
        app.state.runtime.relay.wake()
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS), [fulfilled], key=customer)
        once = await points_events(settings, kafka_bootstrap, 4)
        before = await ledger_state(settings.database_url)
        # again: the same record, and a re-sent fulfilment (new event id); then a probe behind
        # them in the same partition (a stranger's request: rejected, it changes no books)
        resent = redemption("RedemptionFulfilled", customer, rid, 40)
        probe = redemption("RedemptionRequested", unique("stranger-"), uuid.uuid4(), 1)
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS), [fulfilled, resent, probe], key=customer)
        twice = await points_events(settings, kafka_bootstrap, 5)
        after = await ledger_state(settings.database_url)
        dead = await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), timeout_s=2)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
    assert (early.voided_holds, late.voided_holds, again.voided_holds) == (0, 1, 0)
    assert [e["type"] for e in once] == ["PointsEarned", "PointsHeld", "PointsReleased", "PointsRedeemed"]
    assert (once[2]["payload"]["phase"], once[2]["payload"]["reason"]) == ("void", "hold_timeout")
    redeemed = once[3]["payload"]
    assert (redeemed["redemption_id"], redeemed["amount_points"]) == (str(rid), 40)
    assert (redeemed["after_hold_voided"], redeemed["debt_points_added"]) == (True, 0)
    assert (redeemed["balance"]["available_points"], redeemed["balance"]["debt_points"]) == (60, 0)
    assert [e["type"] for e in twice if e["event_id"] not in {x["event_id"] for x in once}] == ["PointsHoldRejected"]
    assert after == before
    assert dead == []
    assert (balance["available_points"], balance["held_points"], balance["debt_points"]) == (60, 0, 0)
    [hold] = await ledger_rows(settings.database_url, "SELECT state FROM holds WHERE redemption_id = $1", rid)
    assert hold["state"] == "posted"
    transfers = await ledger_rows(settings.database_url, "SELECT code, phase, amount_points FROM transfers"
                                                         " WHERE ref = $1 ORDER BY seq", str(rid))
    assert [tuple(t) for t in transfers] == [("hold", "pending", 40), ("void", "void_pending", 40),
                                             ("post", "posted", 40)]
    books = await books_of(settings.database_url, customer)
    assert books["trial_balance"] == (0, 0) and books["available"] == books["lots_remaining"] == 60


async def test_a_late_fulfilment_the_balance_no_longer_covers_leaves_debt_and_a_cancellation_gives_it_all_back(
        settings, kafka_bootstrap):
    """The customer spent the released points before the late fulfilment arrived: what the
    balance still has is taken, the rest becomes debt that the next purchase pays first.
    Cancelled afterwards, the redemption is refunded like any posted one: the points back
    to their lot, the debt still owed forgiven, and the part already repaid as a new lot."""
    customer, late_rid, spent_rid = unique("c-"), uuid.uuid4(), uuid.uuid4()
    R = redemption
    async with running_ledger(settings) as (app, client):
        await earn(settings, kafka_bootstrap, customer, "100.00")
        await points_events(settings, kafka_bootstrap, 1)
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS),
                      [R("RedemptionRequested", customer, late_rid, 80, hold_timeout_s=60)], key=customer)
        await points_events(settings, kafka_bootstrap, 2)
        ledger, pool = app.state.ledger, app.state.runtime.pool
        assert (await run_scheduler(pool, ledger, now=ledger.clock() + timedelta(seconds=61))).voided_holds == 1
        app.state.runtime.relay.wake()
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS),
                      [R("RedemptionRequested", customer, spent_rid, 70),
                       R("RedemptionFulfilled", customer, spent_rid, 70),
                       R("RedemptionFulfilled", customer, late_rid, 80)], key=customer)
        await points_events(settings, kafka_bootstrap, 6)
        await earn(settings, kafka_bootstrap, customer, "20.00")
        await points_events(settings, kafka_bootstrap, 7)
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS),
                      [R("RedemptionCancelled", customer, late_rid, 80, was_fulfilled=True)], key=customer)
        events = await points_events(settings, kafka_bootstrap, 8)
        dead = await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), timeout_s=2)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
    assert [e["type"] for e in events] == ["PointsEarned", "PointsHeld", "PointsReleased", "PointsHeld",
                                           "PointsRedeemed", "PointsRedeemed", "PointsEarned", "PointsReleased"]
    late = events[5]["payload"]
    assert (late["redemption_id"], late["amount_points"], late["after_hold_voided"]) == (str(late_rid), 80, True)
    # 100 earned, 70 spent meanwhile: 30 taken, 50 owed
    assert late["debt_points_added"] == 50
    assert (late["balance"]["available_points"], late["balance"]["debt_points"]) == (0, 50)
    assert events[4]["payload"]["after_hold_voided"] is False
    assert events[6]["payload"]["balance"]["debt_points"] == 30  # the next purchase paid 20 of it
    refund = events[7]["payload"]
    assert (refund["redemption_id"], refund["phase"], refund["amount_points"]) == (str(late_rid), "refund", 80)
    # 30 back to the first lot, 30 of debt forgiven, the 20 repaid as a new lot: 100 + 20 - 70
    assert (refund["balance"]["available_points"], refund["balance"]["debt_points"]) == (50, 0)
    assert (balance["available_points"], balance["debt_points"]) == (50, 0)
    assert dead == []
    [hold] = await ledger_rows(settings.database_url, "SELECT state FROM holds WHERE redemption_id = $1", late_rid)
    assert hold["state"] == "refunded"
    lots = await ledger_rows(settings.database_url, "SELECT source, remaining_points FROM lots WHERE customer_id = $1"
                                                    " ORDER BY source, amount_points", customer)
    assert [tuple(x) for x in lots] == [("purchase", 0), ("purchase", 30), ("refund", 20)]
    books = await books_of(settings.database_url, customer)
    assert books["trial_balance"] == (0, 0) and books["available"] == books["lots_remaining"] == 50
    assert books["lowest_lot"] >= 0


async def test_a_hold_never_takes_points_past_their_expiry_whenever_the_scheduler_last_ran(settings, kafka_bootstrap):
    """The scheduler expires lots once an interval (here: not at all). A request for points
    first expires what is due at its own time, so the points of a lot past its expiry date
    are never held, though they were still on the balance a moment before."""
    customer, too_much, enough = unique("c-"), uuid.uuid4(), uuid.uuid4()
    old_sale = purchase_recorded(customer, amounts=("100.00",), occurred_at=datetime.now(timezone.utc) - timedelta(days=390))
    async with running_ledger(settings) as (_, client):
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), [old_sale], key=customer)
        await earn(settings, kafka_bootstrap, customer, "100.00")
        await points_events(settings, kafka_bootstrap, 2)
        before = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS), [
            redemption("RedemptionRequested", customer, too_much, 150),
            redemption("RedemptionRequested", customer, enough, 80)], key=customer)
        events = await points_events(settings, kafka_bootstrap, 5)
        after = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
    assert before["available_points"] == 200  # the expired lot's 100 still counted: no scheduler run yet
    expired, rejected, held = events[2:]
    assert (expired["type"], expired["payload"]["amount_points"]) == ("PointsExpired", 100)
    assert (rejected["type"], rejected["payload"]["reason"]) == ("PointsHoldRejected", "insufficient_points")
    assert (held["type"], held["payload"]["amount_points"]) == ("PointsHeld", 80)
    assert (after["available_points"], after["held_points"]) == (20, 80)
    lots = await ledger_rows(settings.database_url, "SELECT remaining_points, held_points, expired_points FROM lots "
                             "WHERE customer_id = $1 ORDER BY expires_at", customer)
    assert [tuple(r) for r in lots] == [(0, 0, 100), (20, 80, 0)]


async def test_a_request_first_voids_the_holds_timed_out_by_its_time_whenever_the_scheduler_last_ran(
        settings, kafka_bootstrap):
    """The scheduler voids timed-out holds once an interval (here: not at all). A new request
    first voids the customer's holds timed out by its own time, so a hold nobody fulfilled in
    time never keeps the customer from their points."""
    customer, first, second = unique("c-"), uuid.uuid4(), uuid.uuid4()
    async with running_ledger(settings) as (_, client):
        await earn(settings, kafka_bootstrap, customer, "100.00")
        await points_events(settings, kafka_bootstrap, 1)
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS),
                      [redemption("RedemptionRequested", customer, first, 80, hold_timeout_s=1)], key=customer)
        await points_events(settings, kafka_bootstrap, 2)
        await asyncio.sleep(1.5)
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS),
                      [redemption("RedemptionRequested", customer, second, 80)], key=customer)
        events = await points_events(settings, kafka_bootstrap, 4)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
    assert [e["type"] for e in events] == ["PointsEarned", "PointsHeld", "PointsReleased", "PointsHeld"]
    released, held = events[2]["payload"], events[3]["payload"]
    assert (released["redemption_id"], released["phase"], released["reason"]) == (str(first), "void", "hold_timeout")
    assert (held["redemption_id"], held["amount_points"]) == (str(second), 80)
    assert (balance["available_points"], balance["held_points"]) == (20, 80)
    states = await ledger_rows(settings.database_url, "SELECT redemption_id, state FROM holds WHERE customer_id = $1",
                               customer)
    assert {r["redemption_id"]: r["state"] for r in states} == {first: "voided", second: "held"}
