"""End-to-end load benchmark (`make bench`): purchases in on purchases.raw until their
PointsEarned are visible on points.events, through the real services as processes, the
embedded broker and PostgreSQL.

    .venv/bin/python -m bench.e2e [--size quick|full] [--events N] [--rates 1000,5000]

Phases:
 1. sustained throughput: N purchases pre-loaded on purchases.raw, then the purchases and
    ledger services start and drain them; events/s from the first PointsEarned to the last;
 2. latency (p50/p95/p99) from a purchase's send to its PointsEarned, at fixed offered rates,
    after a 3 s warm-up at the rate (the consumers leave idle mode);
 3. for comparison, on the same machine in the same run: the raw ceiling (the same messages
    consumed with aiokafka and copied into PostgreSQL with no logic) and a naive pipeline (a
    FastStream consumer that commits one transaction per message);
 4. redemption latency through the whole saga (rewards + ledger) at 20/s and 100/s, once
    every service has caught up with the purchases (the wait is printed), after a 2 s warm-up;
 5. CPU per purchase in a steady phase (warm services, known customers): the CPU every process
    of the earn path (purchases, ledger, PostgreSQL's backends serving them and its background
    processes, the broker) spent from the first send of a
    burst until its last PointsEarned, divided by its purchases; the other services' CPU
    (rewards, churn, engagement: they consume the same topics) is reported beside it;
 6. idle CPU (measured first): every service up, no traffic ever, as a share of one core.
Every service under services/ runs from the start, so the figures hold with all of them up.
Prints a progress line while running, a table, and one JSON line of figures.
"""

import argparse
import asyncio
import json
import os
import random
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import redemption
from bench.harness import (
    Service, bulk_producer, cpu_seconds, create_topics, infra, percentile, pg_backend_apps, pg_processes, process_tree, produce_all,
    progress, progress_done,
)
from shared.topics import ALL_TOPICS, POINTS_EVENTS, PURCHASES_RAW, PURCHASES_RECORDED

SIZES = {  # events for the sustained phase, seconds per latency rate, naive window, steady burst, idle window
    "quick": {"events": 30_000, "latency_s": 5, "naive_s": 5, "redeem_s": 5, "steady": 20_000, "idle_s": 10},
    "full": {"events": 700_000, "latency_s": 20, "naive_s": 15, "redeem_s": 20, "steady": 100_000, "idle_s": 20},
}
# PostgreSQL's share of the earn path: the purchases and ledger backends and every process
# that serves no other service (postmaster, WAL writer, checkpointer, autovacuum...). The
# broker cannot be split by client: it is counted whole, serving churn and engagement too.
EARN_PATH = ("purchases", "ledger", "postgres_earn_path", "broker")
EARN_PATH_PG_APPS = ("loyalty-purchases", "loyalty-ledger")
REDEMPTION_RATES = (20, 100)
PARTITIONS = 4
ROOT = Path(__file__).resolve().parents[1]
SKUS = [("MILK", "grocery", "3.49"), ("COFFEE", "grocery", "34.99"), ("JEANS", "clothing", "189.00"),
        ("CABLE", "electronics", "39.99"), ("KETTLE", "home", "119.00"), ("CREAM", "beauty", "64.00")]


def purchase(i: int, customers: int, rng: random.Random, tag: str) -> tuple[bytes, bytes, str]:
    customer = f"bench-{i % customers}"
    lines = []
    for n, (sku, category, price) in enumerate(rng.sample(SKUS, rng.randint(1, 3)), start=1):
        lines.append({"line_id": str(n), "sku": sku, "category": category, "quantity": rng.randint(1, 3),
                      "unit_price": price, "discount": "0.00"})
    total = sum(Decimal(line["unit_price"]) * line["quantity"] for line in lines)
    purchase_id = f"{tag}-{i}"
    body = {"purchase_id": purchase_id, "type": "sale", "original_purchase_id": None, "source": "pos",
            "store_id": "bench-store", "customer_id": customer,
            "occurred_at": (datetime.now(timezone.utc) - timedelta(seconds=30)).isoformat(),
            "currency": "PLN", "lines": lines, "total": format(total, "f")}
    return customer.encode(), json.dumps(body, separators=(",", ":")).encode(), purchase_id


