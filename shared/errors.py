"""One notion of a transient error for every consumer and background job.

A transient error says nothing about the input: the database or the broker is away, two
transactions deadlocked, a lock could not be had in time. Such a failure is retried (with
backoff) for as long as it lasts and never sends an input to a dead-letter topic. Any other
exception is a data or code error: retried a bounded number of times, then isolated.
"""

import asyncio

import asyncpg


class TransientError(Exception):
    """Raised by a service for a condition of its own that will pass (e.g. its program
    history cannot be read yet): retried like a lost connection, never dead-lettered."""


_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TransientError,
    OSError,  # ConnectionError and socket errors
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # e.g. the connection was closed under us
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.LockNotAvailableError,
    asyncpg.QueryCanceledError,  # statement_timeout, or an operator's pg_cancel_backend
    asyncpg.AdminShutdownError,  # the server is restarting
    asyncpg.CrashShutdownError,
)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same input later can succeed without anyone changing anything."""
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    # aiokafka's retriable errors (a leader moved, the broker is away) carry this flag.
    return bool(getattr(exc, "retriable", False))
