"""Benchmark: what the stack alone costs per event on this machine, before any business logic.

    .venv/bin/python -m bench.stack_ceiling [--events 200000]

Starts its own broker (and PostgreSQL, for the round-trip figures), produces --events
purchases (the same payloads as `make bench`) to a topic of 4 partitions, then reads them
back from offset 0 four ways, each to the end:
  1. aiokafka getmany, nothing else (the client's own ceiling);
  2. a FastStream batch subscriber with the options the services' consumers had when they
     ran in FastStream, and a handler that does nothing (the framework, for comparison: the
     services now consume with shared/consumer.py on aiokafka's public API);
  3. the same, the handler parsing and validating each record as the purchases service
     does (PurchaseIn.model_validate_json): the least work any consumer of purchases does;
and, on one core with no I/O, the contract work every purchase costs on the earn path
whatever the pipeline: the purchases service validates it and writes PurchaseRecorded, the
ledger validates that (the figure is CPU per purchase);
and measures single round trips, the unit every saga hop and every batch is made of:
  4. PostgreSQL: an asyncpg prepared `SELECT $1` and an empty transaction (BEGIN, COMMIT),
     CPU of the client and of the PostgreSQL processes (all of them: the backend does nearly
     all the work) per call;
  5. the broker: CPU of the broker process per produce request of one record.
Prints a readable table and one JSON line. These are ceilings and unit costs, not goals:
they bound what the pipeline built on top of them can reach (see the README's table).
"""

import argparse
import asyncio
import json
import os
import random
import resource
import time
import uuid
from datetime import datetime, timezone

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faststream import AckPolicy

from bench.e2e import PARTITIONS, purchase
from bench.harness import cpu_seconds, create_topics, infra, pg_processes, produce_all, progress, progress_done
from services.ledger.handlers import PURCHASE_EVENT as _PURCHASE_EVENT
from services.purchases.domain import PurchaseIn
from shared.events.purchases import purchase_event_json
from shared.kafka import create_broker
from shared.settings import ServiceSettings

TOPIC = "ceiling.purchases"


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def aiokafka_ceiling(bootstrap: str, events: int) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    seen, started, last_progress = 0, time.perf_counter(), time.monotonic()
    try:
        while seen < events:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            got = sum(len(records) for records in batch.values())
            if got:
                seen, last_progress = seen + got, time.monotonic()
            elif time.monotonic() - last_progress > 30:
                raise RuntimeError(f"only {seen:,} of {events:,} records could be read back")
            progress(f"aiokafka: {seen:,}/{events:,}")
    finally:
        progress_done()
        await consumer.stop()
    return seen / (time.perf_counter() - started)


