"""Throughput of the purchases service's Kafka door, end to end and on its own infrastructure.

    python -m bench.purchases_ingest [--events N] [--partitions P] [--batch-max B]
                                     [--durable] [--profile FILE] [--return-park-s S]

Starts a private Tansu broker and PostgreSQL cluster on free ports, pre-produces N realistic
inputs to purchases.raw (sales; ~5% partial returns of earlier sales; ~2% exact resends;
~0.5% bad inputs), then starts `python -m services.purchases` as a subprocess and measures
how fast the service accounts for all of them (recorded + duplicate + rejected, from its own
/metrics) and how long until purchases.recorded and purchases.dlq hold every expected event
(outbox relay included). Prints a progress line, a table and one JSON line of figures, and
stops everything it started, also on Ctrl-C or SIGTERM.

PostgreSQL runs with fsync and synchronous_commit off unless --durable is given (as the
test suite does): the figures then show the service's CPU cost, not the disk's.
Returns of sales that never come are parked by the service for PURCHASES_RETURN_PARK_S
before they are dead-lettered; the bench sets it to 5 s (--return-park-s).

On a shared machine the wall-clock rate mostly says how busy the machine is. The bench
therefore also reports the service's CPU time per input and how long it sat runnable
waiting for a CPU (from /proc): 1e6 / (CPU us per input) is what one process can do on a
core of its own.
With --profile FILE, py-spy samples the service process while it ingests and the bench
prints the hottest functions; FILE gets py-spy's collapsed stacks (flamegraph input).
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from deploy.local.infra import PgCluster, free_port, pid_alive, start_broker, stop_process_group, wait_for_port
from shared.settings import ServiceSettings
from shared.topics import PURCHASES_DLQ, PURCHASES_RAW, PURCHASES_RECORDED, ensure_topics

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "bench."
CENT = Decimal("0.01")
RECENT = 20_000
CATEGORIES = ("grocery", "dairy", "bakery", "wine", "household", "toys", "electronics", "clothing")


# ---- the workload -------------------------------------------------------------------------


@dataclass
class Workload:
    """Inputs in production order, with their Kafka keys, and what the service must make of them."""

    records: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, value)
    expected: Counter = field(default_factory=Counter)  # sale, return, duplicate, rejected


def _line(rng: random.Random, n: int) -> dict:
    quantity = rng.choice((1, 1, 1, 2, 2, 3, 4))
    unit_price = Decimal(rng.randint(49, 25_000)) * CENT
    discount = (unit_price * quantity * Decimal(rng.choice((0, 0, 0, 5, 10, 20))) / 100).quantize(CENT)
    return {"line_id": f"l{n}", "sku": f"sku-{rng.randint(1, 5000):05d}", "category": rng.choice(CATEGORIES),
            "quantity": quantity, "unit_price": format(unit_price, "f"), "discount": format(discount, "f")}


def _total(lines: list[dict]) -> str:
    return format(sum((Decimal(x["unit_price"]) * x["quantity"] - Decimal(x["discount"]) for x in lines),
                      Decimal("0")), "f")


def _bad_input(rng: random.Random, good: dict) -> tuple[bytes, bool]:
    """One of the ways real inputs go wrong; each must end on the dead-letter topic. Returns
    (value, parked): a return whose sale never comes is parked first, dead-lettered later."""
    kind = rng.randrange(6)
    if kind == 0:
        return json.dumps(good).encode()[: rng.randint(5, 60)], False  # truncated
    if kind == 1:
        return json.dumps({k: v for k, v in good.items() if k != "store_id"}).encode(), False
    if kind == 2:
        return json.dumps({**good, "total": "0.01"}).encode(), False
    if kind == 3:
        return json.dumps({**good, "currency": "XYZ"}).encode(), False
    if kind == 4:
        never_sold = {**good, "type": "return", "original_purchase_id": f"never-sold-{rng.getrandbits(64):x}"}
        return json.dumps(never_sold).encode(), True
    return b"\x00\xffnot json at all", False


def build_workload(n: int, *, seed: int = 7, stores: int = 60, customers: int = 20_000) -> Workload:
    """Keyed by store_id, as a POS back-end would produce: a store's sales and returns stay in
    order on one partition, so a return never overtakes its sale."""
    rng = random.Random(seed)
    w = Workload()
    now = datetime.now(timezone.utc)
    start = now - timedelta(days=20)
    step = timedelta(days=19) / max(n, 1)
    recent_sales: list[dict] = []  # a ring of the last RECENT sales: returns are of recent sales
    returned: dict[str, dict[str, int]] = {}
    sent_ok: list[tuple[bytes, bytes]] = []
    for i in range(n):
        occurred_at = (start + step * i).isoformat()
        roll = rng.random()
        if roll < 0.005 and recent_sales:
            original = rng.choice(recent_sales)
            value, parked = _bad_input(rng, {**original, "purchase_id": f"bad-{i}"})
            w.records.append((original["store_id"].encode(), value))
            w.expected["rejected"] += 1
            w.expected["parked"] += parked
            continue
        if roll < 0.025 and sent_ok:
            w.records.append(sent_ok[rng.randrange(max(0, len(sent_ok) - 5000), len(sent_ok))])  # a till resending
            w.expected["duplicate"] += 1
            continue
        if roll < 0.075 and recent_sales:
            sale = rng.choice(recent_sales)
            left = {x["line_id"]: x["quantity"] - returned[sale["purchase_id"]].get(x["line_id"], 0)
                    for x in sale["lines"]}
            lines = []
            for x in sale["lines"]:
                if left[x["line_id"]] > 0 and rng.random() < 0.6:
                    q = rng.randint(1, left[x["line_id"]])
                    discount = (Decimal(x["discount"]) * q / x["quantity"]).quantize(CENT)
                    lines.append({**x, "quantity": q, "discount": format(discount, "f")})
            if lines:
                for x in lines:
                    returned[sale["purchase_id"]][x["line_id"]] = returned[sale["purchase_id"]].get(x["line_id"], 0) + x["quantity"]
                purchase = {**sale, "purchase_id": f"r-{i:08d}", "type": "return",
                            "original_purchase_id": sale["purchase_id"], "occurred_at": occurred_at,
                            "lines": lines, "total": _total(lines)}
                record = (sale["store_id"].encode(), json.dumps(purchase).encode())
                w.records.append(record)
                sent_ok.append(record)
                w.expected["return"] += 1
                continue
        lines = [_line(rng, k) for k in range(rng.choice((1, 1, 2, 2, 3, 4, 6)))]
        store = f"store-{rng.randrange(stores):03d}"
        sale = {"purchase_id": f"s-{i:08d}", "type": "sale", "original_purchase_id": None,
                "source": "pos" if rng.random() < 0.85 else "eshop", "store_id": store,
                "customer_id": f"c-{rng.randrange(customers):06d}" if rng.random() < 0.8 else None,
                "occurred_at": occurred_at, "currency": "PLN", "lines": lines, "total": _total(lines)}
        record = (store.encode(), json.dumps(sale).encode())
        w.records.append(record)
        sent_ok.append(record)
        if len(recent_sales) < RECENT:
            recent_sales.append(sale)
        else:
            recent_sales[i % RECENT] = sale
        returned[sale["purchase_id"]] = {}
        w.expected["sale"] += 1
    return w


async def produce_all(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024)
    await producer.start()
    started = time.perf_counter()
    try:
        for chunk in range(0, len(records), 20_000):
            futures = [await producer.send(topic, value, key=key) for key, value in records[chunk:chunk + 20_000]]
            await asyncio.gather(*futures)
            progress(f"pre-producing {min(chunk + 20_000, len(records)):,}/{len(records):,}")
    finally:
        await producer.stop()
    return time.perf_counter() - started


# ---- observing the service ----------------------------------------------------------------


async def scrape(client: httpx.AsyncClient, url: str) -> Counter | None:
    """The service's own counters: inputs received, recorded per type, duplicates, rejected.
    None while the service does not answer yet."""
    c: Counter = Counter()
    try:
        response = await client.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    text = response.text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "purchases_received_total":
                c["received"] += s.value
            elif s.name == "purchases_recorded_total":
                c[s.labels.get("type", "?")] += s.value
            elif s.name == "purchases_duplicates_total":
                c["duplicate"] += s.value
            elif s.name == "purchases_rejected_total":
                c["rejected"] += s.value
                c[f"rejected:{s.labels.get('reason')}"] += s.value
            elif s.name == "purchases_returns_parked_total":
                c["parked"] += s.value
            elif s.name == "outbox_published_total":
                c[f"outbox_published:{s.labels.get('topic', '').removeprefix(PREFIX)}"] += s.value
    return c


class TopicReader:
    """Reads topics from the beginning while the bench runs and counts messages and distinct
    ids. (The broker's end offsets are no substitute: the embedded broker reports them short
    of what a consumer actually reads.)"""

    def __init__(self, bootstrap: str, id_fields: dict[str, str]) -> None:
        self._bootstrap = bootstrap
        self._id_fields = id_fields
        self.messages: Counter = Counter()
        self.ids: dict[str, set[str]] = {t: set() for t in id_fields}
        self.kinds: dict[str, Counter] = {t: Counter() for t in id_fields}
        self._task: asyncio.Task | None = None

    def distinct(self, topic: str) -> int:
        return len(self.ids[topic])

    def summary(self, topic: str) -> dict[str, int]:
        return {"messages": self.messages[topic], "distinct": self.distinct(topic),
                **{f"of:{k}": v for k, v in sorted(self.kinds[topic].items())}}

    async def __aenter__(self) -> "TopicReader":
        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None, enable_auto_commit=False,
                                    max_partition_fetch_bytes=8 * 1024 * 1024)
        await consumer.start()
        await consumer.topics()
        tps = [TopicPartition(t, p) for t in self._id_fields for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._read(consumer))
        return self

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                for tp, records in (await consumer.getmany(timeout_ms=200, max_records=20_000)).items():
                    field_name, ids, kinds = self._id_fields[tp.topic], self.ids[tp.topic], self.kinds[tp.topic]
                    for r in records:
                        value = json.loads(r.value)
                        ids.add(value[field_name])
                        kinds[value.get("type") or value.get("reason")] += 1
                    self.messages[tp.topic] += len(records)
        finally:
            await consumer.stop()

    async def settle(self, quiet_s: float = 1.0) -> None:
        """Wait until nothing new has arrived for quiet_s."""
        last = -1
        while sum(self.messages.values()) != last:
            last = sum(self.messages.values())
            await asyncio.sleep(quiet_s)

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def runqueue_wait_seconds(pid: int) -> float:
    """Time the process's threads were ready to run but waited for a CPU (schedstat): on a
    shared machine this tells a slow service from a busy machine."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


