"""Benchmark: sustained PurchaseRecorded -> PointsEarned throughput of the ledger, with the
real broker (embedded Tansu) and a real PostgreSQL, against a naive consumer that commits one
transaction per message.

    .venv/bin/python -m bench.ledger_throughput [--events 200000] [--naive-seconds 20]

Pre-loads N PurchaseRecorded envelopes into purchases.recorded, then starts the ledger as a
process (`python -m services.ledger`) and counts PointsEarned on points.events: the figure is
end to end (consume, rules, one transaction per batch, outbox, relay, publish). The naive run
is the same service with LEDGER_CONSUMER_BATCH_MAX_RECORDS=1 and one consumer: one record per
transaction, one offset commit per record. Prints both figures and a JSON line.
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy.local.infra import PgCluster, free_port, start_broker, stop_process_group
from shared.topics import POINTS_EVENTS, PURCHASES_RECORDED

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4


def purchase_recorded(i: int, customers: int, now: datetime) -> tuple[bytes, bytes]:
    customer = f"bench-c{i % customers}"
    occurred = (now - timedelta(minutes=5)).isoformat()
    amount = f"{10 + i % 490}.{i % 100:02d}"
    envelope = {
        "event_id": str(uuid.uuid4()), "type": "PurchaseRecorded", "schema_version": 1, "occurred_at": occurred,
        "recorded_at": now.isoformat(), "producer": "bench", "correlation_id": f"bench-{i}", "causation_id": None,
        "customer_id": customer,
        "payload": {
            "purchase_id": f"bench-p{i}", "type": "sale", "original_purchase_id": None, "source": "pos",
            "store_id": "store-1", "occurred_at": occurred, "currency": "PLN", "door": "kafka", "total": amount,
            "lines": [{"line_id": "l1", "sku": f"sku-{i % 50}", "category": "grocery", "quantity": 1,
                       "unit_price": amount, "discount": "0"}],
        },
    }
    return customer.encode(), json.dumps(envelope, separators=(",", ":")).encode()


async def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=PARTITIONS, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def preload(bootstrap: str, topics: list[str], events: int, customers: int) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1024 * 1024,
                                max_request_size=8 * 1024 * 1024)
    await producer.start()
    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    try:
        futures = []
        for i in range(events):
            key, value = purchase_recorded(i, customers, now)
            for topic in topics:
                futures.append(await producer.send(topic, value, key=key))
            if len(futures) >= 20_000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - started


class EarnedCounter:
    """Counts PointsEarned on a points.events topic (by header, without parsing bodies) and
    keeps the broker timestamps of the first and last."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.count = 0
        self.first_ms: int | None = None
        self.last_ms: int | None = None
        self.first_seen_s: float | None = None

    async def run_until(self, target: int | None, *, deadline_s: float, window_s: float | None = None,
                        proc: subprocess.Popen | None = None) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None,
                                    max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = time.monotonic() + deadline_s
            while time.monotonic() < end:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"the ledger exited with {proc.returncode}")
                batch = await consumer.getmany(timeout_ms=200, max_records=50_000)
                for records in batch.values():
                    for r in records:
                        if ("type", b"PointsEarned") not in (r.headers or ()):
                            continue
                        self.count += 1
                        self.first_ms = r.timestamp if self.first_ms is None else min(self.first_ms, r.timestamp)
                        self.last_ms = r.timestamp if self.last_ms is None else max(self.last_ms, r.timestamp)
                if self.count and self.first_seen_s is None:
                    self.first_seen_s = time.monotonic()
                    if window_s is not None:
                        end = min(end, self.first_seen_s + window_s)
                if target is not None and self.count >= target:
                    return
        finally:
            await consumer.stop()

    @property
    def rate(self) -> float:
        if not self.count or self.first_ms is None or self.last_ms is None or self.last_ms == self.first_ms:
            return 0.0
        return self.count / ((self.last_ms - self.first_ms) / 1000)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and, for the postmaster, of its current children)."""
    ticks = os.sysconf("SC_CLK_TCK")

    def own(p: int) -> float:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / ticks

    total = own(pid)
    for child in Path("/proc").iterdir():
        if child.name.isdigit():
            try:
                if int(Path(f"/proc/{child.name}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    total += own(int(child.name))
            except (OSError, ValueError, IndexError):
                pass
    return total


def start_ledger(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    full = {**os.environ, **env}
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "services.ledger"], cwd=ROOT, env=full, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def batch_figures(port: int) -> dict[str, float]:
    """Mean batch size and mean time per batch, from the ledger's own /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("ledger_batch_size_sum", "ledger_batch_size_count", "ledger_batch_processing_seconds_sum"):
            if line.startswith(name + '{stream="purchases"}'):
                values[name] = float(line.rsplit(" ", 1)[1])
    count = values.get("ledger_batch_size_count") or 1
    return {"mean_batch_size": values.get("ledger_batch_size_sum", 0) / count,
            "mean_batch_ms": 1000 * values.get("ledger_batch_processing_seconds_sum", 0) / count,
            "batches": count}