class EarnedWatcher:
    """Follows points.events and notes when each purchase's PointsEarned arrived; also
    purchases.recorded, so that latency splits into its two hops (purchases, then ledger)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.seen: dict[str, float] = {}
        self.recorded: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                          fetch_max_wait_ms=20, max_partition_fetch_bytes=8 * 1024 * 1024)
        await self._consumer.start()
        tps = [TopicPartition(topic, p) for topic in (POINTS_EVENTS, PURCHASES_RECORDED) for p in range(PARTITIONS)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=50, max_records=20_000)
            now = time.monotonic()
            for tp, records in batch.items():
                if tp.topic == PURCHASES_RECORDED:
                    for r in records:
                        self.recorded.setdefault(json.loads(r.value)["payload"]["purchase_id"], now)
                    continue
                for r in records:
                    if ("type", b"PointsEarned") in (r.headers or ()):
                        self.seen.setdefault(json.loads(r.value)["payload"]["purchase_id"], now)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self._consumer.stop()


async def wait_for(watcher: EarnedWatcher, ids: list[str], *, label: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = sum(1 for i in ids if i in watcher.seen) if len(ids) < 50_000 else len(watcher.seen)
        progress(f"{label}: {done:,}/{len(ids):,} PointsEarned")
        if done >= len(ids):
            break
        await asyncio.sleep(0.5)
    progress_done()


async def sustained(env, watcher, events: int, customers: int) -> dict:
    rng = random.Random(1)
    messages = [purchase(i, customers, rng, "s") for i in range(events)]
    took = await produce_all(env.bootstrap, PURCHASES_RAW, ((k, v) for k, v, _ in messages))
    print(f"pre-loaded {events:,} purchases on {PURCHASES_RAW} in {took:.1f} s")
    services = [Service(env, name, {"TOPIC_PARTITIONS": str(PARTITIONS), **settings})
                for name, settings in service_settings().items()]
    started = time.monotonic()
    for s in services:
        s.start()
    ids = [pid for _, _, pid in messages]
    await asyncio.gather(*(s.wait_ready() for s in services))
    await wait_for(watcher, ids, label="sustained", timeout_s=max(120, events / 500))
    arrived = [watcher.seen[i] for i in ids if i in watcher.seen]
    if not arrived:
        raise RuntimeError(f"no PointsEarned at all; see the services' logs in {env.workdir}")
    first, last = min(arrived), max(arrived)
    return {"services": services, "events": events, "earned": len(arrived),
            "events_per_s": len(arrived) / (last - first) if last > first else 0.0,
            "wall_s_from_start": last - started, "window_s": last - first}


def service_settings() -> dict[str, dict[str, str]]:
    """Every service of the platform, each with what the bench needs of it. The ledger and
    rewards get the redemption phase's keys up front: no restart (a restarted member rejoining
    its group can wait long on the embedded broker's coordinator). Consumer timing is the
    production default (heartbeat 3 s, session 10 s), not the harness's quick-failover one:
    nothing is killed here, and heartbeats are a third of what an idle stack costs."""
    names = sorted(p.parent.name for p in (ROOT / "services").glob("*/__main__.py"))
    own = {"ledger": {"SCHEDULER_INTERVAL_S": "3600", "ADMIN_API_KEY": redemption.ADMIN_KEY},
           "rewards": redemption.REWARDS_SETTINGS}
    timing = {"CONSUMER_SESSION_TIMEOUT_MS": "10000", "CONSUMER_HEARTBEAT_INTERVAL_MS": "3000"}
    return {name: {"ADMIN_API_KEY": redemption.ADMIN_KEY, **timing, **own.get(name, {})} for name in names}


def process_groups(env, services: list[Service]) -> dict[str, list[int]]:
    groups = {s.name: process_tree(s.proc.pid) for s in services if s.proc is not None}
    groups["broker"] = process_tree(env.broker.pid)
    groups["postgres"] = pg_processes(env.pg)
    return groups


async def steady_cpu(env, watcher, services: list[Service], events: int, customers: int) -> dict:
    """CPU per purchase with warm services and known customers: from the first send of a
    burst to its last PointsEarned, every process's CPU over the purchases."""
    rng = random.Random(2)
    messages = [purchase(i, customers, rng, f"c{uuid.uuid4().hex[:6]}") for i in range(events)]
    groups = process_groups(env, services)
    others = {pid for pid, app in (await pg_backend_apps(env.dsn())).items() if app not in EARN_PATH_PG_APPS}
    groups["postgres_earn_path"] = [pid for pid in groups["postgres"] if pid not in others]
    before = {name: cpu_seconds(pids) for name, pids in groups.items()}
    started = time.monotonic()
    await produce_all(env.bootstrap, PURCHASES_RAW, ((k, v) for k, v, _ in messages))
    await wait_for(watcher, [pid for _, _, pid in messages], label="steady", timeout_s=max(120, events / 300))
    wall_s = time.monotonic() - started
    used = {name: cpu_seconds(pids) - before[name] for name, pids in groups.items()}
    per_purchase = {name: round(seconds / events * 1e6, 1) for name, seconds in used.items()}
    earn = sum(per_purchase.get(name, 0.0) for name in EARN_PATH)
    return {"events": events, "wall_s": round(wall_s, 1), "events_per_s": round(events / wall_s),
            "cpu_us_per_purchase": round(earn, 1), "cpu_us_per_purchase_by_process": per_purchase,
            "cpu_us_per_purchase_all_processes": round(sum(v for k, v in per_purchase.items()
                                                           if k != "postgres_earn_path"), 1)}