_last_progress_line = 0.0


def progress(text: str) -> None:
    """One live line on a terminal; into a log file, a line every few seconds."""
    global _last_progress_line
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[2K" + text)
    elif time.monotonic() - _last_progress_line >= 2:
        _last_progress_line = time.monotonic()
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


# ---- the run ------------------------------------------------------------------------------


@dataclass
class Infra:
    """Everything this bench started, so that it can all be stopped whatever happens."""

    workdir: Path
    broker: subprocess.Popen | None = None
    cluster: PgCluster | None = None
    service: subprocess.Popen | None = None
    profiler: subprocess.Popen | None = None

    def stop(self) -> None:
        for proc in (self.profiler, self.service, self.broker):
            if proc is not None and pid_alive(proc.pid):
                stop_process_group(proc.pid, timeout_s=20)
        if self.cluster is not None:
            self.cluster.stop(mode="immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_service(infra: Infra, *, bootstrap: str, dsn: str, http_port: int, args: argparse.Namespace) -> None:
    # The project first; an outer PYTHONPATH is kept (e.g. a sitecustomize that tries a patch).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update({
        "PURCHASES_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "PURCHASES_DATABASE_URL": dsn,
        "PURCHASES_HTTP_PORT": str(http_port),
        "PURCHASES_TOPIC_PREFIX": PREFIX,
        "PURCHASES_TOPIC_PARTITIONS": str(args.partitions),
        "PURCHASES_CONSUMER_GROUP_PREFIX": f"bench-{uuid.uuid4().hex[:6]}",
        "PURCHASES_LOG_LEVEL": "WARNING",
    })
    if args.batch_max:
        env["PURCHASES_CONSUMER_BATCH_MAX_RECORDS"] = str(args.batch_max)
    if args.return_park_s is not None:
        env["PURCHASES_RETURN_PARK_S"] = str(args.return_park_s)
    log = open(infra.workdir / "service.log", "ab")
    infra.service = subprocess.Popen([sys.executable, "-m", "services.purchases"], cwd=ROOT, env=env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)


