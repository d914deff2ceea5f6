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
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r:
                    if r.status == 200:
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
