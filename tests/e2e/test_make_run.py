"""`make run` and `make up` as a newcomer uses them, in a copy of the checkout under a
mode-700 folder (like a clone in root's home): whatever happens to the terminal or the
pipe, stopping `make run` stops everything it started; `make up`/`make down` work there
as root (PostgreSQL's tools run as the `postgres` user, who cannot enter that folder)."""

import os
import pty
import signal
import subprocess

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


def test_make_up_and_down_work_in_a_clone_under_a_mode_700_folder():
    with checkout() as clone:
        assert os.stat(clone.parent).st_mode & 0o777 == 0o700
        up = subprocess.run([*MAKE, "up"], cwd=clone, env=make_env(), capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        status = subprocess.run([*MAKE, "status"], cwd=clone, env=make_env(), capture_output=True, text=True)
        assert status.returncode == 0 and "not ready" not in status.stdout, status.stdout + status.stderr
        assert "ready" in status.stdout and "postgres   running" in status.stdout, status.stdout
        assert "database system is ready" in (clone / ".run" / "logs" / "postgres.log").read_text()
        down = subprocess.run([*MAKE, "down"], cwd=clone, env=make_env(), capture_output=True, text=True, timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        assert processes_of(clone) == {}
        # with nothing running, make status says so without failing
        after = subprocess.run([*MAKE, "status"], cwd=clone, env=make_env(), capture_output=True, text=True)
        assert after.returncode == 0 and "Error" not in after.stderr, after.stdout + after.stderr
