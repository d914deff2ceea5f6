"""Replay: the ledger rebuilt from purchases.recorded and rewards.events, read again from
offset 0, holds exactly the state it held (a hash of its accounts, customers, lots, holds and
transfers, without processing timestamps); replaying into the populated database adds nothing.

The two topics have no order between them, while a redemption depends on the points earned
before it. A rebuild therefore applies purchases.recorded first: the test keeps the new
rewards.events consumer group busy (a member of its own that takes every partition) until the
new purchases group has caught up, and the original stream was fed in that order too.
"""

import asyncio
import hashlib
import json
import random
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

from bench.harness import group_lag
from shared.topics import PURCHASES_RECORDED, REWARDS_EVENTS
from tests.support.kafka import produce, unique
from tests.support.ledger import (
    ledger_settings, purchase_claimed, purchase_recorded, redemption, return_recorded, running_ledger,
)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

PARTITIONS = 4

# What defines the ledger, row by row in a stable order. Left out: when a row was written
# (created_at, updated_at, seq) and hold expiries (processing time plus the timeout).
STATE_QUERIES = {
    "accounts": "SELECT account_id, customer_id, kind, debits_pending, debits_posted, credits_pending, credits_posted "
                "FROM accounts ORDER BY account_id",
    "customers": "SELECT customer_id, tier, has_purchased, qualifying_points FROM customers ORDER BY customer_id",
    "lots": "SELECT lot_id, customer_id, source, purchase_id, occurred_at, amount_points, remaining_points, "
            "held_points, expired_points, pending, matures_at, expires_at, rule_version, qualifying, earned_points, "
            "reversed_points, bonus_points, tier_multiplier, lines, breakdown, return_ids FROM lots ORDER BY lot_id",
    "holds": "SELECT redemption_id, customer_id, amount_points, state, transfer_id, allocations FROM holds "
             "ORDER BY redemption_id",
    "transfers": "SELECT transfer_id, debit_account_id, credit_account_id, amount_points, code, phase, pending_id, "
                 "customer_id, ref, lot_id, rule_version, occurred_at FROM transfers ORDER BY transfer_id",
}


async def ledger_state_hash(dsn: str) -> tuple[str, dict[str, int]]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "ledger"})
    try:
        digest, counts = hashlib.sha256(), {}
        for name, sql in STATE_QUERIES.items():
            rows = await conn.fetch(sql)
            counts[name] = len(rows)
            for row in rows:
                digest.update(json.dumps([name, *row.values()], default=str, sort_keys=True).encode())
        return digest.hexdigest(), counts
    finally:
        await conn.close()


async def outbox_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM ledger.outbox")
    finally:
        await conn.close()


async def caught_up(bootstrap: str, group: str, topic: str, *, timeout_s: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        lag = await group_lag(bootstrap, group, topic, PARTITIONS)
        if not any(lag.values()):
            return
        assert asyncio.get_running_loop().time() < deadline, f"{group} still lags on {topic}: {lag}"
        await asyncio.sleep(0.2)


async def settled(settings, bootstrap: str) -> None:
    """Both consumer groups at the end of their topics and the outbox published."""
    for topic, purpose in ((PURCHASES_RECORDED, "purchases"), (REWARDS_EVENTS, "rewards")):
        await caught_up(bootstrap, settings.group_id("ledger", purpose), settings.topic(topic))
    for _ in range(100):
        if await outbox_rows(settings.database_url) == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the ledger's outbox never emptied")


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
    for _ in range(100):
        if len(holder.assignment()) == PARTITIONS:
            return holder
        await asyncio.sleep(0.1)
    raise AssertionError(f"the holder never got {topic}'s partitions: {holder.assignment()}")


def the_stream() -> tuple[list[dict], list[dict]]:
    """Sales (old ones already available, recent ones pending), partial returns, a claim,
    a customer crossing into Silver; then redemptions fulfilled, failed, cancelled after
    fulfilment, and one the balance cannot cover."""
    rng = random.Random(5)
    old = datetime.now(timezone.utc) - timedelta(days=20)
    purchases, rewards = [], []
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
    return purchases, rewards


async def test_a_ledger_rebuilt_from_offset_zero_holds_the_same_state_and_a_replay_adds_nothing(
        base_env, kafka_bootstrap, pg_cluster):
    original = ledger_settings(base_env)
    purchases_topic, rewards_topic = original.topic(PURCHASES_RECORDED), original.topic(REWARDS_EVENTS)
    purchases, rewards = the_stream()

    async with running_ledger(original):
        await produce(kafka_bootstrap, purchases_topic, purchases, key_field="customer_id")
        await settled(original, kafka_bootstrap)
        await produce(kafka_bootstrap, rewards_topic, rewards, key_field="customer_id")
        await settled(original, kafka_bootstrap)
    state, counts = await ledger_state_hash(original.database_url)
    # the stream did what it says: earnings, reversals, holds posted, voided, refunded
    transfers = await asyncpg.connect(original.database_url)
    try:
        codes = {r["code"]: r["n"] for r in await transfers.fetch(
            "SELECT code, count(*) AS n FROM ledger.transfers GROUP BY code")}
        tiers = {r["tier"] for r in await transfers.fetch("SELECT DISTINCT tier FROM ledger.customers")}
    finally:
        await transfers.close()
    assert {"earn", "reverse", "hold", "post", "void", "refund"} <= set(codes), codes
    assert tiers == {"Bronze", "Silver"}

    # a fresh ledger on an empty database, with new consumer groups, from offset 0
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_cluster.psql("postgres", f'CREATE DATABASE "{name}"')
    rebuilt = ledger_settings(base_env, database_url=pg_cluster.dsn(name),
                              consumer_group_prefix=unique("rebuild-"))
    holder = await hold_group(kafka_bootstrap, rebuilt.group_id("ledger", "rewards"), rewards_topic)
    try:
        async with running_ledger(rebuilt):
            await caught_up(kafka_bootstrap, rebuilt.group_id("ledger", "purchases"), purchases_topic)
            # still the leader and owner of every partition: nothing of rewards.events was read yet
            assert len(holder.assignment()) == PARTITIONS, holder.assignment()
            await holder.stop()
            await settled(rebuilt, kafka_bootstrap)
    finally:
        await holder.stop()
    assert await ledger_state_hash(rebuilt.database_url) == (state, counts)

    # the same topics once more, into the populated original database: nothing added
    again = ledger_settings(base_env, consumer_group_prefix=unique("again-"))
    async with running_ledger(again):
        await settled(again, kafka_bootstrap)
    assert await ledger_state_hash(original.database_url) == (state, counts)
