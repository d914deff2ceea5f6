"""kill -9 of the ledger in the middle of the stream, then a restart: nothing lost, nothing
credited twice, the books still balance."""

import asyncio
from collections import Counter

import asyncpg
import pytest

from shared.topics import POINTS_EVENTS, PURCHASES_RECORDED
from tests.support.hostile import eventually
from tests.support.kafka import consume, produce
from tests.support.ledger import purchase_recorded, return_recorded
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

SALES, CUSTOMERS, RETURNS = 10_000, 50, 300


async def scalar(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def some_lots(dsn: str, count: int) -> bool:
    return await scalar(dsn, "SELECT count(*) FROM ledger.lots") >= count


async def all_applied(dsn: str) -> bool:
    done = await scalar(dsn, "SELECT count(*) FROM ledger.transfers WHERE code = 'reverse'")
    return done >= RETURNS and await scalar(dsn, "SELECT count(*) FROM ledger.lots") >= SALES


async def test_kill_9_mid_stream_then_restart_loses_nothing_and_credits_nothing_twice(base_env, kafka_bootstrap, tmp_path):
    dsn = base_env["DATABASE_URL"]
    # 4.50 PLN earns 4 points: 200 sales per customer stay below Silver, so the expected
    # balances do not depend on the order of processing.
    sales = [purchase_recorded(f"c{i % CUSTOMERS}", amounts=("4.50",)) for i in range(SALES)]
    returns = [return_recorded(s["customer_id"], s, ["l1"]) for s in sales[:RETURNS]]
    inputs = sales + sales[:1000] + returns  # 1,000 redeliveries, then full returns behind their sales
    service = ServiceProcess("ledger", {**base_env, "CONSUMER_BATCH_MAX_RECORDS": "200"}, log_dir=tmp_path)
    service.start()
    try:
        await produce(kafka_bootstrap, base_env["TOPIC_PREFIX"] + PURCHASES_RECORDED, inputs, key_field="customer_id")
        # Some lots, not all: a deadline, not a number of polls (a loaded machine starts the
        # process and joins the group later).
        await eventually(lambda: some_lots(dsn, 1500), timeout_s=120, interval_s=0.01)
        service.kill9()
        at_kill = await scalar(dsn, "SELECT count(*) FROM ledger.lots")
        assert 0 < at_kill < SALES, "the kill must land in the middle of the stream"
        service.start()
        await eventually(lambda: all_applied(dsn), timeout_s=300, interval_s=0.05)
        await asyncio.sleep(1)  # anything still in flight would show up as an extra transfer below
        events = await consume(kafka_bootstrap, base_env["TOPIC_PREFIX"] + POINTS_EVENTS, count=SALES + RETURNS,
                               timeout_s=60, idle_s=5)
    finally:
        service.stop()
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "ledger"})
    try:
        codes = dict(await conn.fetch("SELECT code, count(*) FROM transfers GROUP BY code"))
        pending = {r["customer_id"]: r["points"] for r in await conn.fetch(
            "SELECT customer_id, credits_posted - debits_posted AS points FROM accounts WHERE kind = 'pending'")}
        imbalance = await conn.fetchval("SELECT sum(debits_posted - credits_posted) FROM accounts")
        lots = await conn.fetchval("SELECT count(*) FROM lots")
    finally:
        await conn.close()
    assert codes == {"earn": SALES, "reverse": RETURNS} and lots == SALES
    expected = Counter()
    for s in sales:
        expected[s["customer_id"]] += 4
    for r in returns:
        expected[r["customer_id"]] -= 4
    assert pending == dict(expected)
    assert imbalance == 0
    # every effect was published (at least once: the relay may re-send after the crash)
    earned = {e["payload"]["purchase_id"] for e in events if e["type"] == "PointsEarned"}
    reversed_ = {e["payload"]["return_id"] for e in events if e["type"] == "PointsReversed"}
    assert earned == {s["payload"]["purchase_id"] for s in sales}
    assert reversed_ == {r["payload"]["purchase_id"] for r in returns}
