"""Fulfilment of physical rewards with the rewards service and the real ledger in this
process, against the real broker and PostgreSQL: a redeemed item waits in the fulfilment
queue, is shipped once (RedemptionShipped on rewards.events, which the ledger reads and
ignores), the customer sees the tracking, and a shipped item can no longer be cancelled."""

import uuid

import asyncpg
import pytest
import pytest_asyncio

from services.rewards import shipping
from shared.topics import POINTS_DLQ, POINTS_EVENTS, REWARDS_EVENTS
from tests.support import ledger as ledger_support
from tests.support.kafka import consume, unique
from tests.support.rewards import (
    ADMIN,
    bearer,
    eventually,
    outcome,
    rewards_settings,
    running_rewards,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

ADDRESS = {"recipient": "Anna Nowak", "line1": "ul. Prosta 1/2", "city": "Warszawa", "postal_code": "00-850",
           "country": "PL", "phone": "+48 600 100 200"}
ADDRESS_OUT = ADDRESS | {"line2": None, "region": None}
PARCEL = {"carrier": "InPost", "tracking_number": "IP-000123", "tracking_url": "https://track.example/IP-000123",
          "actor": "warehouse-anna"}


@pytest.fixture(scope="module")
def settings(module_env):
    # A long cancellation window: a refusal after shipping is the shipment's doing, not the window's.
    return rewards_settings(module_env, saga_wait_ms=5000, cancellation_window_s=3600)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def services(module_env, settings):
    async with ledger_support.running_ledger(ledger_support.ledger_settings(module_env)) as (_, ledger_client):
        async with running_rewards(settings) as (app, client):
            yield app, client, ledger_client


async def fund(ledger_client, settings, points: int) -> tuple[str, dict]:
    customer = unique("c-")
    response = await ledger_client.post("/v1/admin/adjustments", headers=ledger_support.ADMIN, json={
        "customer_id": customer, "amount_points": points, "reason_code": "goodwill", "actor": "test"})
    assert response.status_code == 201, response.text

    async def learned():
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await conn.fetchval("SELECT available_points FROM rewards.customer_standing "
                                       "WHERE customer_id = $1", customer) == points
        finally:
            await conn.close()

    await eventually(learned, timeout_s=30)
    return customer, bearer(customer, settings)


async def add_reward(client, **fields) -> dict:
    body = {"reward_id": unique("r-"), "name": "Travel mug", "cost_points": 100, "kind": "physical"} | fields
    response = await client.post("/v1/admin/rewards", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()


async def redeem(client, headers, reward_id: str, **body) -> dict:
    response = await client.post("/v1/redemptions", json={"reward_id": reward_id} | body,
                                 headers=headers | {"Idempotency-Key": unique("k-")})
    return await outcome(client, headers, response)


async def ledger_balance(ledger_client, customer: str) -> dict:
    return (await ledger_client.get(f"/v1/customers/{customer}/balance", headers=ledger_support.ADMIN)).json()


async def redeemed_by_ledger(client, headers, redemption_id: str) -> dict:
    async def redeemed():
        body = (await client.get(f"/v1/redemptions/{redemption_id}", headers=headers)).json()
        return body if body["ledger_status"] == "redeemed" else None

    return await eventually(redeemed, timeout_s=30)


async def queue(client, state: str = "awaiting_shipment", **params) -> list[dict]:
    """Every page of the fulfilment queue in that state."""
    items, cursor = [], None
    while True:
        response = await client.get("/v1/admin/fulfilments", headers=ADMIN,
                                    params={"state": state, **params} | ({"cursor": cursor} if cursor else {}))
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["state"] == state
        assert page["fulfilments"] or not items, "an empty page after a full one: next_cursor promised more"
        items += page["fulfilments"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def test_a_physical_reward_is_queued_shipped_once_tracked_and_no_longer_cancellable(services, settings,
                                                                                         kafka_bootstrap):
    app, client, ledger_client = services
    reward = await add_reward(client, cost_points=100, stock=3)
    customer, headers = await fund(ledger_client, settings, 250)

    redeemed = await redeem(client, headers, reward["reward_id"], delivery_address=ADDRESS)
    assert redeemed["status"] == "fulfilled", redeemed
    rid = redeemed["redemption_id"]
    assert redeemed["shipment"]["state"] == "awaiting_shipment" and redeemed["delivery_address"] == ADDRESS_OUT
    await redeemed_by_ledger(client, headers, rid)

    waiting = {q["redemption_id"]: q for q in await queue(client, limit=2)}  # pages of 2: the cursor is used
    assert rid in waiting
    # One page holding exactly the whole queue is the last one (no next_cursor to an empty page).
    assert {q["redemption_id"] for q in await queue(client, limit=len(waiting))} == set(waiting)
    entry = waiting[rid]
    assert (entry["customer_id"], entry["reward_id"], entry["reward_name"]) == (customer, reward["reward_id"],
                                                                                "Travel mug")
    assert entry["delivery_address"] == ADDRESS_OUT and entry["requested_at"] and entry["fulfilled_at"]
    await shipping.sample_shipment_queue(app.state.rewards)
    awaiting_before = await gauge(client, "rewards_awaiting_shipment")
    assert awaiting_before >= 1
    shipped_before = await gauge(client, 'rewards_shipments_total{event="shipped"}')

    first = await client.post(f"/v1/admin/redemptions/{rid}/ship", headers=ADMIN, json=PARCEL)
    again = await client.post(f"/v1/admin/redemptions/{rid}/ship", headers=ADMIN, json=PARCEL)
    other = await client.post(f"/v1/admin/redemptions/{rid}/ship", headers=ADMIN,
                              json=PARCEL | {"tracking_number": "IP-999999"})

    assert first.status_code == 200, first.text
    shipped = first.json()
    assert shipped["status"] == "fulfilled" and shipped["shipped_by"] == "warehouse-anna"
    assert shipped["shipment"]["state"] == "shipped" and shipped["shipment"]["carrier"] == "InPost"
    assert again.status_code == 200 and again.json() == shipped
    assert other.status_code == 409 and other.json()["error"] == "already_shipped", other.text
    assert rid not in {q["redemption_id"] for q in await queue(client)}
    assert rid in {q["redemption_id"] for q in await queue(client, "shipped")}
    await shipping.sample_shipment_queue(app.state.rewards)
    assert await gauge(client, "rewards_awaiting_shipment") == awaiting_before - 1
    assert await gauge(client, 'rewards_shipments_total{event="shipped"}') == shipped_before + 1

    mine = (await client.get(f"/v1/redemptions/{rid}", headers=headers)).json()
    assert mine["shipment"] == {"state": "shipped", "carrier": "InPost", "tracking_number": "IP-000123",
                                "tracking_url": "https://track.example/IP-000123",
                                "shipped_at": shipped["shipment"]["shipped_at"], "delivered_at": None}
    assert "shipped_by" not in mine and "customer_id" not in mine
    listed = (await client.get("/v1/redemptions", headers=headers)).json()["redemptions"]
    assert [r["shipment"]["tracking_number"] for r in listed if r["redemption_id"] == rid] == ["IP-000123"]

    cancel = await client.post(f"/v1/redemptions/{rid}/cancel", headers=headers)
    assert cancel.status_code == 409 and cancel.json()["error"] == "already_shipped", cancel.text

    events = [e for e in await consume(kafka_bootstrap, settings.topic(REWARDS_EVENTS), at_least=3, idle_s=1.0,
                                           timeout_s=30)
              if e["customer_id"] == customer]
    assert [e["type"] for e in events] == ["RedemptionRequested", "RedemptionFulfilled", "RedemptionShipped"]
    payload = events[-1]["payload"]
    assert (payload["redemption_id"], payload["carrier"], payload["tracking_number"], payload["tracking_url"]) == (
        rid, "InPost", "IP-000123", "https://track.example/IP-000123")
    assert events[-1]["correlation_id"] == events[0]["correlation_id"] and events[-1]["_key"] == customer
    assert "recipient" not in str(events)  # the address stays in the rewards service

    # The ledger read the shipment and moved nothing: the points stay redeemed, nothing dead-lettered.
    async def ledger_read_it():
        conn = await asyncpg.connect(settings.database_url)  # the ledger's schema is in the same database
        try:
            return await conn.fetchval("SELECT count(*) FROM ledger.inbox WHERE event_id = $1",
                                       uuid.UUID(events[-1]["event_id"])) == 1
        finally:
            await conn.close()

    await eventually(ledger_read_it, timeout_s=30)
    balance = await ledger_balance(ledger_client, customer)
    assert (balance["available_points"], balance["held_points"]) == (150, 0)
    assert [e for e in await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), idle_s=0.5, timeout_s=5)
            if e.get("original_key") == customer] == []
    points = [e["type"] for e in await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), idle_s=0.5,
                                                timeout_s=5) if e["customer_id"] == customer]
    assert points.count("PointsRedeemed") == 1 and "PointsReleased" not in points
    after = (await client.get(f"/v1/redemptions/{rid}", headers=headers)).json()
    assert (after["status"], after["ledger_status"]) == ("fulfilled", "redeemed")


