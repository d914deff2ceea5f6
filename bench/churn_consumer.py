"""Benchmark: the churn service's per-event update rate (purchases.recorded -> customer state,
purchase days, rhythm, RFM and model scores, risk, in one transaction per batch), with the
real broker (embedded Tansu) and a real PostgreSQL.

    .venv/bin/python -m bench.churn_consumer [--events 60000] [--customers 10000] [--warm 20000]

First a warm-up base (`--warm` purchases over the past year) is consumed and the models
fitted (POST /v1/admin/models/fit), so that the measured events are scored against a real
RFM snapshot and fit, as in production. Then `--events` new purchases are pre-loaded and the
service's own counter churn_events_applied_total is read from /metrics until all are in:
the rate is from the first to the last counted event. Also prints the CPU per event of the
service, PostgreSQL and the broker, and a JSON line. The goal: no slower than the ledger
(bench.ledger_throughput, ~2,500 events/s on the 2-core build machine).
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from aiokafka import AIOKafkaProducer

from bench.ledger_throughput import PARTITIONS, cpu_seconds, create_topics
from deploy.local.infra import PgCluster, free_port, start_broker, stop_process_group
from shared.topics import CHURN_ALERTS, CHURN_DLQ, ENGAGEMENT_EVENTS, POINTS_EVENTS, PURCHASES_RECORDED, REWARDS_EVENTS

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-churn-admin"


def purchase_recorded(i: int, customers: int, occurred: datetime, rng: random.Random) -> tuple[bytes, bytes]:
    customer = f"bench-c{rng.randrange(customers)}"
    amount = f"{10 + i % 490}.{i % 100:02d}"
    at = occurred.isoformat()
    envelope = {
        "event_id": str(uuid.uuid4()), "type": "PurchaseRecorded", "schema_version": 1, "occurred_at": at,
        "recorded_at": datetime.now(timezone.utc).isoformat(), "producer": "bench", "correlation_id": f"bench-{i}",
        "causation_id": None, "customer_id": customer,
        "payload": {
            "purchase_id": f"bench-p{i}", "type": "sale", "original_purchase_id": None, "source": "pos",
            "store_id": "store-1", "occurred_at": at, "currency": "PLN", "door": "kafka", "total": amount,
            "lines": [{"line_id": "l1", "sku": f"sku-{i % 50}", "category": ("grocery", "drinks", "home")[i % 3],
                       "quantity": 1, "unit_price": amount, "discount": "0"}],
        },
    }
    return customer.encode(), json.dumps(envelope, separators=(",", ":")).encode()


async def preload(bootstrap: str, topic: str, first: int, events: int, customers: int, *, past_days: float) -> None:
    """`events` purchases; with past_days > 0 spread over that many past days (history), else now."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1024 * 1024,
                                max_request_size=8 * 1024 * 1024)
    await producer.start()
    rng = random.Random(first)
    now = datetime.now(timezone.utc)
    try:
        futures = []
        for i in range(first, first + events):
            occurred = now - timedelta(days=rng.uniform(0, past_days), minutes=1) if past_days else now
            key, value = purchase_recorded(i, customers, occurred, rng)
            futures.append(await producer.send(topic, value, key=key))
            if len(futures) >= 20_000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def applied(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()
    for line in text.splitlines():
        if line.startswith("churn_events_applied_total "):
            return float(line.split()[1])
    return 0.0


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"churn exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise TimeoutError("churn not ready")


def until(port: int, target: float, proc: subprocess.Popen, timeout_s: float = 900) -> tuple[float, float, float]:
    """Poll the counter until it reaches `target`: (first time it moved, time it got there, count)."""
    start_count = applied(port)
    first_move = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"churn exited with {proc.returncode}")
        count = applied(port)
        now = time.monotonic()
        if first_move is None and count > start_count:
            first_move = now
        if count >= target:
            return first_move or now, now, count
        time.sleep(0.05)
    raise TimeoutError(f"only {applied(port)} of {target} events applied")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--warm", type=int, default=20_000, help="purchases of the base fitted before the run")
    parser.add_argument("--batch", type=int, default=1000, help="CHURN_CONSUMER_BATCH_MAX_RECORDS")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="loyalty-bench-churn-"))
    os.chmod(workdir, 0o755)
    broker_port = free_port()
    broker = start_broker(broker_port, log_path=workdir / "broker.log")
    bootstrap = f"127.0.0.1:{broker_port}"
    cluster = PgCluster(datadir=workdir / "pg", port=free_port(), log_path=workdir / "pg.log")
    cluster.init()
    cluster.start(durable=False)
    proc = None
    try:
        cluster.psql("postgres", 'CREATE DATABASE "bench_churn"')
        prefix = "bench."
        await create_topics(bootstrap, [prefix + t for t in (PURCHASES_RECORDED, POINTS_EVENTS, REWARDS_EVENTS,
                                                              ENGAGEMENT_EVENTS, CHURN_ALERTS, CHURN_DLQ)])
        topic = prefix + PURCHASES_RECORDED
        print(f"warm-up: {args.warm:,} purchases over the past year ({args.customers:,} customers)...")
        await preload(bootstrap, topic, 0, args.warm, args.customers, past_days=365)
        port = free_port()
        env = {**os.environ, "CHURN_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CHURN_DATABASE_URL": cluster.dsn("bench_churn"),
               "CHURN_TOPIC_PREFIX": prefix, "CHURN_TOPIC_PARTITIONS": str(PARTITIONS),
               "CHURN_CONSUMER_GROUP_PREFIX": "bench", "CHURN_HTTP_PORT": str(port), "CHURN_LOG_LEVEL": "WARNING",
               "CHURN_ADMIN_API_KEY": ADMIN_KEY, "CHURN_REFRESH_AT_START": "false", "CHURN_REFRESH_ON_GROWTH": "false",
               "CHURN_CONSUMER_BATCH_MAX_RECORDS": str(args.batch), "CHURN_OUTBOX_BATCH_SIZE": "5000"}
        proc = subprocess.Popen([sys.executable, "-m", "services.churn"], cwd=ROOT, env=env,
                                stdout=open(workdir / "churn.log", "ab"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        wait_ready(port, proc)
        until(port, args.warm, proc)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/admin/models/fit", method="POST",
                                         headers={"X-Admin-Key": ADMIN_KEY})
        fit = json.loads(urllib.request.urlopen(request, timeout=600).read())
        print(f"  fitted: version {fit['fit']['version']}, {fit['fit']['customers']:,} customers, "
              f"{fit['fit']['seconds']:.2f} s; evaluation {fit['evaluation']['seconds']:.2f} s")

        postmaster = cluster.postmaster_pid() or 0
        cpu_before = {"churn": cpu_seconds(proc.pid), "broker": cpu_seconds(broker.pid),
                      "postgres": cpu_seconds(postmaster)}
        print(f"measured: {args.events:,} new purchases (now)...")
        await preload(bootstrap, topic, args.warm, args.events, args.customers, past_days=0)
        first, last, count = until(port, args.warm + args.events, proc)
        cpu = {"churn": cpu_seconds(proc.pid) - cpu_before["churn"],
               "broker": cpu_seconds(broker.pid) - cpu_before["broker"],
               "postgres": cpu_seconds(postmaster) - cpu_before["postgres"]}
        rate = args.events / max(last - first, 1e-9)
        cpu_us = {k: 1e6 * v / args.events for k, v in cpu.items()}
        print(f"churn consumer: {args.events:,} events at {rate:,.0f} events/s (first to last applied; "
              f"batches of up to {args.batch})")
        print("  CPU per event: " + ", ".join(f"{k} {v:.0f} us" for k, v in cpu_us.items()))
        print(json.dumps({"bench": "churn_consumer", "events": args.events, "customers": args.customers,
                          "events_per_s": round(rate), "cpu_us_per_event": {k: round(v) for k, v in cpu_us.items()}}))
    finally:
        if proc is not None:
            stop_process_group(proc.pid)
        cluster.stop(mode="immediate")
        stop_process_group(broker.pid)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
