"""What every benchmark and fault-injection run needs: its own broker and PostgreSQL, the
services as real processes, topic helpers, a purchase generator and a progress line."""

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy.local.infra import PgCluster, _as_pg_user, free_port, pg_bindir, pid_alive, start_broker, stop_process_group

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Infra:
    workdir: Path
    bootstrap: str
    broker: subprocess.Popen
    pg: PgCluster
    processes: list["Service"] = field(default_factory=list)

    def dsn(self, database: str = "loyalty") -> str:
        return self.pg.dsn(database)


@contextlib.contextmanager
def infra(*, durable: bool, keep: bool = False) -> Iterator[Infra]:
    """A broker and a PostgreSQL cluster of this run's own, on free ports; everything
    started is stopped on the way out (Ctrl-C included)."""
    workdir = Path(tempfile.mkdtemp(prefix="loyalty-bench-"))
    os.chmod(workdir, 0o755)
    broker_port = free_port()
    broker = start_broker(broker_port, log_path=workdir / "broker.log")
    pg = PgCluster(datadir=workdir / "pg", port=free_port(), log_path=workdir / "pg.log")
    env = Infra(workdir, f"127.0.0.1:{broker_port}", broker, pg)
    try:
        pg.init()
        pg.start(durable=durable)
        pg.create_database("loyalty")
        yield env
    finally:
        for service in reversed(env.processes):
            service.stop()
        stop_process_group(broker.pid, timeout_s=5)
        pg.stop(mode="immediate")
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


class Service:
    """`python -m services.<name>` with <NAME>_* settings."""

    def __init__(self, env: Infra, name: str, settings: dict[str, str]) -> None:
        self.infra, self.name = env, name
        self.port = free_port()
        prefix = name.upper()
        base = {
            "KAFKA_BOOTSTRAP_SERVERS": env.bootstrap, "DATABASE_URL": env.dsn(), "HTTP_PORT": str(self.port),
            "CONSUMER_SESSION_TIMEOUT_MS": "6000", "CONSUMER_HEARTBEAT_INTERVAL_MS": "1000", "LOG_LEVEL": "WARNING",
        }
        self.env = {**os.environ, **{f"{prefix}_{k}": v for k, v in {**base, **settings}.items()}}
        self.proc: subprocess.Popen | None = None
        self.log_path = env.workdir / f"{name}.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Service":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", f"services.{self.name}"], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.starts += 1
        if self not in self.infra.processes:
            self.infra.processes.append(self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and pid_alive(self.proc.pid)

    async def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log_path}")
            try:
                status = await asyncio.to_thread(_get_status, f"{self.url}/readyz")
                if status == 200:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout_s}s; see {self.log_path}")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process_group(self.proc.pid, timeout_s=20)


def _get_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in missing])
    finally:
        await admin.close()


def bulk_producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10, max_batch_size=1024 * 1024,
                            max_request_size=8 * 1024 * 1024)


async def produce_all(bootstrap: str, topic: str, messages, *, window: int = 20_000) -> float:
    """Produce (key, value) pairs as fast as the broker takes them; returns seconds taken."""
    producer = bulk_producer(bootstrap)
    await producer.start()
    started = time.perf_counter()
    try:
        futures = []
        for key, value in messages:
            futures.append(await producer.send(topic, value, key=key))
            if len(futures) >= window:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - started


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


_last_progress = [0.0]


def progress(text: str) -> None:
    """One self-overwriting status line, at most five updates a second."""
    now = time.monotonic()
    if now - _last_progress[0] < 0.2:
        return
    _last_progress[0] = now
    sys.stderr.write("\r\x1b[2K" + text)
    sys.stderr.flush()


def progress_done() -> None:
    sys.stderr.write("\n")
    sys.stderr.flush()


# ---- faults: pausing and restarting the infrastructure ----------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (found through /proc's parent pids), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name may contain spaces: the fields after its closing parenthesis.
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def signal_pids(pids: list[int], sig: signal.Signals) -> int:
    """Send `sig` to each pid that still exists; returns how many got it."""
    sent = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent += 1
        except ProcessLookupError:
            pass
    return sent


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime so far of the processes that are alive (a process gone counts 0)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def pg_processes(pg: PgCluster) -> list[int]:
    """The postmaster and every backend and auxiliary process it forked."""
    pid = pg.postmaster_pid()
    return process_tree(pid) if pid is not None else []


async def fetch_rows(dsn: str, sql: str) -> list:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


async def pg_backend_apps(dsn: str) -> dict[int, str]:
    """Each client backend's pid and application_name (a service's pool names itself
    loyalty-<schema>): PostgreSQL's CPU can then be told by the service it worked for."""
    rows = await fetch_rows(dsn, "SELECT pid, application_name FROM pg_stat_activity "
                                 "WHERE backend_type = 'client backend'")
    return {r["pid"]: r["application_name"] for r in rows}


