"""Replay: the ledger rebuilt from purchases.recorded, ledger.adjustments and rewards.events,
read again from offset 0 (and its program versions from ledger.programs), holds exactly the
state it held (a hash of its accounts, customers,
lots, holds, transfers and adjustments, without processing timestamps); replaying into the
populated database adds nothing.

The topics have no order between them, while an adjustment (a debit) and a redemption depend
on the points earned before them, and a redemption on the adjustments before it. A rebuild
therefore applies them in that order: the test keeps the new ledger.adjustments and
rewards.events consumer groups busy (a member of their own that takes every partition) until
the stream before them has caught up, and the original stream was fed in that order too.
"""

import asyncio
import random
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

from shared.topics import LEDGER_ADJUSTMENTS, PURCHASES_RECORDED, REWARDS_EVENTS
from tests.support.kafka import consume, produce, unique
from tests.support.ledger import (
    ADMIN, caught_up, ledger_settings, ledger_state_hash, purchase_claimed, purchase_recorded, redemption,
    return_recorded, running_ledger,
)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

PARTITIONS = 4
STREAMS = ((PURCHASES_RECORDED, "purchases"), (LEDGER_ADJUSTMENTS, "adjustments"), (REWARDS_EVENTS, "rewards"))


async def outbox_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM ledger.outbox")
    finally:
        await conn.close()


async def settled(settings, bootstrap: str) -> None:
    """Every consumer group at the end of its topic and the outbox published."""
    for _ in range(2):  # the outbox may publish what a consumer has to read again
        for topic, purpose in STREAMS:
            await caught_up(bootstrap, settings.group_id("ledger", purpose), settings.topic(topic),
                            partitions=PARTITIONS)
        deadline = asyncio.get_running_loop().time() + 60  # a deadline: a loaded machine publishes later
        while await outbox_rows(settings.database_url) != 0:
            assert asyncio.get_running_loop().time() < deadline, "the ledger's outbox never emptied"
            await asyncio.sleep(0.1)


class TakeEverything(AbstractPartitionAssignor):
    """Same protocol name as the ledger's consumers (aiokafka's default), so the group accepts
    both; as the group leader it gives every partition to the member that says b"hold"."""

    name = "roundrobin"
    version = 0

    @classmethod
    def metadata(cls, topics):
        return ConsumerProtocolMemberMetadata(cls.version, list(topics), b"hold")

    @classmethod
    def assign(cls, cluster, members):
        holder = next(m for m, meta in members.items() if meta.user_data == b"hold")
        topics = sorted({t for meta in members.values() for t in meta.subscription})
        everything = [(t, sorted(cluster.partitions_for_topic(t) or [])) for t in topics]
        return {m: ConsumerProtocolMemberAssignment(cls.version, everything if m == holder else [], b"")
                for m in members}

    @classmethod
    def on_assignment(cls, assignment):
        pass


async def hold_group(bootstrap: str, group: str, topic: str) -> AIOKafkaConsumer:
    """Join `group` first (so as its leader) and own every partition without consuming."""
    holder = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                              partition_assignment_strategy=(TakeEverything,), session_timeout_ms=2000,
                              heartbeat_interval_ms=500)
    await holder.start()
    deadline = asyncio.get_running_loop().time() + 60
    while asyncio.get_running_loop().time() < deadline:
        if len(holder.assignment()) == PARTITIONS:
            return holder
        await asyncio.sleep(0.1)
    raise AssertionError(f"the holder never got {topic}'s partitions: {holder.assignment()}")