def ledger_env(bootstrap: str, dsn: str, prefix: str, port: int, batch: int, consumers: int) -> dict[str, str]:
    return {
        "LEDGER_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "LEDGER_DATABASE_URL": dsn, "LEDGER_TOPIC_PREFIX": prefix,
        "LEDGER_TOPIC_PARTITIONS": str(PARTITIONS), "LEDGER_CONSUMER_GROUP_PREFIX": prefix.rstrip("."),
        "LEDGER_CONSUMER_SESSION_TIMEOUT_MS": "6000", "LEDGER_CONSUMER_HEARTBEAT_INTERVAL_MS": "1000",
        "LEDGER_CONSUMER_BATCH_MAX_RECORDS": str(batch), "LEDGER_HTTP_PORT": str(port), "LEDGER_LOG_LEVEL": "WARNING",
        "LEDGER_SCHEDULER_INTERVAL_S": "3600", "LEDGER_OUTBOX_BATCH_SIZE": "5000",
        "LEDGER_PURCHASES_CONSUMERS": str(consumers),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=2000, help="LEDGER_CONSUMER_BATCH_MAX_RECORDS of the ledger")
    parser.add_argument("--consumers", type=int, default=2,
                        help="LEDGER_PURCHASES_CONSUMERS of the ledger (the naive run has one)")
    parser.add_argument("--naive-seconds", type=float, default=20.0, help="how long to measure the naive consumer")
    parser.add_argument("--durable", action="store_true",
                        help="PostgreSQL with fsync and synchronous_commit on (default: off, as in the tests)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="loyalty-bench-"))
    os.chmod(workdir, 0o755)
    broker_port = free_port()
    broker = start_broker(broker_port, log_path=workdir / "broker.log")
    bootstrap = f"127.0.0.1:{broker_port}"
    cluster = PgCluster(datadir=workdir / "pg", port=free_port(), log_path=workdir / "pg.log")
    cluster.init()
    cluster.start(durable=args.durable)
    procs: list[subprocess.Popen] = []
    try:
        for name in ("bench_batch", "bench_naive"):
            cluster.psql("postgres", f'CREATE DATABASE "{name}"')
        batch_prefix, naive_prefix = "batch.", "naive."
        await create_topics(bootstrap, [p + t for p in (batch_prefix, naive_prefix) for t in (PURCHASES_RECORDED, POINTS_EVENTS)])
        print(f"pre-loading {args.events:,} PurchaseRecorded ({args.customers:,} customers, {PARTITIONS} partitions)...")
        naive_events = min(args.events, 60_000)
        took = await preload(bootstrap, [batch_prefix + PURCHASES_RECORDED], args.events, args.customers)
        await preload(bootstrap, [naive_prefix + PURCHASES_RECORDED], naive_events, args.customers)
        print(f"  produced in {took:.1f} s")

        # the ledger, micro-batches
        postmaster = cluster.postmaster_pid() or 0
        cpu_before = {"broker": cpu_seconds(broker.pid), "postgres": cpu_seconds(postmaster)}
        started = time.monotonic()
        port = free_port()
        procs.append(start_ledger(ledger_env(bootstrap, cluster.dsn("bench_batch"), batch_prefix, port,
                                             args.batch, args.consumers), workdir / "ledger-batch.log"))
        batch = EarnedCounter(bootstrap, batch_prefix + POINTS_EVENTS)
        await batch.run_until(args.events, deadline_s=600, proc=procs[-1])
        wall_s = time.monotonic() - started
        figures = batch_figures(port)
        # CPU spent per event by each process: a figure that does not depend on what else runs
        # on the machine (unlike events/s), and that bounds the rate on idle cores.
        cpu = {"ledger": cpu_seconds(procs[-1].pid), "broker": cpu_seconds(broker.pid) - cpu_before["broker"],
               "postgres": cpu_seconds(postmaster) - cpu_before["postgres"]}
        cpu_us = {k: 1e6 * v / max(batch.count, 1) for k, v in cpu.items()}
        stop_process_group(procs[-1].pid)
        print(f"ledger ({args.consumers} consumers, batches of up to {args.batch}): {batch.count:,} PointsEarned, "
              f"sustained {batch.rate:,.0f} events/s (first to last event), {wall_s:.1f} s from process start; "
              f"{figures['batches']:.0f} batches, mean {figures['mean_batch_size']:.0f} records, "
              f"{figures['mean_batch_ms']:.0f} ms per batch transaction")

        total_us = sum(cpu_us.values())
        print("  CPU per event: " + ", ".join(f"{k} {v:.0f} us" for k, v in cpu_us.items())
              + f"; {total_us:.0f} us in all -> at most ~{os.cpu_count() * 1e6 / total_us:,.0f} events/s "
              f"on {os.cpu_count()} idle cores")

        # the naive consumer: one transaction and one commit per message
        procs.append(start_ledger(ledger_env(bootstrap, cluster.dsn("bench_naive"), naive_prefix, free_port(), 1, 1),
                                  workdir / "ledger-naive.log"))
        naive = EarnedCounter(bootstrap, naive_prefix + POINTS_EVENTS)
        await naive.run_until(naive_events, deadline_s=120 + args.naive_seconds, window_s=args.naive_seconds,
                              proc=procs[-1])
        stop_process_group(procs[-1].pid)
        print(f"naive (one transaction + commit per message): {naive.count:,} PointsEarned in the "
              f"{args.naive_seconds:.0f} s window, {naive.rate:,.0f} events/s")
        speedup = batch.rate / naive.rate if naive.rate else float("inf")
        print(f"speed-up: x{speedup:.1f}; goal 10,000 events/s: {'met' if batch.rate >= 10_000 else 'NOT met'}")
        print(json.dumps({
            "benchmark": "ledger_throughput", "events": args.events, "batch_max_records": args.batch, "consumers": args.consumers,
            "durable_postgres": args.durable, "cpus": os.cpu_count(),
            "batched_events_per_s": round(batch.rate), "mean_batch_size": round(figures["mean_batch_size"]),
            "mean_batch_ms": round(figures["mean_batch_ms"]), "batched_earned": batch.count,
            "cpu_us_per_event": {k: round(v) for k, v in cpu_us.items()},
            "idle_cores_bound_events_per_s": round(os.cpu_count() * 1e6 / total_us), "batched_wall_s": round(wall_s, 1),
            "naive_events_per_s": round(naive.rate), "naive_earned": naive.count, "speedup": round(speedup, 1),
        }))
    finally:
        for p in procs:
            stop_process_group(p.pid)
        cluster.stop(mode="immediate")
        stop_process_group(broker.pid)
        for log in workdir.glob("ledger-*.log"):  # noqa: ASYNC240 (the run is over: nothing else waits on this loop)
            shutil.copy(log, Path(tempfile.gettempdir()) / f"loyalty-bench-{log.name}")
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
