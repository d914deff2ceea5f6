"""Hostile records on points.events, the rewards service's Kafka door: each one is applied
or goes to rewards.dlq with a reason, the partition moves on (a valid balance produced
after them still reaches the customer's standing), and the service stays ready."""

import json
import uuid

import pytest

from shared.events import envelope, utcnow
from shared.events.points import BalanceAfter, PointsAdjusted, PointsAdjustedPayload
from shared.topics import POINTS_EVENTS, REWARDS_DLQ
from tests.support.hostile import collect, metric_total, mutated_documents, produce_raw
from tests.support.kafka import consume, unique
from tests.support.rewards import bearer, eventually, rewards_settings, running_rewards

pytestmark = pytest.mark.asyncio(loop_scope="session")


def points_adjusted(customer: str, available_points: int) -> dict:
    balance = BalanceAfter(available_points=available_points, pending_points=0, held_points=0, debt_points=0,
                           tier="Bronze", qualifying_points=0)
    event = envelope(PointsAdjusted, event_id=uuid.uuid4(), occurred_at=utcnow(), producer="ledger",
                     correlation_id="hostile", customer_id=customer,
                     payload=PointsAdjustedPayload(amount_points=available_points, balance=balance,
                                                   reason_code="goodwill", actor="test"))
    return json.loads(event.model_dump_json())


def hostile_points_events(customer: str) -> list[tuple[str, bytes]]:
    valid = points_adjusted(customer, 10)
    balance = valid["payload"]["balance"]
    return [
        ("empty", b""), ("random_bytes", bytes(range(256))), ("truncated", json.dumps(valid).encode()[:60]),
        ("null", b"null"), ("array", b"[1, 2]"),
        ("event_id_not_uuid", json.dumps({**valid, "event_id": "1; DROP TABLE redemptions"}).encode()),
        ("balance_not_a_number", json.dumps({**valid, "payload": {
            **valid["payload"], "balance": {**balance, "available_points": "lots"}}}).encode()),
        ("payload_missing", json.dumps({k: v for k, v in valid.items() if k != "payload"}).encode()),
    ]


async def test_hostile_points_events_are_dead_lettered_and_a_later_balance_still_arrives(base_env, kafka_bootstrap):
    settings = rewards_settings(base_env, max_delivery_attempts=2)
    customer = unique("c-")
    fixed = hostile_points_events(customer)
    generated = [(f"property_{i}", json.dumps(d).encode())
                 for i, d in enumerate(collect(mutated_documents(lambda: points_adjusted(customer, 10)), 40))]
    # The probe names another customer (same key, same partition): a mutated recorded_at in
    # the future legitimately pins the first customer's standing (newest balance wins).
    probe_customer = unique("probe-")
    probe = points_adjusted(probe_customer, 777)
    items = fixed + generated + [("probe", json.dumps(probe).encode())]
    async with running_rewards(settings) as (_, client):
        counted_before = await metric_total(client, "rewards_points_events_dead_lettered_total")
        produced = await produce_raw(kafka_bootstrap, settings.topic(POINTS_EVENTS), items, key=customer.encode())
        headers = bearer(probe_customer, settings)

        async def probe_applied():
            return (await client.get("/v1/rewards", headers=headers)).json()["available_points"] == 777

        await eventually(probe_applied, timeout_s=30)
        dead = await consume(kafka_bootstrap, settings.topic(REWARDS_DLQ), count=len(fixed), idle_s=1.5,
                             timeout_s=20)
        ready = await client.get("/readyz")
        counted = await metric_total(client, "rewards_points_events_dead_lettered_total") - counted_before
    assert ready.status_code == 200
    assert counted == len(dead), "every dead letter is counted"
    letters = {(d["original_partition"], d["original_offset"]): d for d in dead}
    assert len(letters) == len(dead)
    for p in produced:
        letter = letters.pop((p.partition, p.offset), None)
        if p.label in dict(fixed):
            assert letter is not None, f"{p.label} was not dead-lettered"
        if letter is not None:
            assert letter["reason"] and letter["original"] == p.value.decode("utf-8", errors="replace"), p.label
    assert not letters, "dead letters that match no input"


async def test_a_balance_beyond_the_projection_columns_is_dead_lettered_alone(base_env, kafka_bootstrap):
    """customer_standing holds int4 points: a balance of 2**40 fails its batch, and after the
    bounded retries it is dead-lettered on its own while the next record applies."""
    settings = rewards_settings(base_env, max_delivery_attempts=2)
    poison = points_adjusted(unique("c-"), 2**40)
    probe_customer = unique("probe-")
    probe = points_adjusted(probe_customer, 777)
    async with running_rewards(settings) as (_, client):
        await produce_raw(kafka_bootstrap, settings.topic(POINTS_EVENTS),
                          [("poison", json.dumps(poison).encode()), ("probe", json.dumps(probe).encode())],
                          key=b"same-partition")
        headers = bearer(probe_customer, settings)

        async def probe_applied():
            return (await client.get("/v1/rewards", headers=headers)).json()["available_points"] == 777

        await eventually(probe_applied, timeout_s=20)
        dead = await consume(kafka_bootstrap, settings.topic(REWARDS_DLQ), count=1, timeout_s=5)
    assert len(dead) == 1 and dead[0]["reason"].startswith("processing_failed")
    assert json.loads(dead[0]["original"]) == poison
