"""What keeps `make run` in charge of what it started, whatever happens to its terminal:
stop requests (Ctrl-C, SIGTERM, the terminal closing: SIGHUP) that never interrupt the
start of a process before its pid file is written, and an output that survives a closed
pipe or terminal (`make run | tee run.log` loses `tee` on Ctrl-C too)."""

import contextlib
import os
import signal
import sys

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequested(KeyboardInterrupt):
    """Raised in the main thread by a stop signal. A KeyboardInterrupt, so asyncio.run
    cancels the demo's tasks and unwinds like on Ctrl-C."""


class StopSignals:
    """Turns SIGINT, SIGTERM and SIGHUP into StopRequested, except inside `deferred()`,
    where the request waits for the block to end."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._depth = 0

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def ignore(self) -> None:
        """While stopping: a second Ctrl-C (or the terminal closing) must not cut clean-up short."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _on_signal(self, signum: int, frame) -> None:
        self.requested = self.requested or signum
        if self._depth == 0:
            raise StopRequested(signal.Signals(signum).name)

    @contextlib.contextmanager
    def deferred(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self.requested is not None:
            raise StopRequested(signal.Signals(self.requested).name)


class SurvivingStream:
    """A text stream over stdout/stderr that, once its reader is gone (EPIPE from a killed
    `tee`, EIO from a closed terminal), sends the rest to /dev/null instead of raising in
    the middle of clean-up. The file descriptor itself is pointed at /dev/null, so the
    interpreter's final flush and any child writing to it are silent too."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.lost = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            self._lose()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self._lose()

    def _lose(self) -> None:
        self.lost = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(devnull)

    def isatty(self) -> bool:
        try:
            return not self.lost and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_lost_output() -> None:
    if not isinstance(sys.stdout, SurvivingStream):
        sys.stdout = SurvivingStream(sys.stdout)
    if not isinstance(sys.stderr, SurvivingStream):
        sys.stderr = SurvivingStream(sys.stderr)
