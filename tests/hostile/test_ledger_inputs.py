"""Hostile envelopes on the ledger's inputs (purchases.recorded, rewards.events): each one
is applied or goes to points.dlq with a reason, and none blocks its partition: a valid event
produced after them is still processed."""

import json
import uuid
from urllib.parse import quote

import pytest

from shared.topics import POINTS_DLQ, POINTS_EVENTS, PURCHASES_RECORDED, REWARDS_EVENTS
from tests.support.hostile import (
    INJECTION_STRINGS,
    collect,
    fetch,
    metric_total,
    mutated_documents,
    nested,
    produce_raw,
)
from tests.support.kafka import consume, unique
from tests.support.ledger import ADMIN, ledger_settings, purchase_recorded, redemption, running_ledger

pytestmark = pytest.mark.asyncio(loop_scope="session")
# A customer id with "/" is stored like any other but cannot be named in a URL path (the
# router decodes %2F before matching), so the read-back skips those.
READABLE = [s for s in INJECTION_STRINGS if "/" not in s]


def _with(event: dict, **payload_changes) -> bytes:
    return json.dumps({**event, "payload": {**event["payload"], **payload_changes}}).encode()


def hostile_purchase_envelopes(customer: str) -> list[tuple[str, bytes]]:
    valid = purchase_recorded(customer)
    line = valid["payload"]["lines"][0]
    return [
        ("empty", b""), ("random_bytes", bytes(range(256))), ("truncated", json.dumps(valid).encode()[:70]),
        ("null", b"null"), ("array", b"[]"), ("string", b'"PurchaseRecorded"'), ("deep_nesting", nested(100_000)),
        ("unknown_type", json.dumps({**valid, "type": "PurchaseDeleted"}).encode()),
        ("no_type", json.dumps({k: v for k, v in valid.items() if k != "type"}).encode()),
        ("no_payload", json.dumps({k: v for k, v in valid.items() if k != "payload"}).encode()),
        ("payload_is_a_list", json.dumps({**valid, "payload": []}).encode()),
        ("event_id_not_uuid", json.dumps({**valid, "event_id": "'; DROP TABLE inbox; --"}).encode()),
        ("customer_id_object", json.dumps({**valid, "customer_id": {"$gt": ""}}).encode()),
        ("occurred_at_words", json.dumps({**valid, "occurred_at": "yesterday"}).encode()),
        ("nan_price", _with(valid, lines=[{**line, "unit_price": "NaN"}])),
        ("infinite_price", _with(valid, lines=[{**line, "unit_price": "Infinity"}])),
        ("float_quantity", _with(valid, lines=[{**line, "quantity": 1.5}])),
        ("lines_not_a_list", _with(valid, lines={"l1": line})),
    ]


def hostile_rewards_envelopes(customer: str) -> list[tuple[str, bytes]]:
    request = redemption("RedemptionRequested", customer, uuid.uuid4(), 10)
    return [
        ("empty", b""), ("random_bytes", bytes(range(255, -1, -1))), ("null", b"null"),
        ("unknown_type", json.dumps({**request, "type": "RedemptionStolen"}).encode()),
        ("redemption_id_not_uuid", _with(request, redemption_id="1 OR 1=1")),
        ("cost_points_text", _with(request, cost_points="ten")),
        ("cost_points_float", _with(request, cost_points=9.99)),
        ("cost_points_nan", json.dumps(request).encode().replace(b'"cost_points": 10', b'"cost_points": NaN')),
        ("fulfilled_without_hold", json.dumps(redemption("RedemptionFulfilled", customer, uuid.uuid4(), 10)).encode()),
        ("fulfilment_kind_unknown", _with(redemption("RedemptionFulfilled", customer, uuid.uuid4(), 10), kind="cash")),
    ]