def the_stream() -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Sales (old ones already available, recent ones pending), partial returns, a claim,
    a customer crossing into Silver, in two parts (the program changes between them); then
    adjustments through the admin API (credits,
    debits, a re-sent one, one refused as an overdraft); then redemptions fulfilled, failed,
    cancelled after fulfilment, and one the balance cannot cover."""
    rng = random.Random(5)
    old = datetime.now(timezone.utc) - timedelta(days=20)
    purchases, adjustments, rewards = [], [], []
    customers = [unique("replay-") for _ in range(24)]
    for n, customer in enumerate(customers):
        for k in range(rng.randint(1, 3)):
            amounts = tuple(f"{rng.randint(5, 300)}.{rng.randint(0, 99):02d}" for _ in range(rng.randint(1, 3)))
            sale = purchase_recorded(customer, amounts=amounts, occurred_at=old if k == 0 else None)
            purchases.append(sale)
            if rng.random() < 0.4:
                lines = [x["line_id"] for x in sale["payload"]["lines"]]
                purchases.append(return_recorded(customer, sale, rng.sample(lines, rng.randint(1, len(lines)))))
        if n == 0:
            purchases.append(purchase_recorded(customer, amounts=("1200.00",), occurred_at=old))  # -> Silver
        if n == 1:
            anonymous = purchase_recorded(None, amounts=("42.00",), occurred_at=old)
            purchases += [anonymous, purchase_claimed(customer, anonymous)]
    # Customers 0-11 also redeem below, so the points they redeem come after the adjustments.
    for n, customer in enumerate(customers[:12]):
        body = {"adjustment_id": str(uuid.uuid4()), "customer_id": customer, "reason_code": "correction",
                "actor": f"ops-{n}@back-office", "note": f"ticket {n}"}
        if n % 3 == 0:
            adjustments.append({**body, "amount_points": rng.randint(20, 500), "reason_code": "goodwill"})
        elif n % 3 == 1:
            adjustments.append({**body, "amount_points": -1})  # from the old (available) sale's lot
        else:
            credit = {**body, "amount_points": 40, "reason_code": "service_recovery", "note": None}
            debit = {**body, "adjustment_id": str(uuid.uuid4()), "amount_points": -25}  # lots expiring first
            adjustments += [credit, credit, debit]  # the credit re-sent: applied once
    adjustments.append({"adjustment_id": str(uuid.uuid4()), "customer_id": customers[3], "amount_points": -1_000_000,
                        "reason_code": "fraud", "actor": "ops@back-office"})  # refused: never on the topic
    adjustments.append({"adjustment_id": str(uuid.uuid4()), "customer_id": unique("replay-new-"),
                        "amount_points": 300, "reason_code": "migration", "actor": "ops@back-office"})  # new account
    for n, customer in enumerate(customers[:16]):
        rid = uuid.uuid4()
        cost = rng.randint(1, 5)
        rewards.append(redemption("RedemptionRequested", customer, rid, cost))
        if n % 4 == 0:
            rewards.append(redemption("RedemptionFailed", customer, rid, cost, reason="out_of_stock"))
        else:
            rewards.append(redemption("RedemptionFulfilled", customer, rid, cost))
            if n % 4 == 1:
                rewards.append(redemption("RedemptionCancelled", customer, rid, cost, was_fulfilled=True))
    rewards.append(redemption("RedemptionRequested", customers[2], uuid.uuid4(), 1_000_000))  # rejected
    # the second part: customers 12 on (each customer's sales and returns stay in one part)
    split = next(i for i, e in enumerate(purchases) if e["customer_id"] == customers[12])
    return purchases[:split], purchases[split:], adjustments, rewards


def recorded_now(events: list[dict]) -> list[dict]:
    """The events as if recorded now (after a program change): recorded_at picks the version."""
    now = datetime.now(timezone.utc).isoformat()
    return [{**e, "recorded_at": now} for e in events]


async def program_history(dsn: str) -> list[tuple]:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await conn.fetch(
            "SELECT version, document::text, source, actor, created_at, effective_from FROM ledger.program_versions"
            " ORDER BY version")]
    finally:
        await conn.close()


async def test_a_ledger_rebuilt_from_offset_zero_holds_the_same_state_and_a_replay_adds_nothing(
        base_env, kafka_bootstrap, pg_cluster):
    original = ledger_settings(base_env)
    purchases_topic, rewards_topic = original.topic(PURCHASES_RECORDED), original.topic(REWARDS_EVENTS)
    adjustments_topic = original.topic(LEDGER_ADJUSTMENTS)
    first_part, second_part, adjustments, rewards = the_stream()

    async with running_ledger(original) as (_, client):
        await produce(kafka_bootstrap, purchases_topic, first_part, key_field="customer_id")
        await settled(original, kafka_bootstrap)
        # The program changes between the parts (groceries earn double), and a version is
        # scheduled for later (it governs nothing here): a rebuild must earn each part as here.
        program = (await client.get("/v1/admin/program", headers=ADMIN)).json()["program"]
        doubled = await client.put("/v1/admin/program", headers=ADMIN,
                                   json={**program, "category_multipliers": {"grocery": "2"}})
        later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
        scheduled = await client.put("/v1/admin/program", headers=ADMIN, params={"effective_from": later},
                                     json={**program, "category_multipliers": {"grocery": "5"}})
        assert (doubled.status_code, scheduled.status_code) == (200, 200), (doubled.text, scheduled.text)
        await produce(kafka_bootstrap, purchases_topic, recorded_now(second_part), key_field="customer_id")
        await settled(original, kafka_bootstrap)
        answers = [(await client.post("/v1/admin/adjustments", headers=ADMIN, json=body)).status_code
                   for body in adjustments]
        await settled(original, kafka_bootstrap)
        await produce(kafka_bootstrap, rewards_topic, rewards, key_field="customer_id")
        await settled(original, kafka_bootstrap)
    # the overdraft refused (and any debit beyond what a customer had left), the re-sent credits answered 200
    assert answers[-2] == 409 and answers.count(200) == 4, answers
    accepted = {body["adjustment_id"] for body, status in zip(adjustments, answers) if status == 201}
    on_topic = await consume(kafka_bootstrap, adjustments_topic, at_least=len(accepted), idle_s=1.0, timeout_s=60)
    assert sorted(e["payload"]["adjustment_id"] for e in on_topic) == sorted(accepted)  # once each, none refused
    state, counts = await ledger_state_hash(original.database_url)
    # the stream did what it says: earnings, reversals, adjustments, holds posted, voided, refunded
    transfers = await asyncpg.connect(original.database_url)
    try:
        codes = {r["code"]: r["n"] for r in await transfers.fetch(
            "SELECT code, count(*) AS n FROM ledger.transfers GROUP BY code")}
        tiers = {r["tier"] for r in await transfers.fetch("SELECT DISTINCT tier FROM ledger.customers")}
        signs = {r["positive"] for r in await transfers.fetch("SELECT amount_points > 0 AS positive FROM ledger.adjustments")}
        earned_under = {r["rule_version"] for r in await transfers.fetch(
            "SELECT DISTINCT rule_version FROM ledger.transfers WHERE code = 'earn'")}
    finally:
        await transfers.close()
    assert {"earn", "reverse", "adjust", "hold", "post", "void", "refund"} <= set(codes), codes
    assert codes["adjust"] == counts["adjustments"] == len(accepted) and signs == {True, False}
    assert tiers == {"Bronze", "Silver"}
    assert earned_under == {1, 2}  # the first part under the file's version, the second under the admin's
    versions = await program_history(original.database_url)
    assert [(v[0], v[2]) for v in versions] == [(1, "file"), (2, "admin"), (3, "admin")]

    # a fresh ledger on an empty database, with new consumer groups, from offset 0:
    # purchases.recorded first, then ledger.adjustments, then rewards.events
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_cluster.psql("postgres", f'CREATE DATABASE "{name}"')
    rebuilt = ledger_settings(base_env, database_url=pg_cluster.dsn(name),
                              consumer_group_prefix=unique("rebuild-"))
    holders = {topic: await hold_group(kafka_bootstrap, rebuilt.group_id("ledger", purpose), rebuilt.topic(topic))
               for topic, purpose in STREAMS[1:]}
    try:
        async with running_ledger(rebuilt):
            for (before, purpose), (topic, _) in zip(STREAMS, STREAMS[1:]):
                await caught_up(kafka_bootstrap, rebuilt.group_id("ledger", purpose), rebuilt.topic(before),
                                partitions=PARTITIONS)
                # still the leader and owner of every partition: nothing of `topic` was read yet
                assert len(holders[topic].assignment()) == PARTITIONS, holders[topic].assignment()
                await holders[topic].stop()
            await settled(rebuilt, kafka_bootstrap)
    finally:
        for holder in holders.values():
            await holder.stop()
    assert await ledger_state_hash(rebuilt.database_url) == (state, counts)
    assert await program_history(rebuilt.database_url) == versions  # numbers, documents and times

    # the same topics once more, into the populated original database: nothing added
    again = ledger_settings(base_env, consumer_group_prefix=unique("again-"))
    async with running_ledger(again):
        await settled(again, kafka_bootstrap)
    assert await ledger_state_hash(original.database_url) == (state, counts)
    assert await program_history(original.database_url) == versions
