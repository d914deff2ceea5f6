"""A throw-away copy of this checkout for tests that drive `make` itself (make up, make run):
its own .run/, its own PostgreSQL data folder, so a developer's running stack is never
touched, and the processes it starts can be told apart from everyone else's.

The copy lives under a mode-700 temp folder, like a clone in root's home. Its .venv is a
symlink to the interpreter's venv (no install), and `make` is called with
`-o .venv/.installed` so that it never tries to reinstall into that shared venv.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]


def tracked_files() -> list[str]:
    """What a clone of the working tree holds (tracked and new files, uncommitted edits included)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def copy_checkout(parent: Path) -> Path:
    clone = parent / "loyalty"
    for rel in tracked_files():
        target = clone / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    (clone / ".venv").symlink_to(Path(sys.prefix).resolve())
    return clone


def make_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"))}
    env.pop("TOPIC_PARTITIONS", None)
    return {**env, **extra}


def pg_datadir(clone: Path) -> Path | None:
    try:
        return Path(json.loads((clone / ".run" / "state.json").read_text())["pg_datadir"])
    except (OSError, ValueError, KeyError):
        return None


def processes_of(clone: Path) -> dict[int, str]:
    """Every process working in the copy or in its PostgreSQL data folder (the broker, the
    services, make and the stack run in the copy; PostgreSQL in its data folder), by pid,
    with its command line."""
    places = [str(clone)] + ([str(d)] if (d := pg_datadir(clone)) else [])
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(cwd == p or cwd.startswith(p + "/") or p in cmdline for p in places):
            found[int(entry.name)] = cmdline
    return found


@contextmanager
def checkout() -> Iterator[Path]:
    """A copy of the checkout; afterwards, whatever the test did, its stack is stopped
    (make reset, then SIGKILL for anything of it still alive) and the copy removed."""
    parent = Path(tempfile.mkdtemp(prefix="loyalty-checkout-"))  # mode 700
    clone = copy_checkout(parent)
    try:
        yield clone
    finally:
        subprocess.run([*MAKE, "reset"], cwd=clone, env=make_env(), capture_output=True, timeout=180)
        for pid in processes_of(clone):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if (datadir := pg_datadir(clone)) is not None:
            shutil.rmtree(datadir, ignore_errors=True)
        shutil.rmtree(parent, ignore_errors=True)


def wait_for_output(fd: int, pattern: str, *, timeout_s: float) -> str:
    """Read from `fd` until `pattern` appears (AssertionError with the output if it does not)."""
    deadline = time.monotonic() + timeout_s
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: a pty whose other side is closed
            chunk = b""
        if not chunk:
            break
        seen += chunk.decode(errors="replace")
        if pattern in seen:
            return seen
    raise AssertionError(f"{pattern!r} not seen within {timeout_s}s; output so far:\n{seen[-4000:]}")
