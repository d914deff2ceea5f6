"""Benchmark: the engagement dispatcher's rate to a local SMTP server with 1,000,000
touchpoints scheduled in the timer table, the due scan's plan, and the consumer's event rate.

    .venv/bin/python -m bench.engagement_dispatch [--scheduled 1000000] [--due 20000] [--events 20000]
        [--workers 2] [--concurrency 32] [--mail-dir PATH] [--catcher-processes 1]

1. Migrates engagement's schema, loads the shipped journeys, COPYs `--scheduled` timers (all
   but `--due` of them due next year) for customers with an address and consent, runs
   ANALYZE, prints the EXPLAIN plan's nodes of the claim query (goal: an index scan on
   timers_due, never a sequential scan).
2. Dispatches the due ones in this process (the service's own dispatch_until_idle) to the
   mail catcher running as its own process (deploy/local/mailcatcher.py): messages/s, and
   the CPU each process spent per message (dispatcher, PostgreSQL, catcher).
3. Starts the service as a process (its clock two days behind, so nothing it plans becomes
   due) and produces `--events` PointsEarned: events/s until each is a journey with its timer.
"""

import argparse
import asyncio
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from bench.harness import ROOT, Service, cpu_seconds, infra, process_tree, produce_all
from deploy.local.infra import free_port, stop_process_group
from services.engagement import dispatch
from services.engagement.channels import EmailChannel, Templates, WebhookChannel
from services.engagement.service import Engagement, JourneyBook
from services.engagement.settings import EngagementSettings
from shared.db import create_pool, migrate
from shared.topics import POINTS_EVENTS
from tests.support.engagement import balance

CUSTOMERS = 100_000


def _copy_text(rows) -> bytes:
    return "".join("\t".join(r) + "\n" for r in rows).encode()


async def load(dsn: str, settings: EngagementSettings, scheduled: int, due: int) -> None:
    await migrate(dsn, schema="engagement", migrations_dir=ROOT / "services/engagement/migrations")
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "engagement"})
    try:
        await JourneyBook(settings.journeys_file).load(conn)
        now = datetime.now(UTC)
        customers = [f"b{i}" for i in range(CUSTOMERS)]
        await conn.copy_to_table("customers", source=io.BytesIO(_copy_text(
            (c, "1", f"{c}@example.com", "pl-PL", "UTC") for c in customers)),
            columns=["customer_id", "purchases", "email", "locale", "time_zone"])
        await conn.copy_to_table("consents", source=io.BytesIO(_copy_text(
            (c, "email", "t", "bench", now.isoformat()) for c in customers)),
            columns=["customer_id", "channel", "granted", "source", "changed_at"])
        later = now + timedelta(days=365)
        chunk = 100_000
        for start in range(0, scheduled, chunk):
            rows = []
            for i in range(start, min(scheduled, start + chunk)):
                at = (now - timedelta(seconds=i % 600)) if i < due else later + timedelta(seconds=i)
                rows.append((str(uuid.uuid4()), str(uuid.uuid4()), customers[i % CUSTOMERS], "thank_you", "1",
                             "thank_you", str(uuid.uuid4()), at.isoformat(), (at + timedelta(days=1)).isoformat(),
                             "scheduled", json.dumps({"points": 10 + i % 90, "available_points": 100}),
                             now.isoformat()))
            await conn.copy_to_table("timers", source=io.BytesIO(_copy_text(rows)), columns=[
                "timer_id", "instance_id", "customer_id", "journey", "journey_version", "step", "trigger_event_id",
                "due_at", "valid_until", "status", "context", "created_at"])
        await conn.execute("ANALYZE")
        plan = await conn.fetchval(dispatch.explain_due_scan())
        print(f"due scan plan ({scheduled:,} scheduled): {' -> '.join(dispatch.plan_nodes(plan))}")
    finally:
        await conn.close()


async def dispatch_rate(dsn: str, settings: EngagementSettings, due: int,
                        roots: dict[str, int]) -> tuple[float, dict[str, float]]:
    """messages/s, and CPU microseconds per message of each process (this one: the dispatcher)."""
    pool = await create_pool(dsn, schema="engagement", min_size=2, max_size=2 + settings.dispatch_workers)
    engine = Engagement(settings=settings, clock=lambda: datetime.now(UTC), journeys=JourneyBook(settings.journeys_file),
                        templates=Templates(), email=EmailChannel(settings), webhook=WebhookChannel(settings))
    try:
        async with pool.acquire() as conn:
            await engine.journeys.refresh(conn)
        def each() -> dict[tuple[str, int], float]:  # a process started during the run counts from 0
            return {(name, pid): cpu_seconds([pid]) for name, root in roots.items() for pid in process_tree(root)}

        cpu_before = each()
        own_before = time.process_time()
        started = time.perf_counter()
        sent = sum(await asyncio.gather(*(dispatch.dispatch_until_idle(pool, engine)
                                          for _ in range(settings.dispatch_workers))))
        elapsed = time.perf_counter() - started
        used = {"dispatcher": time.process_time() - own_before, **{name: 0.0 for name in roots}}
        for (name, pid), seconds in each().items():
            used[name] += seconds - cpu_before.get((name, pid), 0.0)
        n = await pool.fetchval("SELECT count(*) FROM timers WHERE status = 'sent'")
        assert n == due, f"{n} sent of {due} due ({sent} claimed)"
        return due / elapsed, {name: 1e6 * seconds / due for name, seconds in used.items()}
    finally:
        await engine.email.close()
        await pool.close()


