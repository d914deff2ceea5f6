"""The redemption saga against the real broker and PostgreSQL: holds under a race, posts,
voids, refunds, timeouts."""

import asyncio
import json
import uuid
from datetime import timedelta

import pytest

from services.ledger.service import Record, apply_rewards, run_scheduler
from services.ledger.settings import LedgerSettings
from shared.topics import POINTS_DLQ, POINTS_EVENTS, REWARDS_EVENTS
from tests.support.kafka import consume, produce, unique
from tests.support.ledger import ADMIN, ledger_rows, ledger_settings, redemption, running_ledger

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
        events = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=501, timeout_s=30)
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
        ledger, pool = app.state.ledger, app.state.runtime.pool
        batches = [[Record(json.dumps(redemption("RedemptionRequested", customer, uuid.uuid4(), cost)).encode())
                     for _ in range(10)] for _ in range(50)]

        async def apply(batch):
            for attempt in range(20):  # a deadlock or serialization failure is retried, as NACK would
                try:
                    async with pool.acquire() as conn:
                        return await apply_rewards(conn, ledger, batch)
                except Exception:
                    if attempt == 19:
                        raise
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(apply(b) for b in batches))
    holds = await ledger_rows(settings.database_url, "SELECT amount_points FROM holds WHERE customer_id = $1", customer)
    [account] = await ledger_rows(settings.database_url, "SELECT * FROM accounts WHERE account_id = $1",
                                  f"customer:{customer}:available")
    assert len(holds) == k
    assert account["debits_pending"] == k * cost and account["credits_posted"] == k * cost


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


async def test_a_hold_that_times_out_is_voided_by_the_scheduler_and_fulfilment_after_it_is_dead_lettered(
        settings, kafka_bootstrap):
    customer, rid = unique("c-"), uuid.uuid4()
    async with running_ledger(settings) as (app, client):
        await credit(client, customer, 50)
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS),
                      [redemption("RedemptionRequested", customer, rid, 40, hold_timeout_s=60)], key=customer)
        await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=2)
        ledger, pool = app.state.ledger, app.state.runtime.pool
        early = await run_scheduler(pool, ledger, now=ledger.clock() + timedelta(seconds=30))
        late = await run_scheduler(pool, ledger, now=ledger.clock() + timedelta(seconds=61))
        again = await run_scheduler(pool, ledger, now=ledger.clock() + timedelta(seconds=62))
        app.state.runtime.relay.wake()
        await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS),
                      [redemption("RedemptionFulfilled", customer, rid, 40)], key=customer)
        events = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=3)
        dead = await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), count=1)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
    assert (early.voided_holds, late.voided_holds, again.voided_holds) == (0, 1, 0)
    released = events[2]
    assert released["type"] == "PointsReleased"
    assert (released["payload"]["phase"], released["payload"]["reason"]) == ("void", "hold_timeout")
    assert dead[0]["reason"] == "fulfilled_after_hold_voided"
    assert (balance["available_points"], balance["held_points"]) == (50, 0)