async def faststream_ceiling(bootstrap: str, events: int, *, validate: bool) -> float:
    """A batch subscriber with the options the services' FastStream subscribers had."""
    settings = ServiceSettings(kafka_bootstrap_servers=bootstrap, consumer_session_timeout_ms=6000,
                               consumer_heartbeat_interval_ms=1000,
                               consumer_group_prefix=f"ceiling-{uuid.uuid4().hex[:6]}")
    broker = create_broker(settings, client_id="ceiling", description="stack ceiling")
    state = {"n": 0, "first": 0.0}
    done = asyncio.Event()

    async def the_message(message):  # the message itself as the body: the records, undecoded
        return message

    @broker.subscriber(TOPIC, batch=True, ack_policy=AckPolicy.NACK_ON_ERROR, decoder=the_message,
                       group_id=settings.group_id("ceiling", "validate" if validate else "noop"),
                       auto_offset_reset="earliest", session_timeout_ms=settings.consumer_session_timeout_ms,
                       heartbeat_interval_ms=settings.consumer_heartbeat_interval_ms,
                       max_records=settings.consumer_batch_max_records, batch_timeout_ms=500,
                       fetch_max_wait_ms=settings.consumer_bulk_fetch_max_wait_ms,
                       max_partition_fetch_bytes=8 * 1024 * 1024)
    async def handle(body) -> None:
        if not state["n"]:
            state["first"] = time.perf_counter()
        if validate:
            for record in body.raw_message:
                PurchaseIn.model_validate_json(record.value)
        state["n"] += len(body.raw_message)
        if state["n"] >= events:
            done.set()

    await broker.start()
    try:
        seen, last_progress = 0, time.monotonic()
        while not done.is_set():
            progress(f"FastStream{' + validation' if validate else ''}: {state['n']:,}/{events:,}")
            if state["n"] > seen:
                seen, last_progress = state["n"], time.monotonic()
            elif time.monotonic() - last_progress > 60:
                raise RuntimeError(f"only {seen:,} of {events:,} records consumed")
            try:
                await asyncio.wait_for(done.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
        # From the first batch on (the group join is not the stack's throughput).
        return state["n"] / (time.perf_counter() - state["first"])
    finally:
        progress_done()
        await broker.stop()


def contract_work_us(messages: list[tuple[bytes, bytes]]) -> float:
    """CPU per purchase of the contract alone: validate the inbound purchase, write the
    PurchaseRecorded envelope, validate it as the ledger does. No I/O, no business rule."""
    now = datetime.now(timezone.utc)
    started = own_cpu()
    for _, value in messages:
        p = PurchaseIn.model_validate_json(value)
        event = purchase_event_json(event_type="PurchaseRecorded", event_id=str(uuid.uuid4()), recorded_at=now,
                                    producer="purchases", correlation_id="c", customer_id=p.customer_id,
                                    purchase=p, door="kafka")
        _PURCHASE_EVENT.validate_json(event)
    return (own_cpu() - started) / len(messages) * 1e6


async def pg_round_trips(env, calls: int = 3000) -> dict[str, dict[str, float]]:
    conn = await asyncpg.connect(env.dsn())
    server = pg_processes(env.pg)
    figures: dict[str, dict[str, float]] = {}

    async def select() -> None:
        await conn.fetchval("SELECT $1::int", 1)

    async def empty_transaction() -> None:
        async with conn.transaction():
            pass

    try:
        for name, call in (("prepared SELECT", select), ("empty transaction (BEGIN + COMMIT)", empty_transaction)):
            await call()
            server = pg_processes(env.pg)  # the backend of this connection is there now
            client0, server0, started = own_cpu(), cpu_seconds(server), time.perf_counter()
            for _ in range(calls):
                await call()
            figures[name] = {"wall_us": round((time.perf_counter() - started) / calls * 1e6),
                             "client_cpu_us": round((own_cpu() - client0) / calls * 1e6),
                             "server_cpu_us": round((cpu_seconds(server) - server0) / calls * 1e6)}
    finally:
        await conn.close()
    return figures


async def broker_produce_cost(env, requests: int = 2000) -> dict[str, float]:
    """One record per produce request, awaited one at a time (as a relay round at low rates)."""
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        await producer.send_and_wait(TOPIC, b"warm-up", key=b"k")
        broker0, client0, started = cpu_seconds([env.broker.pid]), own_cpu(), time.perf_counter()
        for i in range(requests):
            await producer.send_and_wait(TOPIC, b"x" * 300, key=str(i).encode())
        return {"wall_us": round((time.perf_counter() - started) / requests * 1e6),
                "client_cpu_us": round((own_cpu() - client0) / requests * 1e6),
                "broker_cpu_us": round((cpu_seconds([env.broker.pid]) - broker0) / requests * 1e6)}
    finally:
        await producer.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    rng = random.Random(7)
    with infra(durable=True) as env:
        await create_topics(env.bootstrap, [TOPIC], PARTITIONS)
        messages = [purchase(i, 10_000, rng, "ceiling")[:2] for i in range(args.events)]
        progress(f"producing {args.events:,} purchases")
        await produce_all(env.bootstrap, TOPIC, messages)
        progress_done()
        report = {
            "benchmark": "stack_ceiling", "events": args.events, "cores": os.cpu_count(),
            "aiokafka_per_s": round(await aiokafka_ceiling(env.bootstrap, args.events)),
            "faststream_noop_per_s": round(await faststream_ceiling(env.bootstrap, args.events, validate=False)),
            "faststream_validate_per_s": round(await faststream_ceiling(env.bootstrap, args.events, validate=True)),
            "contract_cpu_us_per_purchase": round(contract_work_us(messages[:20_000]), 1),
            "postgres_round_trip": await pg_round_trips(env),
            "broker_produce_request": await broker_produce_cost(env),
        }
    print(f"stack ceilings on this machine ({report['cores']} cores), {args.events:,} purchases of 4 partitions:")
    print(f"  aiokafka getmany, no work:                {report['aiokafka_per_s']:>9,}/s")
    print(f"  FastStream batch subscriber, no work:     {report['faststream_noop_per_s']:>9,}/s")
    print(f"  FastStream + PurchaseIn validation:       {report['faststream_validate_per_s']:>9,}/s")
    print(f"  contract work per purchase (validate, PurchaseRecorded out, validated by the ledger), one core: "
          f"{report['contract_cpu_us_per_purchase']} us CPU")
    for name, f in report["postgres_round_trip"].items():
        print(f"  PostgreSQL {name}: {f['wall_us']} us wall, CPU {f['client_cpu_us']} us client + "
              f"{f['server_cpu_us']} us server")
    b = report["broker_produce_request"]
    print(f"  broker produce request (1 record): {b['wall_us']} us wall, CPU {b['client_cpu_us']} us client + "
          f"{b['broker_cpu_us']} us broker")
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
