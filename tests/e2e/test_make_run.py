"""`make run` and `make up` as a newcomer uses them, in a copy of the checkout under a
mode-700 folder (like a clone in root's home): whatever happens to the terminal or the
pipe, stopping `make run` stops everything it started; `make up`/`make down` work there
as root (PostgreSQL's tools run as the `postgres` user, who cannot enter that folder)."""

import json
import os
import pty
import signal
import subprocess
import urllib.request

import pytest

from tests.support.checkout import (
    MAKE,
    checkout,
    make_env,
    pg_datadir,
    processes_of,
    wait_for_output,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

# The third line of the summary: redemptions are flowing, the whole platform is up.
SUMMARY = "redemptions asked"
DEMO = {"DEMO_RATE": "20"}


def wait_stopped(proc: subprocess.Popen, timeout_s: float = 150) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"make run still running {timeout_s}s after the stop request") from None


def test_interrupting_make_run_through_a_pipe_stops_everything_it_started():
    with checkout() as clone:
        # Ctrl-C in a terminal: SIGINT to the whole foreground process group, `tee` included,
        # so every later write of `make run` meets a closed pipe.
        proc = subprocess.Popen(["bash", "-c", f"{' '.join(MAKE)} run 2>&1 | tee run.log"], cwd=clone,
                                env=make_env(**DEMO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_output(proc.stdout.fileno(), SUMMARY, timeout_s=180)
            assert pg_datadir(clone) is not None and len(processes_of(clone)) >= 6, processes_of(clone)
            os.killpg(proc.pid, signal.SIGINT)
            wait_stopped(proc)
        finally:
            proc.stdout.close()
        assert processes_of(clone) == {}
        assert not (clone / ".run" / "endpoints.env").exists()  # `make down` ran to its end
        assert "stopping" not in (clone / "run.log").read_text()  # tee was gone before it


def test_closing_the_terminal_of_make_run_stops_everything_it_started():
    with checkout() as clone:
        master, slave = pty.openpty()
        proc = subprocess.Popen([*MAKE, "run"], cwd=clone, env=make_env(**DEMO), stdin=slave, stdout=slave,
                                stderr=slave, start_new_session=True)
        os.close(slave)
        try:
            wait_for_output(master, SUMMARY, timeout_s=180)
            assert len(processes_of(clone)) >= 6, processes_of(clone)
        finally:
            # The terminal goes away: its output fails from now on (EIO), and the shell
            # passes SIGHUP on to its jobs.
            os.close(master)
        os.killpg(proc.pid, signal.SIGHUP)
        wait_stopped(proc)
        assert processes_of(clone) == {}
        assert not (clone / ".run" / "endpoints.env").exists()


def endpoints(clone) -> dict[str, str]:
    lines = (clone / ".run" / "endpoints.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def make(clone, *args: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*MAKE, *args], cwd=clone, env=make_env(**env), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_make_up_and_down_work_in_a_clone_under_a_mode_700_folder():
    with checkout() as clone:
        assert os.stat(clone.parent).st_mode & 0o777 == 0o700
        make(clone, "up")
        status = make(clone, "status").stdout
        assert "not ready" not in status and "ready" in status and "postgres   running" in status, status
        assert "database system is ready" in (clone / ".run" / "logs" / "postgres.log").read_text()
        first = endpoints(clone)
        urllib.request.urlopen(f"{first['PURCHASES_URL']}/healthz").close()
        for name in ("purchases", "ledger", "rewards"):  # one format, no per-request or expected noise
            for line in (clone / ".run" / "logs" / f"{name}.log").read_text().splitlines():
                entry = json.loads(line)
                assert entry["logger"] != "uvicorn.access" and "Auto create topics" not in entry["msg"], line
        make(clone, "down")
        assert processes_of(clone) == {}

        # the partition count is honoured when the broker starts again; the ports stay
        make(clone, "up", TOPIC_PARTITIONS="2")
        again = endpoints(clone)
        assert again["TOPIC_PARTITIONS"] == "2" and first["TOPIC_PARTITIONS"] == "4"
        assert {k: v for k, v in again.items() if k != "TOPIC_PARTITIONS"} == {
            k: v for k, v in first.items() if k != "TOPIC_PARTITIONS"}
        make(clone, "down")
        assert processes_of(clone) == {}
        # with nothing running, make status says so without failing
        after = make(clone, "status")
        assert "Error" not in after.stderr, after.stdout + after.stderr
