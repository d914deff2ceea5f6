"""One helper for background jobs that run every so often (schedulers, gauges, sweeps)."""

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from shared.errors import is_transient

log = logging.getLogger(__name__)


async def every(interval_s: float, name: str, job: Callable[[], Awaitable[object]], *,
                jitter: float = 0.1, first_delay_s: float | None = None) -> None:
    """Run `job` forever, about `interval_s` apart (a random +-`jitter` share, so that several
    instances do not fire in step). A failed round is logged (a transient failure as a
    warning) and the job runs again at the next interval; cancellation stops it."""
    if first_delay_s:
        await asyncio.sleep(first_delay_s)
    while True:
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a background round must not end the loop
            if is_transient(exc):
                log.warning("%s failed on a transient error; retrying at the next interval", name,
                            extra={"error": repr(exc)})
            else:
                log.exception("%s failed; retrying at the next interval", name)
        await asyncio.sleep(interval_s * (1 + random.uniform(-jitter, jitter)))
