"""What every benchmark and fault-injection run needs: its own broker and PostgreSQL, the
services as real processes, topic helpers, a purchase generator and a progress line."""

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy.local.infra import PgCluster, free_port, pid_alive, start_broker, stop_process_group

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
