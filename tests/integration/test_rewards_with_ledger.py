"""The rewards service and the real ledger, both in this process, against the real broker
and PostgreSQL: the redemption saga end to end, with the ledger's balances as the judge."""

import asyncio

import asyncpg
import pytest
import pytest_asyncio

from tests.support import ledger as ledger_support
from tests.support.kafka import unique
from tests.support.rewards import (
    ADMIN,
    assert_bad_tokens_refused,
    bearer,
    eventually,
    outcome,
    rewards_settings,
    running_rewards,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def settings(module_env):
    return rewards_settings(module_env, saga_wait_ms=5000, request_resend_after_s=3.0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def services(module_env, settings):
    async with ledger_support.running_ledger(ledger_support.ledger_settings(module_env)) as (_, ledger_client):
        async with running_rewards(settings) as (_, client):
            yield client, ledger_client


async def fund(ledger_client, client, settings, points: int, *, count: int) -> list[tuple[str, dict]]:
    """New customers credited by the ledger (an audited goodwill adjustment), once the
    rewards service has learned their balance from points.events."""
    customers = [unique("c-") for _ in range(count)]
    for c in customers:
        response = await ledger_client.post("/v1/admin/adjustments", headers=ledger_support.ADMIN, json={
            "customer_id": c, "amount_points": points, "reason_code": "goodwill", "actor": "test"})
        assert response.status_code == 201, response.text

    async def learned():
        conn = await asyncpg.connect(settings.database_url)
        try:
            n = await conn.fetchval("SELECT count(*) FROM rewards.customer_standing WHERE customer_id = ANY($1) "
                                    "AND available_points = $2", customers, points)
        finally:
            await conn.close()
        return n == count

    await eventually(learned, timeout_s=30)
    return [(c, bearer(c, settings)) for c in customers]


async def balance(ledger_client, customer_id: str) -> dict:
    return (await ledger_client.get(f"/v1/customers/{customer_id}/balance", headers=ledger_support.ADMIN)).json()


async def settled_balances(ledger_client, customers: list[str]) -> dict[str, dict]:
    """The ledger's balances once no hold is left (every hold posted or voided)."""
    async def no_holds():
        balances = {c: await balance(ledger_client, c) for c in customers}
        return balances if all(b["held_points"] == 0 for b in balances.values()) else None

    return await eventually(no_holds, timeout_s=30, interval_s=0.2)


async def add_reward(client, **fields) -> dict:
    body = {"reward_id": unique("r-"), "name": "A reward", "cost_points": 100, "kind": "physical"} | fields
    response = await client.post("/v1/admin/rewards", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()


async def redeem_outcome(client, headers, reward_id: str, key: str | None = None) -> dict:
    return await outcome(client, headers, await redeem(client, headers, reward_id, key))


async def redeem(client, headers, reward_id: str, key: str | None = None):
    return await client.post("/v1/redemptions", json={"reward_id": reward_id},
                             headers=headers | {"Idempotency-Key": key or unique("k-")})


async def test_100_customers_racing_for_the_last_unit_give_one_fulfilment_and_99_voided_holds(services, settings):
    client, ledger_client = services
    reward = await add_reward(client, cost_points=100, stock=1)
    customers = await fund(ledger_client, client, settings, 100, count=100)

    responses = await asyncio.gather(*(redeem(client, h, reward["reward_id"]) for _, h in customers))

    bodies = [await outcome(client, h, r) for (_, h), r in zip(customers, responses)]
    winners = [c for (c, _), b in zip(customers, bodies) if b["status"] == "fulfilled"]
    assert len(winners) == 1
    assert [b["failure_reason"] for b in bodies if b["status"] == "failed"] == ["out_of_stock"] * 99
    balances = await settled_balances(ledger_client, [c for c, _ in customers])
    assert balances[winners[0]]["available_points"] == 0
    assert sorted(b["available_points"] for b in balances.values()) == [0] + [100] * 99

    async def ledger_answered_all():
        rows = [(await client.get(f"/v1/redemptions/{b['redemption_id']}", headers=h)).json()
                for (_, h), b in zip(customers, bodies)]
        statuses = sorted(r["ledger_status"] for r in rows)
        return statuses if statuses == ["redeemed"] + ["released"] * 99 else None

    await eventually(ledger_answered_all, timeout_s=30)
    assert (await client.get(f"/v1/admin/rewards/{reward['reward_id']}", headers=ADMIN)).json()["stock"] == 0


async def test_one_customer_firing_50_redemptions_with_points_for_10_gets_exactly_10(services, settings):
    client, ledger_client = services
    reward = await add_reward(client, cost_points=10, kind="voucher", voucher_value="1.00", voucher_currency="EUR")
    [(customer, headers)] = await fund(ledger_client, client, settings, 100, count=1)

    responses = await asyncio.gather(*(redeem(client, headers, reward["reward_id"]) for _ in range(50)))

    bodies = [await outcome(client, headers, r) for r in responses]
    fulfilled = [b for b in bodies if b["status"] == "fulfilled"]
    assert len(fulfilled) == 10 and len({b["code"] for b in fulfilled}) == 10
    assert {b["failure_reason"] for b in bodies if b["status"] == "failed"} == {"insufficient_points"}
    balances = await settled_balances(ledger_client, [customer])
    assert balances[customer]["available_points"] == 0


async def test_an_idempotency_key_replayed_holds_the_points_once(services, settings):
    client, ledger_client = services
    reward = await add_reward(client, cost_points=30)
    [(customer, headers)] = await fund(ledger_client, client, settings, 100, count=1)

    first = await redeem(client, headers, reward["reward_id"], key="once")
    replays = await asyncio.gather(*(redeem(client, headers, reward["reward_id"], key="once") for _ in range(5)))

    final = await outcome(client, headers, first)
    assert final["status"] == "fulfilled"
    assert all(r.json()["redemption_id"] == final["redemption_id"] for r in replays)
    replay_finals = [await outcome(client, headers, r) for r in replays]
    assert all(f == final for f in replay_finals)
    balances = await settled_balances(ledger_client, [customer])
    assert balances[customer]["available_points"] == 70


async def test_cancellation_gives_the_points_back_through_the_ledger(services, settings):
    client, ledger_client = services
    reward = await add_reward(client, cost_points=40, stock=1)
    [(customer, headers)] = await fund(ledger_client, client, settings, 100, count=1)
    body = await redeem_outcome(client, headers, reward["reward_id"])
    assert body["status"] == "fulfilled"
    assert (await settled_balances(ledger_client, [customer]))[customer]["available_points"] == 60

    async def posted():
        r = (await client.get(f"/v1/redemptions/{body['redemption_id']}", headers=headers)).json()
        return r["ledger_status"] == "redeemed"

    await eventually(posted)
    cancelled = await client.post(f"/v1/redemptions/{body['redemption_id']}/cancel", headers=headers)

    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    async def refunded():
        return (await balance(ledger_client, customer))["available_points"] == 100

    await eventually(refunded)
    assert (await client.get(f"/v1/admin/rewards/{reward['reward_id']}", headers=ADMIN)).json()["stock"] == 1


async def test_a_customer_unknown_to_the_ledger_is_refused_by_the_ledger(services, settings):
    client, _ = services
    reward = await add_reward(client, cost_points=1)
    body = (await redeem(client, bearer(unique("c-stranger-"), settings), reward["reward_id"])).json()
    assert body["status"] == "failed" and body["failure_reason"] == "account_unknown"


async def test_customer_a_cannot_read_redeem_or_cancel_on_customer_b(services, settings):
    client, ledger_client = services
    reward = await add_reward(client, cost_points=10)
    [(alice, alice_h), (bob, bob_h)] = await fund(ledger_client, client, settings, 100, count=2)
    mine = await redeem_outcome(client, alice_h, reward["reward_id"], key="shared-key")
    assert mine["status"] == "fulfilled"
    rid = mine["redemption_id"]

    read = await client.get(f"/v1/redemptions/{rid}", headers=bob_h)
    cancel = await client.post(f"/v1/redemptions/{rid}/cancel", headers=bob_h)
    listing = await client.get("/v1/redemptions", headers=bob_h)
    catalog = await client.get("/v1/rewards", headers=bob_h)
    # Bob replaying Alice's key creates Bob's own redemption, paid with Bob's points.
    bobs_own = await redeem_outcome(client, bob_h, reward["reward_id"], key="shared-key")

    assert read.status_code == 404 and cancel.status_code == 404
    assert listing.json()["redemptions"] == []
    assert catalog.json()["customer_id"] == bob
    assert bobs_own["redemption_id"] != rid and bobs_own["status"] == "fulfilled"
    balances = await settled_balances(ledger_client, [alice, bob])
    assert balances[alice]["available_points"] == 90 and balances[bob]["available_points"] == 90
    alice_view = (await client.get(f"/v1/redemptions/{rid}", headers=alice_h)).json()
    assert alice_view["status"] == "fulfilled"


async def test_expired_tampered_and_alg_none_tokens_are_refused_on_every_endpoint(services, settings):
    client, ledger_client = services
    reward = await add_reward(client, cost_points=10)
    [(victim, headers)] = await fund(ledger_client, client, settings, 100, count=1)
    mine = await redeem_outcome(client, headers, reward["reward_id"])
    assert mine["status"] == "fulfilled"

    await assert_bad_tokens_refused(client, settings, victim=victim, redemption_id=mine["redemption_id"],
                                    reward_id=reward["reward_id"])

    assert (await settled_balances(ledger_client, [victim]))[victim]["available_points"] == 90
    assert (await client.get(f"/v1/redemptions/{mine['redemption_id']}", headers=headers)).json()["status"] == (
        "fulfilled")