def py_spy_path() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def start_profiler(infra: Infra, out: Path) -> None:
    py_spy = py_spy_path()
    assert py_spy is not None
    assert infra.service is not None
    infra.profiler = subprocess.Popen(
        [py_spy, "record", "--pid", str(infra.service.pid), "--rate", "97", "--nonblocking", "--format", "raw",
         "--output", str(out)],
        stdout=open(infra.workdir / "py-spy.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_profiler(infra: Infra) -> None:
    if infra.profiler is None or infra.profiler.poll() is not None:
        return
    os.killpg(infra.profiler.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        infra.profiler.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stop_process_group(infra.profiler.pid)


async def measure(infra: Infra, *, bootstrap: str, dsn: str, workload: Workload, args: argparse.Namespace) -> dict:
    settings = ServiceSettings(kafka_bootstrap_servers=bootstrap, topic_prefix=PREFIX, topic_partitions=args.partitions)
    await ensure_topics(settings, (PURCHASES_RAW, PURCHASES_RECORDED, PURCHASES_DLQ))
    n = len(workload.records)
    produce_s = await produce_all(bootstrap, settings.topic(PURCHASES_RAW), workload.records)
    progress(f"pre-produced {n:,} inputs in {produce_s:.1f}s ({n / produce_s:,.0f}/s)")
    sys.stderr.write("\n")

    expected_recorded = workload.expected["sale"] + workload.expected["return"]
    expected_dlq = workload.expected["rejected"]
    recorded_topic, dlq_topic = settings.topic(PURCHASES_RECORDED), settings.topic(PURCHASES_DLQ)
    http_port = free_port()
    metrics_url = f"http://127.0.0.1:{http_port}/metrics"

    reader = TopicReader(bootstrap, {recorded_topic: "event_id", dlq_topic: "dead_letter_id"})
    async with reader:
        t_start = time.perf_counter()
        start_service(infra, bootstrap=bootstrap, dsn=dsn, http_port=http_port, args=args)
        assert infra.service is not None and infra.broker is not None and infra.cluster is not None
        cluster = infra.cluster
        pg_pids = lambda: children_of(cluster.postmaster_pid() or -1)  # noqa: E731
        cpu0 = {"service": cpu_seconds([infra.service.pid]), "broker": cpu_seconds([infra.broker.pid])}
        waits: dict[str, float] = {}  # the service's run-queue wait when it took its first and last input
        pg_cpu0 = {pid: cpu_seconds([pid]) for pid in pg_pids()}
        t: dict[str, float] = {}  # ready, first, inputs, recorded, dlq: when each was first seen
        counts: Counter = Counter()
        sizes: dict[str, int] = {}
        timeline: list[tuple[float, int]] = []
        last_marker, last_change, stalled = None, 0.0, False
        async with httpx.AsyncClient() as client:
            while True:
                await asyncio.sleep(0.25)
                now = time.perf_counter()
                if infra.service.poll() is not None:
                    raise RuntimeError(f"the service exited with {infra.service.returncode}")
                if now - t_start > args.timeout_s:
                    raise TimeoutError(f"not done after {args.timeout_s}s: {dict(counts)} {sizes}")
                scraped = await scrape(client, metrics_url)
                if scraped is None:
                    progress(f"  t={now - t_start:6.1f}s  waiting for the service to answer ...")
                    continue
                counts = scraped
                if "ready" not in t:
                    t["ready"] = now
                    if args.profile:
                        start_profiler(infra, Path(args.profile))
                if "first" not in t and counts["received"] > 0:
                    t["first"] = now
                    waits["first"] = runqueue_wait_seconds(infra.service.pid)
                    cpu0["service_at_first"] = cpu_seconds([infra.service.pid])
                if "inputs" not in t and counts["received"] >= n:
                    t["inputs"] = now
                    waits["inputs"] = runqueue_wait_seconds(infra.service.pid)
                    cpu0["service_at_inputs"] = cpu_seconds([infra.service.pid])
                    if args.profile:
                        stop_profiler(infra)
                sizes = {topic: reader.distinct(topic) for topic in (recorded_topic, dlq_topic)}
                timeline.append((now - t_start, int(counts["received"])))
                if "recorded" not in t and "inputs" in t and sizes.get(recorded_topic, 0) >= expected_recorded:
                    t["recorded"] = now
                if "dlq" not in t and "inputs" in t and sizes.get(dlq_topic, 0) >= expected_dlq:
                    t["dlq"] = now
                progress(f"  t={now - t_start:6.1f}s  processed {int(counts['received']):>9,}/{n:,} "
                         f"({counts['received'] / n:6.1%})  {_recent_rate(timeline):>8,.0f} in/s  "
                         f"recorded topic {sizes.get(recorded_topic, 0):>9,}/{expected_recorded:,}  "
                         f"dlq {sizes.get(dlq_topic, 0):,}/{expected_dlq:,}  parked {int(counts['parked']):,}")
                if "recorded" in t and "dlq" in t:
                    break
                if "inputs" in t:
                    marker = (sizes.get(recorded_topic, 0), sizes.get(dlq_topic, 0), counts["rejected"])
                    if marker != last_marker:
                        last_marker, last_change = marker, now
                    elif now - last_change > args.stall_s:
                        # Every input was processed but nothing moves short of the expected
                        # counts: report what is there instead of waiting forever.
                        sys.stderr.write(f"\nstalled: nothing changed for {args.stall_s:.0f}s after the last input\n")
                        stalled = True
                        break
        sys.stderr.write("\n")
        cpu = {"service": cpu_seconds([infra.service.pid]) - cpu0["service"],
               "broker": cpu_seconds([infra.broker.pid]) - cpu0["broker"],
               "postgres": sum(cpu_seconds([pid]) - pg_cpu0.get(pid, 0.0) for pid in pg_pids())}
        await reader.settle()  # anything published late (a duplicate) is counted too
        audit = {"recorded": reader.summary(recorded_topic), "dlq": reader.summary(dlq_topic)}
    rows = await count_rows(dsn)

    def since_first(key: str) -> float | None:
        return round(t[key] - t["first"], 2) if key in t else None

    busy_s = t["inputs"] - t["first"]
    return {
        "bench": "purchases_ingest",
        "events": n,
        "partitions": args.partitions,
        "batch_max": args.batch_max or ServiceSettings().consumer_batch_max_records,
        "return_park_s": args.return_park_s,
        "durable_postgres": args.durable,
        "stalled": stalled,
        "produce_s": round(produce_s, 2),
        "startup_s": round(t["first"] - t_start, 2),
        "ingest_s": round(busy_s, 2),
        "ingest_events_per_s": round(n / busy_s) if busy_s > 0 else None,
        "ingest_from_start_events_per_s": round(n / (t["inputs"] - t_start)),
        "peak_events_per_s": round(max(_rates(timeline), default=0)),
        "recorded_published_s": since_first("recorded"),
        "recorded_published_events_per_s": round(n / (t["recorded"] - t["first"])) if "recorded" in t else None,
        "dlq_complete_s": since_first("dlq"),
        "expected": dict(workload.expected),
        "counted": {k: int(v) for k, v in sorted(counts.items())},
        "audit": audit,
        "db_rows": rows,
        "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        # While ingesting (first to last input): the service's own CPU per input, and how long
        # it was runnable but waiting for a CPU taken by other processes.
        "service_cpu_us_per_input": round((cpu0["service_at_inputs"] - cpu0["service_at_first"]) / n * 1e6),
        "service_cpu_share_while_ingesting": round((cpu0["service_at_inputs"] - cpu0["service_at_first"]) / busy_s, 2),
        "service_runqueue_wait_s": round(waits["inputs"] - waits["first"], 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "poll_resolution_s": 0.25,
    }


def _rates(timeline: list[tuple[float, int]], window: int = 4) -> list[float]:
    return [(timeline[i][1] - timeline[i - window][1]) / (timeline[i][0] - timeline[i - window][0])
            for i in range(window, len(timeline))]


def _recent_rate(timeline: list[tuple[float, int]]) -> float:
    rates = _rates(timeline[-5:])
    return rates[-1] if rates else 0.0


async def count_rows(dsn: str) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT type, count(*) AS n FROM purchases.purchases GROUP BY type")
        out = {r["type"]: r["n"] for r in rows}
        out["outbox_left"] = await conn.fetchval("SELECT count(*) FROM purchases.outbox")
        return out
    finally:
        await conn.close()


# ---- reporting ----------------------------------------------------------------------------


def check(figures: dict, workload: Workload) -> list[str]:
    """Everything accounted for, exactly: the figures mean nothing otherwise."""
    e, c, audit = workload.expected, figures["counted"], figures["audit"]
    problems = []
    for name in ("sale", "return", "duplicate", "rejected", "parked"):
        if c.get(name, 0) != e[name]:
            problems.append(f"{name}: expected {e[name]:,}, the service counted {c.get(name, 0):,}")
    expected_recorded = e["sale"] + e["return"]
    if audit["recorded"]["distinct"] != expected_recorded:
        problems.append(f"purchases.recorded holds {audit['recorded']['distinct']:,} distinct events "
                        f"({audit['recorded']['messages']:,} messages), expected {expected_recorded:,}")
    if audit["dlq"]["distinct"] != e["rejected"]:
        problems.append(f"purchases.dlq holds {audit['dlq']['distinct']:,} distinct dead letters, "
                        f"expected {e['rejected']:,}")
    published = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("outbox_published:")}
    if published.get(PURCHASES_RECORDED, 0) != audit["recorded"]["messages"]:
        problems.append(f"the relay says it published {published.get(PURCHASES_RECORDED, 0):,} to purchases.recorded, "
                        f"the topic holds {audit['recorded']['messages']:,}")
    if figures["db_rows"].get("sale", 0) != e["sale"] or figures["db_rows"].get("return", 0) != e["return"]:
        problems.append(f"database rows {figures['db_rows']} do not match")
    if figures["db_rows"].get("outbox_left", 0):
        problems.append(f"{figures['db_rows']['outbox_left']:,} rows left in the outbox")
    return problems


def print_table(f: dict, problems: list[str]) -> None:
    e = f["expected"]
    rows = [
        ("inputs", f"{f['events']:,}  (sales {e.get('sale', 0):,}, returns {e.get('return', 0):,}, "
                   f"duplicates {e.get('duplicate', 0):,}, bad {e.get('rejected', 0):,} "
                   f"of which {e.get('parked', 0):,} returns of unknown sales)"),
        ("partitions / batch max", f"{f['partitions']} / {f['batch_max']}"),
        ("PostgreSQL", "durable (fsync on)" if f["durable_postgres"] else "fsync=off, synchronous_commit=off"),
        ("pre-produce", f"{f['produce_s']:.1f} s"),
        ("service start to first input", f"{f['startup_s']:.1f} s"),
        ("ingest (first to last input)", f"{f['ingest_s']:.1f} s  ->  {f['ingest_events_per_s']:,} inputs/s"),
        ("  from process start", f"{f['ingest_from_start_events_per_s']:,} inputs/s"),
        ("  peak (1 s window)", f"{f['peak_events_per_s']:,} inputs/s"),
        ("purchases.recorded complete", f"{f['recorded_published_s']:.1f} s after the first input  ->  "
                                        f"{f['recorded_published_events_per_s']:,} inputs/s"
                                        if f["recorded_published_s"] is not None else "NEVER (stalled)"),
        ("purchases.dlq complete", f"{f['dlq_complete_s']:.1f} s after the first input (parked returns wait "
                                   f"{f['return_park_s']} s)" if f["dlq_complete_s"] is not None else "NEVER (stalled)"),
        ("topics (read back)", f"recorded {f['audit']['recorded']['messages']:,} messages / "
                               f"{f['audit']['recorded']['distinct']:,} distinct, dlq {f['audit']['dlq']['messages']:,} / "
                               f"{f['audit']['dlq']['distinct']:,}"),
        ("CPU seconds (whole run)", ", ".join(f"{k} {v}" for k, v in f["cpu_s"].items())),
        ("service while ingesting", f"{f['service_cpu_us_per_input']} us CPU per input, on a CPU "
                                    f"{f['service_cpu_share_while_ingesting']:.0%} of the time, waited "
                                    f"{f['service_runqueue_wait_s']} s for one (load average {f['load_average_1m']})"),
        ("check", "all inputs accounted for exactly" if not problems else "FAILED: " + "; ".join(problems)),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print("purchases ingest benchmark")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def summarise_profile(path: Path, top: int = 25) -> None:
    """Top functions by own samples and by inclusive samples, from py-spy's collapsed stacks."""
    if not path.exists():
        print(f"(no profile written to {path})")
        return
    own: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_short(fr) for fr in stack.split(";")]
        own[frames[-1]] += n
        for fr in set(frames):
            inclusive[fr] += n
    print(f"\nprofile of the service while ingesting: {total:,} samples ({path})")
    print("  own time:")
    for fr, n in own.most_common(top):
        print(f"    {n / total:6.1%}  {fr}")
    print("  inclusive time (project code and the libraries it calls):")
    shown = 0
    for fr, n in inclusive.most_common():
        if any(s in fr for s in ("services/", "shared/", "asyncpg", "pydantic", "aiokafka", "faststream", "json")):
            print(f"    {n / total:6.1%}  {fr}")
            shown += 1
            if shown >= top:
                break


def _short(frame: str) -> str:
    # py-spy frames look like "function (path/to/module.py:123)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    where = where.rsplit(":", 1)[0]
    return f"{name} ({where})"


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.purchases_ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000, help="inputs to pre-produce (default 200,000)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the purchases topics (default 4)")
    p.add_argument("--batch-max", type=int, default=None,
                   help="PURCHASES_CONSUMER_BATCH_MAX_RECORDS (default: the service's own default)")
    p.add_argument("--return-park-s", type=int, default=5,
                   help="PURCHASES_RETURN_PARK_S: how long a return waits for its sale before it is "
                        "dead-lettered (default 5, so the bench need not wait the service's 600)")
    p.add_argument("--durable", action="store_true", help="run PostgreSQL with fsync and synchronous_commit on")
    p.add_argument("--profile", metavar="FILE", help="sample the service with py-spy; collapsed stacks to FILE")
    p.add_argument("--timeout-s", type=float, default=900, help="give up after this long (default 900)")
    p.add_argument("--stall-s", type=float, default=60,
                   help="stop waiting when the topics stop growing this long after the last input (default 60)")
    p.add_argument("--seed", type=int, default=7)
    return p.parse_args(argv)


def _terminate(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile and py_spy_path() is None:
        sys.exit("--profile needs py-spy: .venv/bin/pip install py-spy")
    # Both, explicitly: a shell starting us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="loyalty-bench-purchases-ingest-"))
    os.chmod(workdir, 0o755)  # PostgreSQL runs as another user when we are root
    infra = Infra(workdir=workdir)
    try:
        progress(f"building {args.events:,} inputs ...")
        workload = build_workload(args.events, seed=args.seed)
        broker_port = free_port()
        infra.broker = start_broker(broker_port, log_path=workdir / "broker.log")
        bootstrap = f"127.0.0.1:{broker_port}"
        infra.cluster = PgCluster(datadir=workdir / "pg", port=free_port(), log_path=workdir / "pg.log")
        infra.cluster.init()
        infra.cluster.start(durable=args.durable)
        wait_for_port(infra.cluster.port, timeout_s=30)
        infra.cluster.create_database("bench")
        dsn = infra.cluster.dsn("bench")
        figures = asyncio.run(measure(infra, bootstrap=bootstrap, dsn=dsn, workload=workload, args=args))
        problems = check(figures, workload)
        figures["ok"] = not problems
        if args.profile:
            stop_profiler(infra)
        print_table(figures, problems)
        if args.profile:
            summarise_profile(Path(args.profile))
        print(json.dumps(figures, sort_keys=True))
        if problems:
            kept = Path(tempfile.gettempdir()) / f"purchases-ingest-service-{int(time.time())}.log"
            shutil.copy(workdir / "service.log", kept)
            print(f"the service's log is kept in {kept}", file=sys.stderr)
        return 0 if not problems else 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted; stopping everything this bench started\n")
        return 130
    finally:
        # A second Ctrl-C must not abandon the clean-up half way.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if infra.service is not None and infra.service.poll() is not None and infra.service.returncode not in (0, -15):
            sys.stderr.write((workdir / "service.log").read_text()[-3000:])
        infra.stop()


if __name__ == "__main__":
    sys.exit(main())