async def test_hostile_purchase_envelopes_are_dead_lettered_and_the_partition_moves_on(base_env, kafka_bootstrap):
    settings = ledger_settings(base_env, max_delivery_attempts=2)
    customer = unique("c-")
    fixed = hostile_purchase_envelopes(customer)
    generated = [(f"property_{i}", json.dumps(d).encode())
                 for i, d in enumerate(collect(mutated_documents(lambda: purchase_recorded(customer)), 60))]
    injected = [(f"injection_{i}", json.dumps(purchase_recorded(s)).encode()) for i, s in enumerate(INJECTION_STRINGS)]
    probe = purchase_recorded(customer, amounts=("42.00",))
    items = fixed + generated + injected + [("probe", json.dumps(probe).encode())]
    async with running_ledger(settings) as (_, client):
        counted_before = await metric_total(client, "ledger_dead_letters_total")
        produced = await produce_raw(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), items, key=customer.encode())
        events = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), timeout_s=30, idle_s=2.0)
        dead = await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), idle_s=1.0, timeout_s=10)
        ready = await client.get("/readyz")
        counted = await metric_total(client, "ledger_dead_letters_total") - counted_before
        injected_balances = [await client.get(f"/v1/customers/{quote(s, safe='')}/balance", headers=ADMIN) for s in READABLE]
    assert ready.status_code == 200
    assert counted == len(dead), "every dead letter is counted"
    earned_by = {e["payload"]["purchase_id"]: e for e in events if e["type"] == "PointsEarned"}
    assert probe["payload"]["purchase_id"] in earned_by, "the valid event after the hostile ones was not applied"
    letters = {(d["original_partition"], d["original_offset"]): d for d in dead}
    inbox = {str(r["event_id"]) for r in await fetch(settings.database_url, "SELECT event_id FROM ledger.inbox")}
    for p in produced:
        letter = letters.pop((p.partition, p.offset), None)
        if p.label in dict(fixed):
            assert letter is not None, f"{p.label} was not dead-lettered"
        if letter is None:  # then it was a valid event, and it was applied (claimed in the inbox)
            assert json.loads(p.value)["event_id"] in inbox, p.label
            continue
        assert letter["reason"] and letter["errors"], (p.label, letter)
        assert letter["original"] == p.value.decode("utf-8", errors="replace")
    assert not letters
    # Hostile customer ids are ordinary text to the ledger: stored and read back verbatim.
    for s, response in zip(READABLE, injected_balances):
        assert response.status_code == 200 and response.json()["customer_id"] == s, (s, response.text)
    tables = await fetch(settings.database_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'ledger'")
    assert {"inbox", "outbox"} <= {t["tablename"] for t in tables}


async def test_hostile_rewards_envelopes_are_dead_lettered_and_a_later_hold_still_happens(base_env, kafka_bootstrap):
    settings = ledger_settings(base_env, max_delivery_attempts=2)
    customer = unique("c-")
    fixed = hostile_rewards_envelopes(customer)
    generated = [(f"property_{i}", json.dumps(d).encode()) for i, d in enumerate(collect(mutated_documents(
        lambda: redemption("RedemptionRequested", customer, uuid.uuid4(), 10)), 40))]
    probe_id = uuid.uuid4()
    probe = redemption("RedemptionRequested", customer, probe_id, 25)
    async with running_ledger(settings) as (_, client):
        credited = await client.post("/v1/admin/adjustments", headers=ADMIN, json={
            "customer_id": customer, "amount_points": 1000, "reason_code": "goodwill", "actor": "hostile-test"})
        assert credited.status_code == 201, credited.text
        items = fixed + generated + [("probe", json.dumps(probe).encode())]
        produced = await produce_raw(kafka_bootstrap, settings.topic(REWARDS_EVENTS), items, key=customer.encode())
        events = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), timeout_s=30, idle_s=2.0)
        dead = await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), idle_s=1.0, timeout_s=10)
        balance = (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).json()
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    held = {e["payload"]["redemption_id"]: e for e in events if e["type"] == "PointsHeld"}
    assert str(probe_id) in held and held[str(probe_id)]["payload"]["amount_points"] == 25
    letters = {(d["original_partition"], d["original_offset"]): d for d in dead}
    for p in produced:
        letter = letters.pop((p.partition, p.offset), None)
        if p.label in dict(fixed):
            assert letter is not None and letter["reason"] and letter["errors"], (p.label, letter)
    assert not letters
    # Whatever was held, the balance never goes below zero and adds up.
    assert balance["available_points"] >= 0
    assert balance["available_points"] + balance["held_points"] <= 1000


@pytest.mark.parametrize("case", ["huge_quantity", "nul_customer", "nul_key"])
async def test_a_poison_purchase_is_dead_lettered_alone_and_the_next_one_applies(base_env, kafka_bootstrap, case):
    """A purchase the database cannot take (NUL in the customer id, or in the record's key,
    which becomes the dead letter's key) or whose points overflow a bigint fails its batch:
    after the bounded retries it is dead-lettered on its own."""
    settings = ledger_settings(base_env, max_delivery_attempts=2)
    customer = f"c-{case}"
    poison = purchase_recorded(customer)
    key = customer.encode()
    if case == "huge_quantity":
        poison["payload"]["lines"][0]["quantity"] = 10**30
        poison["payload"]["total"] = str(10**30 * 100)
        poison["payload"]["lines"][0]["unit_price"] = "100.00"
    elif case == "nul_customer":
        poison["customer_id"] = "c\x00x"
    else:
        key, poison = b"k\x00ey", {"not": "an event"}
    probe = purchase_recorded(customer, amounts=("42.00",))
    async with running_ledger(settings):
        await produce_raw(kafka_bootstrap, settings.topic(PURCHASES_RECORDED),
                          [("poison", json.dumps(poison).encode()), ("probe", json.dumps(probe).encode())], key=key)
        events = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=1, timeout_s=20)
        dead = await consume(kafka_bootstrap, settings.topic(POINTS_DLQ), count=1, timeout_s=5)
    assert [e["payload"].get("purchase_id") for e in events] == [probe["payload"]["purchase_id"]], "partition blocked"
    assert len(dead) == 1 and dead[0]["reason"]
    assert json.loads(dead[0]["original"]) == poison