@contextlib.asynccontextmanager
async def paused(pids: list[int]):
    """SIGSTOP `pids` for the duration of the block, SIGCONT on the way out (also on error).
    A process forked while the parent is stopped cannot exist: the stopped parent forks nothing."""
    signal_pids(pids, signal.SIGSTOP)
    try:
        yield len(pids)
    finally:
        signal_pids(pids, signal.SIGCONT)


def pg_restart(pg: PgCluster, *, mode: str = "fast") -> None:
    """pg_ctl restart: every connection is dropped and the cluster comes back with the same
    options (pg_ctl reuses postmaster.opts)."""
    subprocess.run(
        _as_pg_user([str(pg_bindir() / "pg_ctl"), "restart", "-w", "-t", "60", "-m", mode, "-D", str(pg.datadir),
                     "-l", str(pg.log_path)]),
        check=True, capture_output=True,
    )


# ---- consumer lag -------------------------------------------------------------------------------


async def fetched_ends(bootstrap: str, topic: str, starts: dict[int, int], *, timeout_s: float = 10) -> dict[int, int]:
    """The next offset to be written, per partition of `starts`, as a fetch from the offset
    given for it sees: the fetch response's high watermark, or the offset after the last
    record it returned if that is further. Never the broker's ListOffsets: the embedded broker
    (Tansu 0.6) lists a partition's end as its last record batch's base offset + 1, short by
    the rest of that batch, while a fetch's high watermark is the true end (measured: after a
    batch of 3 at offsets 1-3, ListOffsets 2, every fetch's high watermark 4, from any offset
    and also when the fetch returns nothing or only the first of several batches). A fetch
    is capped at 64 KiB per partition: cheap enough to poll. Raises TimeoutError if some
    partition got no fetch response in `timeout_s` (rather than guess)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=10,
                                max_partition_fetch_bytes=64 * 1024, fetch_max_bytes=1024 * 1024)
    await consumer.start()
    try:
        tps = {p: TopicPartition(topic, p) for p in starts}
        consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            consumer.seek(tp, max(starts[p], 0))
        seen = dict(starts)
        deadline = time.monotonic() + timeout_s
        while any(consumer.highwater(tp) is None for tp in tps.values()):
            if time.monotonic() > deadline:
                missing = [p for p, tp in tps.items() if consumer.highwater(tp) is None]
                raise TimeoutError(f"no fetch response for {topic} partitions {missing} in {timeout_s}s")
            for tp, records in (await consumer.getmany(timeout_ms=10, max_records=1000)).items():
                seen[tp.partition] = max(seen[tp.partition], records[-1].offset + 1)
        return {p: max(consumer.highwater(tp), seen[p]) for p, tp in tps.items()}
    finally:
        await consumer.stop()


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """The next offset to be written, per partition (fetched_ends from offset 0)."""
    return await fetched_ends(bootstrap, topic, {p: 0 for p in range(partitions)})


async def group_lag(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """Records of `topic` not yet committed by `group`, per partition: what a fetch from the
    group's committed offset (0 where it has none) sees past it (fetched_ends), so 0 only when
    that fetch came back empty with a high watermark at the committed offset. The listed
    (ListOffsets) end would show no lag while the rest of a multi-record batch is unconsumed.
    The partitions are named explicitly: the embedded broker lists a group's offsets only then.
    The one lag check of the tests (tests/support/ledger.py caught_up) and the benchmarks
    (bench.chaos)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        committed = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    done = {}
    for tp in tps:
        meta = committed.get(tp)
        done[tp.partition] = meta.offset if meta is not None and meta.offset >= 0 else 0
    ends = await fetched_ends(bootstrap, topic, done)
    return {p: max(ends[p] - done[p], 0) for p in done}


async def read_topic(bootstrap: str, topic: str, partitions: int) -> list:
    """Every record of `topic` from offset 0 up to its current end, as aiokafka records."""
    ends = await end_offsets(bootstrap, topic, partitions)
    records: list = []
    tps = [TopicPartition(topic, p) for p in range(partitions) if ends.get(p, 0) > 0]
    if not tps:
        return records
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        position = {tp.partition: 0 for tp in tps}
        while any(position[tp.partition] < ends[tp.partition] for tp in tps):
            batch = await consumer.getmany(timeout_ms=500, max_records=20_000)
            for tp, rs in batch.items():
                for r in rs:
                    if r.offset < ends[tp.partition]:
                        records.append(r)
                    position[tp.partition] = r.offset + 1
    finally:
        await consumer.stop()
    return records