async def idle_cpu(env, seconds: float, settle_s: float = 8.0) -> dict:
    """Every service up, no traffic ever: CPU as a share of one core, in all and by process.
    Measured first, on services of their own (stopped afterwards): after traffic, the slower
    consumers (churn, engagement) and engagement's dispatcher still work off what came, which
    is not what an idle shop costs."""
    services = [Service(env, name, {"TOPIC_PARTITIONS": str(PARTITIONS), **settings})
                for name, settings in service_settings().items()]
    for service in services:
        service.start()
    await asyncio.gather(*(service.wait_ready() for service in services))
    await asyncio.sleep(settle_s)  # groups joined, start-up jobs done
    groups = process_groups(env, services)
    before = {name: cpu_seconds(pids) for name, pids in groups.items()}
    progress(f"idle: measuring {seconds:.0f} s with no traffic")
    await asyncio.sleep(seconds)
    progress_done()
    share = {name: round((cpu_seconds(pids) - before[name]) / seconds * 100, 1) for name, pids in groups.items()}
    for service in services:
        service.stop()
    return {"idle_cpu_pct": round(sum(share.values()), 1), "by_process": share, "seconds": seconds}


async def quiet(services: list[Service], *, below_pct: float = 10.0, timeout_s: float = 300.0) -> float:
    """Wait until no service uses more than `below_pct` of a core over a second (their
    consumers have worked off what came); returns the seconds waited."""
    started = time.monotonic()
    groups = {s.name: process_tree(s.proc.pid) for s in services if s.proc is not None}
    while time.monotonic() - started < timeout_s:
        before = {name: cpu_seconds(pids) for name, pids in groups.items()}
        await asyncio.sleep(1.0)
        busiest = max((cpu_seconds(pids) - before[name]) * 100 for name, pids in groups.items())
        progress(f"waiting for the services to catch up: busiest {busiest:.0f}% of a core")
        if busiest < below_pct:
            break
    progress_done()
    return round(time.monotonic() - started, 1)


LATENCY_WARMUP_S = 3.0


async def latency_at(env, watcher, rate: int, seconds: float, customers: int) -> dict:
    rng = random.Random(rate)
    producer = bulk_producer(env.bootstrap)
    await producer.start()
    sent: dict[str, float] = {}
    tag = f"l{rate}-{uuid.uuid4().hex[:6]}"
    i = 0
    tick_s = 0.005
    # The first LATENCY_WARMUP_S at the rate are not measured: after the quiet between
    # phases the consumers are in idle mode, and their first look (up to one idle poll per
    # hop, docs/scaling.md) is not the latency at a steady rate.
    started = time.monotonic()
    measured_from = started + LATENCY_WARMUP_S
    try:
        while time.monotonic() - measured_from < seconds:
            due = int((time.monotonic() - started) * rate)
            while i < due:
                key, value, pid = purchase(i, customers, rng, tag)
                await producer.send(PURCHASES_RAW, value, key=key)
                if time.monotonic() >= measured_from:
                    sent[pid] = time.monotonic()
                i += 1
            progress(f"latency at {rate:,}/s: sent {i:,}")
            await asyncio.sleep(tick_s)
        await producer.flush()
    finally:
        await producer.stop()
    progress_done()
    await wait_for(watcher, list(sent), label=f"latency at {rate:,}/s", timeout_s=120)
    latencies = sorted((watcher.seen[p] - t) * 1000 for p, t in sent.items() if p in watcher.seen)
    # The two hops: purchases.raw -> purchases.recorded, then purchases.recorded -> PointsEarned.
    hop1 = sorted((watcher.recorded[p] - t) * 1000 for p, t in sent.items() if p in watcher.recorded)
    hop2 = sorted((watcher.seen[p] - watcher.recorded[p]) * 1000 for p in sent
                  if p in watcher.seen and p in watcher.recorded)
    achieved = len(sent) / seconds
    return {"offered_per_s": rate, "achieved_send_per_s": round(achieved), "count": len(latencies),
            "missing": len(sent) - len(latencies), "p50_ms": percentile(latencies, 50),
            "p95_ms": percentile(latencies, 95), "p99_ms": percentile(latencies, 99),
            "purchases_hop_p50_p99_ms": [percentile(hop1, 50), percentile(hop1, 99)],
            "ledger_hop_p50_p99_ms": [percentile(hop2, 50), percentile(hop2, 99)]}


