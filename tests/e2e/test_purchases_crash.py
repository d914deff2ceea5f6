"""kill -9 of the purchases service in the middle of a batch, then a restart: nothing lost,
nothing recorded twice."""

import json

import asyncpg
import pytest

from shared.topics import PURCHASES_RAW, PURCHASES_RECORDED
from tests.support.hostile import eventually
from tests.support.kafka import consume, produce
from tests.support.processes import ServiceProcess
from tests.support.purchases import return_of, sale

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]


async def count_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM purchases.purchases")
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def recorded_at_least(dsn: str, count: int) -> bool:
    return await count_rows(dsn) >= count


async def test_kill_9_mid_batch_then_restart_loses_nothing_and_records_nothing_twice(base_env, kafka_bootstrap, tmp_path):
    sales = [sale(customer_id=f"c{i % 50}") for i in range(12_000)]
    returns = [return_of(s, {"l1": 1}) for s in sales[:500]]
    inputs = sales + sales[:1000] + returns  # 1,000 duplicates, 500 partial returns after their sales
    service = ServiceProcess("purchases", {**base_env, "CONSUMER_BATCH_MAX_RECORDS": "200"}, log_dir=tmp_path)
    service.start()
    try:
        await produce(kafka_bootstrap, base_env["TOPIC_PREFIX"] + PURCHASES_RAW, inputs)  # keyless: returns may overtake their sales
        # Kill it once some, but not all, inputs are recorded: mid-stream, mid-batch.
        # A deadline, not a number of polls: a loaded machine starts the process later.
        await eventually(lambda: recorded_at_least(base_env["DATABASE_URL"], 2000), timeout_s=120, interval_s=0.01)
        service.kill9()
        at_kill = await count_rows(base_env["DATABASE_URL"])
        assert 0 < at_kill < 12_500, "the kill must land in the middle of the stream"
        service.start()
        expected = 12_500
        await eventually(lambda: recorded_at_least(base_env["DATABASE_URL"], expected), timeout_s=300, interval_s=0.05)
        # Distinct events: a relay's re-sends after the crash must not count towards the wait.
        events = await consume(kafka_bootstrap, base_env["TOPIC_PREFIX"] + PURCHASES_RECORDED, count=expected,
                               timeout_s=120, distinct="event_id")
    finally:
        service.stop()
    conn = await asyncpg.connect(base_env["DATABASE_URL"])
    try:
        rows = await conn.fetch("SELECT purchase_id, type, returned FROM purchases.purchases")
    finally:
        await conn.close()
    assert len(rows) == expected
    assert {r["purchase_id"] for r in rows} == {p["purchase_id"] for p in sales + returns}
    # a partial return counted once on its sale even though the crash may have replayed it
    returned = [json.loads(r["returned"]) for r in rows if r["type"] == "sale" and r["returned"] != "{}"]
    assert len(returned) == 500 and all(r == {"l1": 1} for r in returned)
    # every recorded purchase was published (at least once: the relay may re-send after a crash)
    published = {e["payload"]["purchase_id"] for e in events}
    assert published == {p["purchase_id"] for p in sales + returns}
