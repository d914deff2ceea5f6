"""Run a service as a real OS process for end-to-end and crash tests."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from deploy.local.infra import free_port

ROOT = Path(__file__).resolve().parents[2]


def listener_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on 127.0.0.1:`port` (or any address), from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
            found.add(inode)
    return found


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds the socket listening on `port`: a free port picked
    for it can be taken by another test's process first (four xdist workers start services
    at once), and that one would answer its readiness probe."""
    inodes = listener_inodes(port)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


class ServiceProcess:
    """`python -m services.<name>` with <NAME>_* settings from `base_env` plus extras."""

    def __init__(self, name: str, base_env: dict[str, str], extra: dict[str, str] | None = None,
                 log_dir: Path | None = None) -> None:
        self.name = name
        self.port = free_port()
        prefix = name.upper()
        self.env = {**os.environ, **{f"{prefix}_{k}": v for k, v in base_env.items()},
                    f"{prefix}_HTTP_PORT": str(self.port), **(extra or {})}
        self.log_path = (log_dir or Path("/tmp")) / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self._moves = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready_s: float = 60) -> "ServiceProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", f"services.{self.name}"], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + wait_ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if b"address already in use" in self.log_path.read_bytes().lower() and self._moves < 3:
                    self._moves += 1  # its port was taken before it bound it: another one
                    self.port = free_port()
                    self.env[f"{self.name.upper()}_HTTP_PORT"] = str(self.port)
                    return self.start(wait_ready_s=wait_ready_s)
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r:
                    if r.status == 200 and listens_on(self.proc.pid, self.port):
                        return self
            except Exception:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {wait_ready_s}s; log: {self.log_path}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
