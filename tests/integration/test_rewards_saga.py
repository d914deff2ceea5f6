"""The rewards service in-process against the real broker and PostgreSQL, with a fake
ledger answering on points.events. One service instance serves the module; every test
uses its own customers and rewards."""

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import pytest
import pytest_asyncio

from services.rewards import consuming, redemptions, service
from shared.events import utcnow
from shared.topics import POINTS_EVENTS, REWARDS_DLQ, REWARDS_EVENTS
from tests.support.kafka import consume, produce, unique
from tests.support.rewards import (
    ADMIN,
    assert_bad_tokens_refused,
    bearer,
    eventually,
    fake_ledger,
    outcome,
    rewards_settings,
    running_rewards,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def settings(module_env):
    return rewards_settings(module_env, saga_wait_ms=1000, cancellation_window_s=600, request_resend_after_s=1.0,
                           recovery_interval_s=0.25)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rewards(settings, kafka_bootstrap):
    async with running_rewards(settings) as (app, client):
        async with fake_ledger(kafka_bootstrap, settings) as ledger:
            yield app, client, ledger


async def add_reward(client, **fields) -> dict:
    body = {"reward_id": unique("r-"), "name": "A reward", "cost_points": 100, "kind": "physical"} | fields
    response = await client.post("/v1/admin/rewards", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()


async def funded_customer(client, ledger, settings, points: int, *, tier: str = "Bronze") -> tuple[str, dict]:
    """A new customer the ledger credited, once the rewards service has learned the balance."""
    [one] = await funded_customers(client, ledger, settings, points, count=1, tier=tier)
    return one


async def funded_customers(client, ledger, settings, points: int, *, count: int, tier: str = "Bronze"):
    customers = [(c, bearer(c, settings)) for c in (unique("c-") for _ in range(count))]
    for customer, _ in customers:
        await ledger.credit(customer, points, tier=tier)

    async def learned(headers):
        body = (await client.get("/v1/rewards", headers=headers)).json()
        return body["available_points"] == points and body["tier"] == tier

    for _, headers in customers:
        await eventually(lambda: learned(headers))
    return customers


async def settled(ledger, *customers: str) -> None:
    """Wait until the ledger has posted or voided every hold of these customers."""
    async def no_holds():
        return all(ledger.held_points(c) == 0 for c in customers)

    await eventually(no_holds)


async def redeem_outcome(client, headers, reward_id: str, key: str | None = None) -> dict:
    return await outcome(client, headers, await redeem(client, headers, reward_id, key))


async def redeem(client, headers, reward_id: str, key: str | None = None):
    return await client.post("/v1/redemptions", json={"reward_id": reward_id},
                             headers=headers | {"Idempotency-Key": key or unique("k-")})


async def request_attempts(settings, redemption_id: str, *, at_least: int) -> bool:
    conn = await asyncpg.connect(settings.database_url)
    try:
        attempts = await conn.fetchval("SELECT request_attempts FROM rewards.redemptions WHERE redemption_id = $1",
                                       uuid.UUID(redemption_id))
    finally:
        await conn.close()
    return attempts >= at_least


async def ledger_status(client, headers, redemption_id: str, wanted: str) -> dict:
    async def reached():
        body = (await client.get(f"/v1/redemptions/{redemption_id}", headers=headers)).json()
        return body if body["ledger_status"] == wanted else None

    return await eventually(reached)


async def test_a_coupon_redemption_is_fulfilled_with_a_pool_code_and_the_points_posted(rewards, settings,
                                                                                    kafka_bootstrap):
    _, client, ledger = rewards
    reward = await add_reward(client, kind="coupon", cost_points=300)
    upload = await client.post(f"/v1/admin/rewards/{reward['reward_id']}/coupons",
                               json={"codes": ["COUPON-A", "COUPON-B", "COUPON-A"]}, headers=ADMIN)
    assert upload.json() == {"reward_id": reward["reward_id"], "added": 2, "already_in_pool": 1,
                             "coupons_available": 2}
    customer, headers = await funded_customer(client, ledger, settings, 500)
    listed = {r["reward_id"]: r for r in (await client.get("/v1/rewards", headers=headers)).json()["rewards"]}
    assert listed[reward["reward_id"]]["affordable_now"] is True and listed[reward["reward_id"]]["eligible"]

    response = await redeem(client, headers, reward["reward_id"])

    body = await outcome(client, headers, response)
    assert body["status"] == "fulfilled" and body["code"] in {"COUPON-A", "COUPON-B"}
    assert response.headers["Location"] == f"/v1/redemptions/{body['redemption_id']}"
    await ledger_status(client, headers, body["redemption_id"], "redeemed")
    await settled(ledger, customer)
    assert ledger.available[customer] == 200
    events = [e for e in await consume(kafka_bootstrap, settings.topic(REWARDS_EVENTS), at_least=2, idle_s=0.3,
                                       timeout_s=30)
              if e["customer_id"] == customer]
    assert [e["type"] for e in events] == ["RedemptionRequested", "RedemptionFulfilled"]
    assert events[1]["payload"]["code"] == body["code"] and events[1]["_key"] == customer
    assert events[0]["correlation_id"] == events[1]["correlation_id"]
    pool = (await client.get(f"/v1/admin/rewards/{reward['reward_id']}", headers=ADMIN)).json()
    assert pool["coupons_available"] == 1


async def test_a_voucher_gets_a_generated_code_and_a_physical_item_takes_stock(rewards, settings):
    _, client, ledger = rewards
    voucher = await add_reward(client, kind="voucher", voucher_value="10.00", voucher_currency="EUR")
    item = await add_reward(client, kind="physical", stock=2)
    _, headers = await funded_customer(client, ledger, settings, 1000)

    v = await redeem_outcome(client, headers, voucher["reward_id"])
    i = await redeem_outcome(client, headers, item["reward_id"])

    assert v["status"] == "fulfilled" and v["code"].startswith("V-") and len(v["code"]) == 21
    assert i["status"] == "fulfilled" and i["code"] is None
    assert (await client.get(f"/v1/admin/rewards/{item['reward_id']}", headers=ADMIN)).json()["stock"] == 1


async def test_without_enough_points_the_hold_is_rejected_and_nothing_is_reserved(rewards, settings):
    _, client, ledger = rewards
    reward = await add_reward(client, cost_points=1000, stock=1)
    _, headers = await funded_customer(client, ledger, settings, 999)
    listed = {r["reward_id"]: r for r in (await client.get("/v1/rewards", headers=headers)).json()["rewards"]}
    assert listed[reward["reward_id"]]["affordable_now"] is False

    body = await redeem_outcome(client, headers, reward["reward_id"])

    assert body["status"] == "failed" and body["failure_reason"] == "insufficient_points"
    assert body["ledger_status"] == "rejected" and body["code"] is None
    assert (await client.get(f"/v1/admin/rewards/{reward['reward_id']}", headers=ADMIN)).json()["stock"] == 1


async def test_the_last_unit_goes_to_exactly_one_of_many_racing_customers(rewards, settings):
    _, client, ledger = rewards
    reward = await add_reward(client, cost_points=100, stock=1)
    customers = await funded_customers(client, ledger, settings, 100, count=30)

    responses = await asyncio.gather(*(redeem(client, h, reward["reward_id"]) for _, h in customers))

    bodies = [await outcome(client, h, r) for (_, h), r in zip(customers, responses)]
    assert sorted(b["status"] for b in bodies).count("fulfilled") == 1
    assert {b["failure_reason"] for b in bodies if b["status"] == "failed"} == {"out_of_stock"}
    for (_customer, headers), body in zip(customers, bodies):
        expected = "redeemed" if body["status"] == "fulfilled" else "released"
        await ledger_status(client, headers, body["redemption_id"], expected)
    assert sorted(ledger.available[c] for c, _ in customers) == [0] + [100] * 29
    assert all(ledger.held_points(c) == 0 for c, _ in customers)
    assert (await client.get(f"/v1/admin/rewards/{reward['reward_id']}", headers=ADMIN)).json()["stock"] == 0


async def test_holds_arriving_together_share_stock_and_pool_as_if_reserved_one_by_one(rewards, settings):
    # The consumer reserves a batch of holds together (per reward, with counts): the outcome
    # must be the one-at-a-time outcome. A coupon without a code takes no unit of stock.
    _, client, ledger = rewards
    coupon = await add_reward(client, kind="coupon", cost_points=10, stock=3)
    await client.post(f"/v1/admin/rewards/{coupon['reward_id']}/coupons", json={"codes": ["BURST-1", "BURST-2"]},
                      headers=ADMIN)
    item = await add_reward(client, kind="physical", cost_points=10, stock=2)
    customers = await funded_customers(client, ledger, settings, 10, count=10)
    ledger.pause()  # the holds pile up, then arrive in a burst
    requests = [asyncio.create_task(redeem(client, h, (coupon if n < 5 else item)["reward_id"]))
                for n, (_, h) in enumerate(customers)]
    await eventually(lambda: _count_requested(settings, len(customers), [c for c, _ in customers]))
    ledger.resume()

    bodies = [await outcome(client, h, await r) for (_, h), r in zip(customers, requests)]

    on_coupon, on_item = bodies[:5], bodies[5:]
    assert sorted(b["code"] for b in on_coupon if b["status"] == "fulfilled") == ["BURST-1", "BURST-2"]
    assert sorted(b["failure_reason"] for b in on_coupon if b["status"] == "failed") == ["coupon_pool_empty"] * 3
    assert [b["status"] for b in on_item].count("fulfilled") == 2
    assert sorted(b["failure_reason"] for b in on_item if b["status"] == "failed") == ["out_of_stock"] * 3
    assert (await client.get(f"/v1/admin/rewards/{coupon['reward_id']}", headers=ADMIN)).json()["stock"] == 1
    assert (await client.get(f"/v1/admin/rewards/{item['reward_id']}", headers=ADMIN)).json()["stock"] == 0
    await settled(ledger, *(c for c, _ in customers))
    assert sorted(ledger.available[c] for c, _ in customers) == [0] * 4 + [10] * 6


async def _count_requested(settings, count: int, customers: list[str]) -> bool:
    conn = await asyncpg.connect(settings.database_url)
    try:
        n = await conn.fetchval("SELECT count(*) FROM rewards.redemptions WHERE customer_id = ANY($1::text[])",
                                customers)
    finally:
        await conn.close()
    return n == count


async def test_one_customer_firing_many_redemptions_gets_only_what_the_points_pay_for(rewards, settings):
    _, client, ledger = rewards
    reward = await add_reward(client, cost_points=10)
    customer, headers = await funded_customer(client, ledger, settings, 50)

    responses = await asyncio.gather(*(redeem(client, headers, reward["reward_id"]) for _ in range(12)))

    bodies = [await outcome(client, headers, r) for r in responses]
    statuses = [b["status"] for b in bodies]
    assert statuses.count("fulfilled") == 5 and statuses.count("failed") == 7
    assert {b["failure_reason"] for b in bodies if b["status"] == "failed"} == {"insufficient_points"}
    await settled(ledger, customer)
    assert ledger.available[customer] == 0


async def test_the_per_customer_limit_holds_under_concurrent_requests(rewards, settings):
    _, client, ledger = rewards
    reward = await add_reward(client, cost_points=10, per_customer_limit=2)
    _, headers = await funded_customer(client, ledger, settings, 1000)

    responses = await asyncio.gather(*(redeem(client, headers, reward["reward_id"]) for _ in range(6)))

    codes = sorted(200 if r.status_code == 202 else r.status_code for r in responses)  # 202: still in the saga
    assert codes == [200, 200, 409, 409, 409, 409]
    assert {r.json()["error"] for r in responses if r.status_code == 409} == {"customer_limit_reached"}
    listed = {r["reward_id"]: r for r in (await client.get("/v1/rewards", headers=headers)).json()["rewards"]}
    assert listed[reward["reward_id"]]["ineligible_reason"] == "customer_limit_reached"


async def test_an_idempotency_key_replayed_returns_the_same_redemption(rewards, settings):
    _, client, ledger = rewards
    reward = await add_reward(client, cost_points=10)
    other = await add_reward(client, cost_points=10)
    customer, headers = await funded_customer(client, ledger, settings, 100)

    first, concurrent_a, concurrent_b = await asyncio.gather(
        *(redeem(client, headers, reward["reward_id"], key="same-key") for _ in range(3))
    )
    later = await redeem(client, headers, reward["reward_id"], key="same-key")
    misuse = await redeem(client, headers, other["reward_id"], key="same-key")

    ids = {r.json()["redemption_id"] for r in (first, concurrent_a, concurrent_b, later)}
    assert len(ids) == 1
    finals = [await outcome(client, headers, r) for r in (first, concurrent_a, concurrent_b, later)]
    assert all(f == finals[0] for f in finals) and finals[0]["status"] == "fulfilled"
    assert later.headers["Idempotent-Replayed"] == "true"
    assert misuse.status_code == 422 and misuse.json()["error"] == "idempotency_key_reused"
    await settled(ledger, customer)
    assert ledger.available[customer] == 90
    assert len((await client.get("/v1/redemptions", headers=headers)).json()["redemptions"]) == 1


async def test_a_customer_cannot_read_or_act_on_another_customers_redemption(rewards, settings):
    _, client, ledger = rewards
    reward = await add_reward(client, cost_points=10)
    alice, alice_headers = await funded_customer(client, ledger, settings, 100)
    _, bob_headers = await funded_customer(client, ledger, settings, 100)
    mine = await redeem_outcome(client, alice_headers, reward["reward_id"], key="k1")
    rid = mine["redemption_id"]

    read = await client.get(f"/v1/redemptions/{rid}", headers=bob_headers)
    cancel = await client.post(f"/v1/redemptions/{rid}/cancel", headers=bob_headers)
    listing = await client.get("/v1/redemptions", headers=bob_headers)
    catalog = await client.get("/v1/rewards", headers=bob_headers)
    same_key = await redeem(client, bob_headers, reward["reward_id"], key="k1")

    assert read.status_code == 404 and cancel.status_code == 404
    assert listing.json()["redemptions"] == []
    # The same Idempotency-Key from Bob is Bob's own request: a new redemption on his account.
    assert same_key.json()["redemption_id"] != rid
    assert catalog.json()["customer_id"] != alice and catalog.json()["available_points"] == 100
    still = await client.get(f"/v1/redemptions/{rid}", headers=alice_headers)
    assert still.json()["status"] == "fulfilled" and ledger.available[alice] == 90


async def test_missing_expired_tampered_and_alg_none_tokens_are_refused_everywhere(rewards, settings):
    _, client, ledger = rewards
    reward = await add_reward(client, cost_points=10)
    victim, headers = await funded_customer(client, ledger, settings, 100)
    mine = await redeem_outcome(client, headers, reward["reward_id"])

    await assert_bad_tokens_refused(client, settings, victim=victim, redemption_id=mine["redemption_id"],
                                    reward_id=reward["reward_id"])

    assert (await client.get(f"/v1/redemptions/{mine['redemption_id']}", headers=headers)).json()["status"] == (
        "fulfilled")
    assert len((await client.get("/v1/redemptions", headers=headers)).json()["redemptions"]) == 1


async def test_cancellation_within_the_window_refunds_and_restocks_after_it_is_refused(rewards, settings):
    _, client, ledger = rewards
    reward = await add_reward(client, cost_points=40, stock=3)
    customer, headers = await funded_customer(client, ledger, settings, 100)
    first = await redeem_outcome(client, headers, reward["reward_id"])
    second = await redeem_outcome(client, headers, reward["reward_id"])
    await ledger_status(client, headers, first["redemption_id"], "redeemed")
    await ledger_status(client, headers, second["redemption_id"], "redeemed")
    assert ledger.available[customer] == 20

    cancelled = await client.post(f"/v1/redemptions/{first['redemption_id']}/cancel", headers=headers)
    again = await client.post(f"/v1/redemptions/{first['redemption_id']}/cancel", headers=headers)
    conn = await asyncpg.connect(settings.database_url)
    try:  # the second one was fulfilled longer ago than the window
        await conn.execute("UPDATE rewards.redemptions SET fulfilled_at = fulfilled_at - interval '601 seconds' "
                           "WHERE redemption_id = $1", uuid.UUID(second["redemption_id"]))
    finally:
        await conn.close()
    too_late = await client.post(f"/v1/redemptions/{second['redemption_id']}/cancel", headers=headers)

    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["code"] is None
    assert again.status_code == 409 and again.json()["error"] == "cancellation_not_allowed"
    assert too_late.status_code == 409 and "window" in too_late.json()["detail"]
    await ledger_status(client, headers, first["redemption_id"], "released")
    assert ledger.available[customer] == 60
    assert (await client.get(f"/v1/admin/rewards/{reward['reward_id']}", headers=ADMIN)).json()["stock"] == 2


async def test_a_slow_ledger_gets_a_202_with_the_status_url_and_a_resent_request(rewards, settings):
    _, client, ledger = rewards
    reward = await add_reward(client, cost_points=10)
    customer, headers = await funded_customer(client, ledger, settings, 100)
    ledger.pause()
    try:
        response = await redeem(client, headers, reward["reward_id"])
        assert response.status_code == 202 and response.json()["status"] == "requested"
        # Past request_resend_after_s the recovery loop requests it again.
        await eventually(lambda: request_attempts(settings, response.json()["redemption_id"], at_least=2))
    finally:
        ledger.resume()
    status_url = response.headers["Location"]

    async def fulfilled():
        return (await client.get(status_url, headers=headers)).json()["status"] == "fulfilled"

    await eventually(fulfilled)

    async def both_requests_seen():
        seen = [e for e in ledger.seen if e["customer_id"] == customer and e["type"] == "RedemptionRequested"]
        return seen if len(seen) >= 2 else None

    requests = await eventually(both_requests_seen)
    assert len({e["event_id"] for e in requests}) == len(requests)
    await settled(ledger, customer)
    # The duplicate was answered 'duplicate_redemption' and changed nothing: points taken once.
    assert ledger.available[customer] == 90


async def test_an_unanswered_request_is_given_up_after_a_hold_lifetime_and_any_hold_voided(rewards, settings):
    app, client, ledger = rewards
    reward = await add_reward(client, cost_points=10)
    customer, headers = await funded_customer(client, ledger, settings, 100)
    ledger.pause()
    try:
        response = await redeem(client, headers, reward["reward_id"])
        ctx = app.state.rewards
        later = service.RewardsContext(settings=ctx.settings, pool_getter=ctx.pool_getter, wake_relay=ctx.wake_relay,
                                       waiters=ctx.waiters,
                                       now=lambda: utcnow() + timedelta(seconds=settings.hold_timeout_s + 1))

        async def given_up():
            # the service's own recovery loop may hold the row for a moment (SKIP LOCKED)
            await redemptions.recover_unanswered(later)
            body = (await client.get(response.headers["Location"], headers=headers)).json()
            return body if body["status"] != "requested" else None

        gone = await eventually(given_up)
    finally:
        ledger.resume()
    assert gone["status"] == "failed" and gone["failure_reason"] == "ledger_timeout"
    # The ledger got the request (held) then the failure (voided): the points are back.
    await ledger_status(client, headers, gone["redemption_id"], "released")
    assert ledger.available[customer] == 100 and ledger.held_points(customer) == 0


async def test_bad_points_events_go_to_the_dead_letter_topic_and_the_consumer_goes_on(rewards, settings,
                                                                                  kafka_bootstrap):
    _, client, ledger = rewards
    bad_type = {"type": "PointsHeld", "event_id": str(uuid.uuid4()), "payload": {"redemption_id": "nope"}}
    await produce(kafka_bootstrap, settings.topic(POINTS_EVENTS), [b"{not json", bad_type, [1, 2]], key="c-bad")
    reward = await add_reward(client, cost_points=10)
    _, headers = await funded_customer(client, ledger, settings, 10)

    after = await redeem_outcome(client, headers, reward["reward_id"])
    dead = await consume(kafka_bootstrap, settings.topic(REWARDS_DLQ), count=3, timeout_s=10)

    assert after["status"] == "fulfilled"
    assert sorted(d["reason"] for d in dead) == ["invalid_event", "invalid_json", "not_an_object"]
    assert all(d["original_topic"] == settings.topic(POINTS_EVENTS) and d["original_key"] == "c-bad" for d in dead)
    assert any(d["original"] == "{not json" for d in dead)


async def test_minimum_tier_and_validity_window_are_enforced(rewards, settings):
    _, client, ledger = rewards
    gold_only = await add_reward(client, min_tier="Gold")
    ended = await add_reward(client, valid_until=(utcnow() - timedelta(minutes=1)).isoformat())
    _, bronze = await funded_customer(client, ledger, settings, 1000, tier="Bronze")
    _, gold = await funded_customer(client, ledger, settings, 1000, tier="Gold")

    refused = await redeem(client, bronze, gold_only["reward_id"])
    allowed = await redeem(client, gold, gold_only["reward_id"])
    expired = await redeem(client, gold, ended["reward_id"])
    listed = {r["reward_id"]: r for r in (await client.get("/v1/rewards", headers=bronze)).json()["rewards"]}

    assert refused.status_code == 403 and refused.json()["error"] == "tier_too_low"
    assert (await outcome(client, gold, allowed))["status"] == "fulfilled"
    assert expired.status_code == 409 and expired.json()["reason"] == "expired"
    assert listed[gold_only["reward_id"]]["ineligible_reason"] == "tier_too_low"
    assert ended["reward_id"] not in listed


async def test_the_admin_api_needs_its_key_and_validates_rewards(rewards):
    _, client, _ = rewards
    no_key = await client.get("/v1/admin/rewards")
    wrong = await client.get("/v1/admin/rewards", headers={"X-Admin-Key": "guess"})
    bad_voucher = await client.post("/v1/admin/rewards", headers=ADMIN, json={
        "reward_id": unique("r-"), "name": "V", "cost_points": 10, "kind": "voucher"})
    bad_tier = await client.post("/v1/admin/rewards", headers=ADMIN, json={
        "reward_id": unique("r-"), "name": "V", "cost_points": 10, "kind": "physical", "min_tier": "Diamond"})
    reward = await add_reward(client, stock=5)
    duplicate = await client.post("/v1/admin/rewards", headers=ADMIN, json={
        "reward_id": reward["reward_id"], "name": "again", "cost_points": 10, "kind": "physical"})
    coupons_on_item = await client.post(f"/v1/admin/rewards/{reward['reward_id']}/coupons", headers=ADMIN,
                                        json={"codes": ["X"]})
    patched = await client.patch(f"/v1/admin/rewards/{reward['reward_id']}", headers=ADMIN,
                                 json={"stock": None, "cost_points": 25})

    assert no_key.status_code == 401 and wrong.status_code == 401
    assert bad_voucher.status_code == 422 and bad_voucher.json()["field"] == "voucher_value"
    assert bad_tier.status_code == 422 and bad_tier.json()["field"] == "min_tier"
    assert duplicate.status_code == 422 and duplicate.json()["field"] == "reward_id"
    assert coupons_on_item.status_code == 422
    assert patched.status_code == 200 and patched.json()["stock"] is None and patched.json()["cost_points"] == 25


async def test_metrics_report_outcomes_latency_and_stock(rewards, settings):
    _, client, ledger = rewards
    reward = await add_reward(client, cost_points=10, stock=7)
    _, headers = await funded_customer(client, ledger, settings, 10)
    assert (await redeem_outcome(client, headers, reward["reward_id"]))["status"] == "fulfilled"

    async def sampled():
        text = (await client.get("/metrics")).text
        return text if f'rewards_stock_remaining{{reward_id="{reward["reward_id"]}"}} 6.0' in text else None

    text = await eventually(sampled)
    assert 'rewards_redemptions_total{outcome="fulfilled",reason=""}' in text
    assert 'rewards_redemption_latency_seconds_count{outcome="fulfilled"}' in text


async def test_a_waiter_learns_an_outcome_committed_elsewhere_from_the_database(rewards, settings):
    # Another instance may consume the ledger's answer: its commit never resolves our future.
    app, client, ledger = rewards
    reward = await add_reward(client, cost_points=10)
    _, headers = await funded_customer(client, ledger, settings, 10)
    done = await redeem_outcome(client, headers, reward["reward_id"])
    waiters = service.OutcomeWaiters()
    fut = waiters.register(uuid.UUID(done["redemption_id"]))
    pending = waiters.register(uuid.uuid4())  # unknown to the database: stays unresolved

    resolved = await waiters.poll_once(app.state.rewards.pool)

    assert resolved == 1 and fut.done() and not pending.done()


async def test_a_ledger_answer_that_keeps_failing_is_dead_lettered_and_does_not_block_others(
        rewards, settings, kafka_bootstrap, monkeypatch):
    app, client, ledger = rewards
    poison = await add_reward(client, cost_points=10)
    fine = await add_reward(client, cost_points=10)
    (victim, victim_h), (other, other_h) = await funded_customers(client, ledger, settings, 10, count=2)
    real_reserve = consuming._reserve_for_reward

    async def broken_for_poison(repo, reward, held, **kw):
        if reward.reward_id == poison["reward_id"]:
            raise RuntimeError("reservation exploded")
        return await real_reserve(repo, reward, held, **kw)

    monkeypatch.setattr(consuming, "_reserve_for_reward", broken_for_poison)
    stuck, served = await asyncio.gather(redeem(client, victim_h, poison["reward_id"]),
                                         redeem(client, other_h, fine["reward_id"]))

    async def served_fulfilled():
        # may take the retries of the batch it shared with the poison (then it is applied alone)
        return (await client.get(served.headers["Location"], headers=other_h)).json()["status"] == "fulfilled"

    await eventually(served_fulfilled, timeout_s=20)

    async def dead_lettered():
        letters = await consume(kafka_bootstrap, settings.topic(REWARDS_DLQ), idle_s=0.3, timeout_s=5)
        return [d for d in letters if stuck.json()["redemption_id"] in d["original"]]

    dead = await eventually(dead_lettered, timeout_s=20)
    monkeypatch.setattr(consuming, "_reserve_for_reward", real_reserve)
    assert len(dead) == 1 and dead[0]["reason"].startswith("processing_failed: RuntimeError: reservation exploded")
    assert dead[0]["original_key"] == victim
    # The dead-lettered hold is not lost: the redemption is still open, and the recovery ends
    # it (given up after a hold's lifetime), which voids the hold.
    assert (await client.get(stuck.headers["Location"], headers=victim_h)).json()["status"] == "requested"
    ctx = app.state.rewards
    later = service.RewardsContext(settings=ctx.settings, pool_getter=ctx.pool_getter, wake_relay=ctx.wake_relay,
                                   waiters=ctx.waiters,
                                   now=lambda: utcnow() + timedelta(seconds=settings.hold_timeout_s + 1))

    async def given_up():
        await redemptions.recover_unanswered(later)
        return (await client.get(stuck.headers["Location"], headers=victim_h)).json()["status"] == "failed"

    await eventually(given_up)
    await ledger_status(client, victim_h, stuck.json()["redemption_id"], "released")
    assert ledger.available[victim] == 10 and ledger.available[other] == 0