async def test_delivery_follows_the_shipment_and_is_told_once(services, settings, kafka_bootstrap):
    _, client, ledger_client = services
    reward = await add_reward(client, cost_points=10)
    customer, headers = await fund(ledger_client, settings, 10)
    rid = (await redeem(client, headers, reward["reward_id"]))["redemption_id"]

    early = await client.post(f"/v1/admin/redemptions/{rid}/deliver", headers=ADMIN, json={"actor": "courier"})
    assert early.status_code == 409 and early.json()["reason"] == "not_shipped", early.text
    assert (await client.post(f"/v1/admin/redemptions/{rid}/ship", headers=ADMIN, json=PARCEL)).status_code == 200
    delivered = [await client.post(f"/v1/admin/redemptions/{rid}/deliver", headers=ADMIN, json={"actor": "courier"})
                 for _ in range(2)]

    assert [d.status_code for d in delivered] == [200, 200] and delivered[0].json() == delivered[1].json()
    assert delivered[0].json()["shipment"]["state"] == "delivered" and delivered[0].json()["delivered_by"] == "courier"
    assert rid in {q["redemption_id"] for q in await queue(client, "delivered")}
    mine = (await client.get(f"/v1/redemptions/{rid}", headers=headers)).json()
    assert mine["shipment"]["state"] == "delivered" and mine["shipment"]["delivered_at"]
    # The same shipment once more, after delivery: still the one recorded.
    assert (await client.post(f"/v1/admin/redemptions/{rid}/ship", headers=ADMIN, json=PARCEL)).json()[
        "shipment"]["state"] == "delivered"

    async def told():
        events = [e["type"] for e in await consume(kafka_bootstrap, settings.topic(REWARDS_EVENTS), idle_s=0.5,
                                                   timeout_s=5) if e["customer_id"] == customer]
        return events if events[-2:] == ["RedemptionShipped", "RedemptionDelivered"] else None

    events = await eventually(told, timeout_s=20)
    assert events.count("RedemptionShipped") == 1 and events.count("RedemptionDelivered") == 1