async def raw_ceiling(env, events: int) -> float:
    """The same messages consumed with aiokafka and copied into PostgreSQL, no logic."""
    conn = await asyncpg.connect(env.dsn())
    await conn.execute("CREATE TABLE IF NOT EXISTS bench_raw (k text, v bytea)")
    consumer = AIOKafkaConsumer(bootstrap_servers=env.bootstrap, group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    tps = [TopicPartition(PURCHASES_RAW, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    copied = 0
    started = time.perf_counter()
    try:
        while copied < events:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            rows = [(r.key.decode() if r.key else None, r.value) for records in batch.values() for r in records]
            if rows:
                async with conn.transaction():
                    await conn.copy_records_to_table("bench_raw", records=rows, columns=["k", "v"])
                copied += len(rows)
                progress(f"raw ceiling: {copied:,}/{events:,}")
        elapsed = time.perf_counter() - started
    finally:
        progress_done()
        await consumer.stop()
        await conn.close()
    return copied / elapsed


async def naive_pipeline(env, seconds: float) -> float:
    """A FastStream consumer that commits one database transaction (and one offset) per message."""
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker

    pool = await asyncpg.create_pool(env.dsn(), min_size=1, max_size=2)
    await pool.execute("CREATE TABLE IF NOT EXISTS bench_naive (purchase_id text PRIMARY KEY, body jsonb)")
    broker = KafkaBroker(env.bootstrap, logger=None)
    count = {"n": 0}

    @broker.subscriber(PURCHASES_RAW, group_id=f"naive-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest",
                       ack_policy=AckPolicy.ACK, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    async def handle(body: dict) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO bench_naive VALUES ($1, $2) ON CONFLICT DO NOTHING",
                               body["purchase_id"], json.dumps(body))
        count["n"] += 1

    await broker.start()
    try:
        while count["n"] == 0:
            await asyncio.sleep(0.05)
        start_n, started = count["n"], time.monotonic()
        while time.monotonic() - started < seconds:
            progress(f"naive pipeline: {count['n'] - start_n:,} in {time.monotonic() - started:.0f}s")
            await asyncio.sleep(0.5)
        rate = (count["n"] - start_n) / (time.monotonic() - started)
    finally:
        progress_done()
        await broker.stop()
        await pool.close()
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default=os.environ.get("BENCH_SIZE", "full"))
    parser.add_argument("--events", type=int, help="purchases in the sustained phase (overrides --size)")
    parser.add_argument("--rates", default="1000,5000", help="offered purchases/s for the latency phase")
    parser.add_argument("--customers", type=int, default=50_000)
    parser.add_argument("--no-fsync", action="store_true", help="PostgreSQL without fsync (default: durable)")
    args = parser.parse_args()
    size = dict(SIZES[args.size])
    if args.events:
        size["events"] = args.events
    rates = [int(r) for r in args.rates.split(",") if r]
    figures: dict = {"benchmark": "e2e", "size": args.size, "cpus": os.cpu_count(), "durable_postgres": not args.no_fsync}
    with infra(durable=not args.no_fsync, keep=bool(os.environ.get("BENCH_KEEP"))) as env:
        print(f"work folder (logs): {env.workdir}")
        await create_topics(env.bootstrap, list(ALL_TOPICS), PARTITIONS)
        # Idle first, before the bench's own consumer (the watcher) is there to cost the broker.
        idle = await idle_cpu(env, size["idle_s"])
        figures["idle_cpu_pct"], figures["idle"] = idle["idle_cpu_pct"], idle
        watcher = EarnedWatcher(env.bootstrap)
        await watcher.start()
        try:
            s = await sustained(env, watcher, size["events"], args.customers)
            figures["sustained"] = {k: v for k, v in s.items() if k != "services"}
            figures["steady"] = await steady_cpu(env, watcher, s["services"], size["steady"], args.customers)
            figures["cpu_us_per_purchase"] = figures["steady"]["cpu_us_per_purchase"]
            figures["latency"] = [await latency_at(env, watcher, r, size["latency_s"], args.customers) for r in rates]
            # The saga is measured with five services up and caught up: churn and engagement
            # work off the purchase phases' backlog first (the wait is reported).
            figures["caught_up_before_redemption_s"] = await quiet(s["services"])
            figures["redemption"] = [await redemption.measure(env, s["services"], rate=r, seconds=size["redeem_s"])
                                     for r in REDEMPTION_RATES]
            for r in figures["redemption"]:
                figures[f"redemption_{r['offered_per_s']}_per_s_p50_ms"] = r["p50_ms"]
                figures[f"redemption_{r['offered_per_s']}_per_s_p99_ms"] = r["p99_ms"]
            for service in s["services"]:
                service.stop()
            figures["raw_ceiling_per_s"] = await raw_ceiling(env, size["events"])
            figures["naive_per_s"] = await naive_pipeline(env, size["naive_s"])
        finally:
            await watcher.stop()
    e2e = figures["sustained"]["events_per_s"]
    figures["ratio_to_raw_ceiling"] = e2e / figures["raw_ceiling_per_s"] if figures["raw_ceiling_per_s"] else None
    figures["ratio_to_naive"] = e2e / figures["naive_per_s"] if figures["naive_per_s"] else None
    print_table(figures)
    print(json.dumps(figures, default=lambda x: round(x, 2) if isinstance(x, float) else str(x)))


def print_table(f: dict) -> None:
    s = f["sustained"]
    print()
    print(f"{'measure':<52} {'figure':>14}   goal")
    print(f"{'sustained end to end (purchases.raw -> PointsEarned)':<52} {s['events_per_s']:>10,.0f}/s   >= 10,000/s for a minute "
          f"({s['earned']:,} events over {s['window_s']:.0f} s)")
    for lat in f["latency"]:
        goal = "p99 < 250 ms" if lat["offered_per_s"] == 5000 else ""
        print(f"{'latency at ' + format(lat['offered_per_s'], ',') + '/s  p50 / p95 / p99 (ms)':<52} "
              f"{lat['p50_ms']:>5.0f} /{lat['p95_ms']:>5.0f} /{lat['p99_ms']:>5.0f}   {goal}")
        (a50, a99), (b50, b99) = lat["purchases_hop_p50_p99_ms"], lat["ledger_hop_p50_p99_ms"]
        print(f"{'  of which purchases hop / ledger hop, p50 (p99)':<52} {a50:>5.0f} ({a99:.0f}) / {b50:.0f} ({b99:.0f})")
    st = f["steady"]
    print(f"{'CPU per purchase, earn path (steady, warm)':<52} {st['cpu_us_per_purchase']:>10,.0f} us   <= 350 us "
          f"(PostgreSQL: purchases' and ledger's backends and background; all processes "
          f"{st['cpu_us_per_purchase_all_processes']:,.0f} us; {st['cpu_us_per_purchase_by_process']})")
    print(f"{'idle CPU, every service up, no traffic':<52} {f['idle_cpu_pct']:>10.1f} %    <= 5% of one core "
          f"({f['idle']['by_process']})")
    if "caught_up_before_redemption_s" in f:
        print(f"{'  (services caught up before the saga, waited)':<52} {f['caught_up_before_redemption_s']:>10.1f} s")
    for r in f.get("redemption", []):
        goal = {20: "p99 <= 50 ms", 100: "p99 <= 100 ms"}.get(r["offered_per_s"], "")
        print(f"{'redemption saga at ' + format(r['offered_per_s'], ',') + '/s  p50 / p99 (ms)':<52} "
              f"{r['p50_ms']:>6.0f} /{r['p99_ms']:>6.0f}   {goal} ({r['outcomes']})")
    print(f"{'raw ceiling (aiokafka -> COPY, no logic)':<52} {f['raw_ceiling_per_s']:>10,.0f}/s")
    print(f"{'naive pipeline (a transaction per message)':<52} {f['naive_per_s']:>10,.0f}/s")
    print(f"{'end to end / raw ceiling':<52} {f['ratio_to_raw_ceiling']:>11.2f}   >= 0.5")
    print(f"{'end to end / naive':<52} {f['ratio_to_naive']:>11.1f}x   >= 10x")
    print()


if __name__ == "__main__":
    asyncio.run(main())
