"""The shared pipeline end to end in a service runtime, against the real broker and
PostgreSQL: records of two topics in one lane are applied once, bad ones dead-lettered with
the reason, offsets committed only after the transaction (a restarted runtime resumes after
what it applied and applies nothing twice)."""

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Literal

import asyncpg
from pydantic import BaseModel, TypeAdapter

from bench.harness import group_lag
from shared.pipeline import Batch, Subscription, pydantic_decoder
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from tests.support.kafka import consume, produce

MIGRATIONS = Path(__file__).parent / "pipeline_migrations"


class Ping(BaseModel):
    event_id: uuid.UUID
    type: Literal["Ping"] = "Ping"
    customer_id: str
    n: int


async def apply_pings(batch: Batch[Ping]) -> None:
    await batch.conn.executemany("INSERT INTO pings (event_id, topic, n) VALUES ($1, $2, $3)",
                                 [(i.event.event_id, i.record.topic, i.event.n) for i in batch.items])


def runtime_for(base_env: dict[str, str], topics: tuple[str, str], **overrides) -> ServiceRuntime:
    settings = ServiceSettings(**{**{k.lower(): v for k, v in base_env.items()}, "consumer_commit_interval_ms": 50,
                                  **overrides})
    runtime = ServiceRuntime(settings, service="pipetest", schema="pipetest", migrations_dir=MIGRATIONS,
                             description="a toy service", topics=topics + ("pings.dlq",))
    runtime.lane("main", bulk=False)
    for topic in topics:
        runtime.subscribe(Subscription(
            topic=settings.topic(topic), consumer=f"pipetest.{topic}", decode=pydantic_decoder(TypeAdapter(Ping)),
            apply=apply_pings, dead_letter_topic=settings.topic("pings.dlq"), door=f"{topic} consumer", lane="main",
            schema=Ping))
    return runtime


def ping(n: int) -> dict:
    return {"event_id": str(uuid.uuid4()), "type": "Ping", "customer_id": f"c{n % 7}", "n": n}


async def wait_for_rows(database_url: str, count: int, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    conn = await asyncpg.connect(database_url)
    try:
        while True:
            n = await conn.fetchval("SELECT count(*) FROM pipetest.pings")
            if n >= count or time.monotonic() > deadline:
                return n
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def test_two_topics_in_one_lane_are_applied_once_and_bad_records_dead_lettered(
        base_env, kafka_bootstrap, database_url, topic_prefix):
    runtime = runtime_for(base_env, ("pings.a", "pings.b"))
    await runtime.start()
    try:
        assert len(runtime.consumers) == 1  # one consumer for the lane's two topics
        a, b = [ping(n) for n in range(50)], [ping(n) for n in range(50, 80)]
        await produce(kafka_bootstrap, f"{topic_prefix}pings.a", a + [a[3]] + [b"{broken"], key_field="customer_id")
        await produce(kafka_bootstrap, f"{topic_prefix}pings.b", b, key_field="customer_id")
        assert await wait_for_rows(database_url, 80) == 80
        letters = await consume(kafka_bootstrap, f"{topic_prefix}pings.dlq", count=1)
        assert [(d["reason"], d["original"], d["door"]) for d in letters] == [
            ("malformed_json", "{broken", "pings.a consumer")]
        readiness = await runtime.readiness()
        assert readiness["broker"] and readiness["database"]
    finally:
        await runtime.stop()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT n, count(*) AS times FROM pipetest.pings GROUP BY n")
    finally:
        await conn.close()
    assert sorted(r["n"] for r in rows) == list(range(80)) and {r["times"] for r in rows} == {1}


async def test_a_restarted_runtime_resumes_after_what_it_committed(base_env, kafka_bootstrap, database_url,
                                                                 topic_prefix):
    first = runtime_for(base_env, ("pings.a", "pings.b"))
    await first.start()
    try:
        await produce(kafka_bootstrap, f"{topic_prefix}pings.a", [ping(n) for n in range(20)], key_field="customer_id")
        assert await wait_for_rows(database_url, 20) == 20
    finally:
        await first.stop()  # commits what it applied
    lag = await group_lag(kafka_bootstrap, f"{topic_prefix.rstrip('.')}.pipetest.main", f"{topic_prefix}pings.a", 4)
    assert sum(lag.values()) == 0
    second = runtime_for(base_env, ("pings.a", "pings.b"))
    await second.start()
    try:
        await produce(kafka_bootstrap, f"{topic_prefix}pings.a", [ping(n) for n in range(20, 30)],
                      key_field="customer_id")
        assert await wait_for_rows(database_url, 30) == 30
    finally:
        await second.stop()


async def until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the state never came"
        await asyncio.sleep(0.02)


def idle(consumer) -> bool:
    """Idle mode as the broker sees it: every assigned partition paused (no fetch is sent)."""
    assigned = consumer.consumer.assignment()
    return bool(assigned) and consumer.consumer.paused() == assigned


async def test_an_idle_consumer_stops_fetching_and_still_reads_what_comes_later(base_env, kafka_bootstrap,
                                                                               database_url, topic_prefix):
    runtime = runtime_for(base_env, ("pings.a", "pings.b"), consumer_idle_after_ms=200, consumer_idle_poll_ms=100)
    await runtime.start()
    try:
        [consumer] = runtime.consumers
        await until(lambda: consumer.consumer.assignment())
        await until(lambda: idle(consumer) and consumer.idle_looks >= 3)  # paused, looking
        await produce(kafka_bootstrap, f"{topic_prefix}pings.b", [ping(n) for n in range(5)], key_field="customer_id")
        assert await wait_for_rows(database_url, 5) == 5  # a look saw the records, a fetch read them
        await until(lambda: idle(consumer))  # and idle again once nothing more comes
    finally:
        await runtime.stop()


async def test_wake_takes_a_consumer_out_of_idle_mode_at_once(base_env):
    # An idle poll of a minute: only wake() can resume the partitions within this test.
    runtime = runtime_for(base_env, ("pings.a", "pings.b"), consumer_idle_after_ms=200, consumer_idle_poll_ms=60_000)
    await runtime.start()
    try:
        [consumer] = runtime.consumers
        await until(lambda: idle(consumer))
        looks = consumer.idle_looks
        runtime.wake_lane("main")
        await until(lambda: not consumer.consumer.paused())  # fetching again
        assert consumer.idle_looks == looks + 1  # the wait was cut short, not timed out
        await until(lambda: idle(consumer))  # idle_after_ms later, idle again
    finally:
        await runtime.stop()


def test_the_asyncapi_document_describes_each_subscription_with_its_schema(base_env):
    from faststream.specification import AsyncAPI

    runtime = runtime_for(base_env, ("pings.a", "pings.b"))
    doc = json.dumps(AsyncAPI(runtime.broker, title="t").to_specification().to_jsonable())
    assert "pings.a#consumer" in doc and "pings.b#consumer" in doc and '"n"' in doc