def points_earned(i: int, now: datetime) -> tuple[bytes, bytes]:
    customer = f"e{i % CUSTOMERS}"
    body = {"event_id": str(uuid.uuid4()), "type": "PointsEarned", "schema_version": 1, "occurred_at": now.isoformat(),
            "recorded_at": now.isoformat(), "producer": "bench", "correlation_id": f"b{i}", "causation_id": None,
            "customer_id": customer,
            "payload": {"amount_points": 10, "balance": balance(10), "history": False, "purchase_id": f"p{i}",
                        "source": "pos", "rule_version": 1, "pending": False, "matures_at": None,
                        "expires_at": (now + timedelta(days=365)).isoformat(), "tier_multiplier": "1.0"}}
    return customer.encode(), json.dumps(body).encode()


async def consumer_rate(env, events: int, smtp_port: int) -> float:
    service = Service(env, "engagement", {"SMTP_PORT": str(smtp_port), "CLOCK_OFFSET_S": str(-2 * 86400),
                                          "TOPIC_PARTITIONS": "4"}).start()
    await service.wait_ready()
    now = datetime.now(UTC)
    conn = await asyncpg.connect(env.dsn(), server_settings={"search_path": "engagement"})
    try:
        before = await conn.fetchval("SELECT count(*) FROM timers")
        started = time.perf_counter()
        await produce_all(env.bootstrap, POINTS_EVENTS, (points_earned(i, now) for i in range(events)))
        while await conn.fetchval("SELECT count(*) FROM timers") - before < events:
            await asyncio.sleep(0.1)
        return events / (time.perf_counter() - started)
    finally:
        await conn.close()
        service.stop()


# The catcher's files on tmpfs by default: on this project's machines (ext4 on a VM, mounted
# with discard) creating a file in a folder costs from 40 us to 900 us of kernel CPU, the
# most after files were deleted (each run deletes its own): the catcher then costs twice the
# dispatcher and the figure measures the disk. --mail-dir PATH measures on a disk.
MAIL_ON_TMPFS = Path("/dev/shm")


@contextlib.contextmanager
def _mail_folder(chosen: Path | None, workdir: Path) -> Iterator[Path]:
    if chosen is not None:
        yield chosen
        return
    if not MAIL_ON_TMPFS.is_dir():
        yield workdir / "mail"
        return
    folder = Path(tempfile.mkdtemp(prefix="loyalty-bench-mail-", dir=MAIL_ON_TMPFS))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheduled", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=20_000, help="0: the dispatch figures only")
    parser.add_argument("--workers", type=int, default=2, help="dispatch rounds at once (ENGAGEMENT_DISPATCH_WORKERS)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="SMTP sessions each round sends over at once (ENGAGEMENT_DISPATCH_CONCURRENCY, 8 by "
                             "default in the service; on a loaded machine a message waits for the scheduler at "
                             "each of its 4 round trips, and more sessions keep more in flight)")
    parser.add_argument("--mail-dir", type=Path, default=None,
                        help="where the catcher keeps its .eml files (default: a fresh folder in /dev/shm, else in "
                             "the run's folder; see MAIL_ON_TMPFS)")
    parser.add_argument("--catcher-processes", type=int, default=1,
                        help="mail catcher processes on the port (SO_REUSEPORT): the SMTP server, not the dispatcher, "
                             "would be what a single one measures")
    args = parser.parse_args()
    with infra(durable=False) as env, _mail_folder(args.mail_dir, env.workdir) as mail_dir:
        smtp_port = free_port()
        catcher = subprocess.Popen([sys.executable, "-m", "deploy.local.mailcatcher", "--dir",
                                    str(mail_dir), "--port", str(smtp_port),
                                    "--processes", str(args.catcher_processes)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            time.sleep(1)
            # Quiet hours off (start = end): the figure must not depend on the hour it runs at.
            settings = EngagementSettings(database_url=env.dsn(), smtp_port=smtp_port, quiet_start_hour=0,
                                          quiet_end_hour=0, dispatch_batch=500,
                                          dispatch_concurrency=args.concurrency,
                                          dispatch_workers=args.workers)
            await load(env.dsn(), settings, args.scheduled, args.due)
            rate, cpu_us = await dispatch_rate(env.dsn(), settings, args.due,
                                               {"postgres": env.pg.postmaster_pid(), "catcher": catcher.pid})
            print(f"dispatch: {args.due:,} messages to the local SMTP server at {rate:,.0f} messages/s "
                  f"({args.scheduled:,} scheduled, {args.workers} workers x {args.concurrency} SMTP sessions; "
                  f"mail kept in {mail_dir})")
            print("  CPU per message: " + ", ".join(f"{k} {v:,.0f} us" for k, v in cpu_us.items())
                  + f" (all {sum(cpu_us.values()):,.0f} us)")
            figures = {"scheduled": args.scheduled, "due": args.due, "dispatch_per_s": round(rate),
                       "cpu_us_per_message": {k: round(v) for k, v in cpu_us.items()}}
            if args.events:
                events_rate = await consumer_rate(env, args.events, smtp_port)
                print(f"consumer: {args.events:,} PointsEarned -> journey + timer at {events_rate:,.0f} events/s")
                figures.update(events=args.events, consumer_events_per_s=round(events_rate))
            print(json.dumps(figures))
        finally:
            stop_process_group(catcher.pid, timeout_s=5)


if __name__ == "__main__":
    import uvloop  # as the service runs (shared/http.py serve)
    uvloop.run(main())