async def test_what_cannot_ship_is_refused_with_a_reason_and_changes_nothing(services, settings):
    _, client, ledger_client = services
    item = await add_reward(client, cost_points=10, stock=1)
    voucher_reward = await add_reward(client, kind="voucher", cost_points=10, voucher_value="5.00",
                                      voucher_currency="PLN")
    expensive = await add_reward(client, cost_points=10_000)
    customer, headers = await fund(ledger_client, settings, 100)

    voucher = await redeem(client, headers, voucher_reward["reward_id"])
    unaffordable = await redeem(client, headers, expensive["reward_id"])
    cancelled = await redeem(client, headers, item["reward_id"])
    sold_out = await redeem(client, headers, item["reward_id"])
    assert (voucher["status"], unaffordable["status"], cancelled["status"]) == ("fulfilled", "failed", "fulfilled")
    assert sold_out["status"] == "failed" and sold_out["failure_reason"] == "out_of_stock"
    await redeemed_by_ledger(client, headers, cancelled["redemption_id"])
    cancel = await client.post(f"/v1/redemptions/{cancelled['redemption_id']}/cancel", headers=headers)
    assert cancel.status_code == 200  # before shipping, the window still applies

    refusals = {name: await client.post(f"/v1/admin/redemptions/{r['redemption_id']}/ship", headers=ADMIN,
                                        json=PARCEL)
                for name, r in (("voucher", voucher), ("failed", unaffordable), ("sold_out", sold_out),
                                ("cancelled", cancelled))}
    unknown = await client.post(f"/v1/admin/redemptions/{uuid.uuid4()}/ship", headers=ADMIN, json=PARCEL)
    bad_url = await client.post(f"/v1/admin/redemptions/{cancelled['redemption_id']}/ship", headers=ADMIN,
                                json=PARCEL | {"tracking_url": "javascript:alert(1)"})
    address_for_code = await client.post("/v1/redemptions", json={"reward_id": voucher_reward["reward_id"],
                                                                  "delivery_address": ADDRESS},
                                         headers=headers | {"Idempotency-Key": unique("k-")})
    bad_country = await client.post("/v1/redemptions", json={"reward_id": item["reward_id"],
                                                             "delivery_address": ADDRESS | {"country": "XX"}},
                                    headers=headers | {"Idempotency-Key": unique("k-")})

    assert {n: (r.status_code, r.json()["error"], r.json()["reason"]) for n, r in refusals.items()} == {
        "voucher": (409, "shipment_not_allowed", "not_physical"),
        "failed": (409, "shipment_not_allowed", "not_fulfilled"),
        "sold_out": (409, "shipment_not_allowed", "not_fulfilled"),
        "cancelled": (409, "shipment_not_allowed", "not_fulfilled")}
    assert unknown.status_code == 404 and bad_url.status_code == 422
    assert address_for_code.status_code == 422 and address_for_code.json()["error"] == "delivery_address_not_allowed"
    assert bad_country.status_code == 422
    support = (await client.get("/v1/admin/redemptions", headers=ADMIN, params={"customer_id": customer})).json()
    assert len(support["redemptions"]) == 4  # the two 422s created nothing
    assert all(r["customer_id"] == customer and r["shipped_by"] is None for r in support["redemptions"])
    by_id = {r["redemption_id"]: r for r in support["redemptions"]}
    assert by_id[voucher["redemption_id"]]["shipment"] is None
    assert by_id[cancelled["redemption_id"]]["status"] == "cancelled"
    assert by_id[cancelled["redemption_id"]]["shipment"] is None
    one = await client.get(f"/v1/admin/redemptions/{cancelled['redemption_id']}", headers=ADMIN)
    assert one.status_code == 200 and one.json()["customer_id"] == customer
    waiting = {q["redemption_id"] for q in await queue(client)}
    assert not waiting & set(by_id)
    bad_cursor = await client.get("/v1/admin/fulfilments", headers=ADMIN, params={"cursor": "not-a-cursor"})
    assert bad_cursor.status_code == 422 and bad_cursor.json()["error"] == "invalid_cursor"


async def gauge(client, sample: str) -> float:
    """A sample of /metrics by its name and labels as printed (0 when absent)."""
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
