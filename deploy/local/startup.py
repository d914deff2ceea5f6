"""Waiting for the services `make up` started, and saying what they are doing meanwhile: a
service answers HTTP only once its migrations ran and its consumers joined their groups,
which takes seconds of silence otherwise."""

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from deploy.local.infra import pid_alive, port_open


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def wait_until_ready(ports: dict[str, int], logs: Path, pids: Path, log_offsets: dict[str, int], *,
                     timeout_s: float = 90, report_every_s: float = 4) -> None:
    """Wait for every service's /readyz (`ports`: service -> port), saying every few seconds
    what the slow ones are doing. SystemExit if one exits or is not ready in `timeout_s`."""
    started = last_report = time.monotonic()
    waiting = list(ports)
    while waiting:
        for name in list(waiting):
            if ready(ports[name]):
                waiting.remove(name)
                print(f"{name:<10} ready ({time.monotonic() - started:.0f}s)", flush=True)
            elif not (pid := _pid(pids / f"{name}.pid")) or not pid_alive(pid):
                raise SystemExit(f"{name} exited; see {logs / (name + '.log')}")
        now = time.monotonic()
        if waiting and now - started > timeout_s:
            raise SystemExit(f"{', '.join(waiting)} not ready after {timeout_s:.0f}s; see {logs}")
        if waiting and now - last_report >= report_every_s:
            last_report = now
            for name in waiting:
                doing = ("answering, not ready yet" if port_open(ports[name])
                         else "migrations, then its consumers join their groups (a few seconds each)")
                last = last_log(logs / f"{name}.log", log_offsets.get(name, 0))
                print(f"{name:<10} starting ({now - started:.0f}s): {doing}; last log: {last}", flush=True)
        time.sleep(0.2)


def _pid(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def last_log(path: Path, since: int, width: int = 60) -> str:
    """The message of the log's last line written after offset `since`, shortened."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "-"
    if not lines:
        return "-"
    try:
        message = str(json.loads(lines[-1]).get("msg", lines[-1]))
    except (ValueError, AttributeError):
        message = lines[-1]
    return message if len(message) <= width else message[: width - 3] + "..."
