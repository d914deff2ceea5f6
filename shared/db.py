"""PostgreSQL plumbing: a pool bound to the service's schema, and the migration runner."""

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

SHARED_MIGRATIONS = Path(__file__).parent / "migrations"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset query when a connection goes back to the pool: one round trip less per use.
    Safe because the services never leave session state behind (no SET or LISTEN; the relay's
    lock is transaction-scoped; the one session-level advisory lock, churn's evaluation lock,
    is released before release, and its connection terminated if that fails)."""


async def create_pool(dsn: str, *, schema: str, min_size: int = 1, max_size: int = 8) -> asyncpg.Pool:
    """A pool whose connections resolve unqualified names in the service's own schema."""
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"search_path": schema, "application_name": f"loyalty-{schema}"},
        reset=_keep_session,
    )


@contextlib.asynccontextmanager
async def transaction(conn: asyncpg.Connection, *, opening: str = "") -> AsyncIterator[None]:
    """A transaction begun together with `opening` (a lock to hold until the end) in one
    round trip; committed on the way out, rolled back on an error. Two statements need the
    simple query protocol, which takes no parameters: `opening` is SQL written by the
    service, never text from a request. Nothing inside may use `conn.transaction()` (asyncpg
    refuses it in a transaction it did not start: InterfaceError)."""
    try:
        # Inside the try: an opening cancelled or failed while it waits for its lock leaves
        # the transaction begun and aborted.
        await conn.execute(f"BEGIN; {opening}" if opening else "BEGIN")
        yield
    except BaseException:
        # If even the rollback fails, the pool rolls back (or drops the connection) on release.
        with contextlib.suppress(Exception):
            await conn.execute("ROLLBACK")
        raise
    status = await conn.execute("COMMIT")
    if status != "COMMIT":  # PostgreSQL answers COMMIT of an aborted transaction with ROLLBACK
        raise asyncpg.InFailedSQLTransactionError(f"the transaction was rolled back, not committed ({status})")


# A file whose first line is this marker runs outside a transaction, one statement at a time:
# what PostgreSQL refuses inside one (CREATE INDEX CONCURRENTLY, which builds an index
# without blocking writes). Statements end with a ';' at the end of a line. Such a file must
# be safe to run again (a crash before it is recorded repeats it; an interrupted CONCURRENTLY
# build leaves an INVALID index behind, so drop it first: DROP INDEX CONCURRENTLY IF EXISTS).
NO_TRANSACTION_MARKER = "-- migrate: no-transaction"


def runs_outside_a_transaction(sql: str) -> bool:
    first_line = sql.lstrip("\ufeff").split("\n", 1)[0].strip()
    return first_line == NO_TRANSACTION_MARKER


def statements(sql: str) -> list[str]:
    """The statements of a no-transaction file: each ends with ';' at the end of a line
    (sent one by one: several in one query string would make an implicit transaction)."""
    out, current = [], []
    for line in sql.splitlines():
        current.append(line)
        if line.rstrip().endswith(";"):
            out.append("\n".join(current))
            current = []
    out.append("\n".join(current))
    return [x for x in out if _has_code(x)]


def _has_code(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in text.splitlines())


async def _apply_outside_a_transaction(conn: asyncpg.Connection, *, schema: str, name: str, sql: str) -> None:
    # No lock_timeout here: a CONCURRENTLY build takes no lock that stops the services, but it
    # waits for the transactions in flight, and a timeout would leave its index INVALID.
    await conn.execute(f'SET search_path TO "{schema}"')
    try:
        for statement in statements(sql):
            await conn.execute(statement)
        await conn.execute(f'INSERT INTO "{schema}".schema_migrations (name) VALUES ($1)', name)
    finally:
        await conn.execute("RESET search_path")


def _migration_files(service_dir: Path) -> list[tuple[str, Path]]:
    shared = [(f"shared/{p.name}", p) for p in sorted(SHARED_MIGRATIONS.glob("*.sql"))]
    own = [(p.name, p) for p in sorted(service_dir.glob("*.sql"))]
    return shared + own


# A migration that must lock a table the running instances use (ALTER TABLE, a plain CREATE
# INDEX) waits for their transactions in flight, and every transaction that comes after it
# queues behind it: the consumers would stall for as long as it waits. With a lock timeout it
# gives its turn up instead, and is tried again a moment later; the instances keep working.
MIGRATION_LOCK_TIMEOUT_S = 5.0
MIGRATION_LOCK_ATTEMPTS = 60


async def migrate(dsn: str, *, schema: str, migrations_dir: Path, lock_timeout_s: float = MIGRATION_LOCK_TIMEOUT_S,
                  lock_attempts: int = MIGRATION_LOCK_ATTEMPTS) -> list[str]:
    """Apply the shared and the service's numbered .sql files not applied yet, in order,
    each in its own transaction (or, marked NO_TRANSACTION_MARKER, statement by statement
    outside one). Safe to run from several processes at once: an advisory lock serialises
    them. A file that cannot get a lock within `lock_timeout_s` is rolled back and tried
    again, up to `lock_attempts` times. Returns the names applied by this call."""
    lock_id = int.from_bytes(hashlib.sha256(f"migrate:{schema}".encode()).digest()[:8], "big", signed=True)
    conn = await asyncpg.connect(dsn)
    applied_now: list[str] = []
    try:
        # Polled, not waited for inside a statement: a session blocked in pg_advisory_lock
        # holds a snapshot, and a CREATE INDEX CONCURRENTLY run by the lock's holder waits
        # for every snapshot older than its own, so the two would deadlock.
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_id):
            await asyncio.sleep(0.05 + random.random() * 0.1)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations '
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch(f'SELECT name FROM "{schema}".schema_migrations')}
        for name, path in _migration_files(migrations_dir):
            if name in done:
                continue
            sql = path.read_text()
            if runs_outside_a_transaction(sql):
                await _apply_outside_a_transaction(conn, schema=schema, name=name, sql=sql)
                applied_now.append(name)
                log.info("applied migration outside a transaction", extra={"schema": schema, "migration": name})
                continue
            for attempt in range(1, lock_attempts + 1):
                try:
                    async with conn.transaction():
                        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
                        await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
                        await conn.execute(sql)
                        await conn.execute(f'INSERT INTO "{schema}".schema_migrations (name) VALUES ($1)', name)
                    break
                except asyncpg.LockNotAvailableError:
                    if attempt == lock_attempts:
                        raise
                    log.warning("migration waits for a lock the running services hold; trying again",
                                extra={"schema": schema, "migration": name, "attempt": attempt})
                    await asyncio.sleep(min(0.1 * attempt, 1.0))
            applied_now.append(name)
            log.info("applied migration", extra={"schema": schema, "migration": name})
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", lock_id)
        finally:
            await conn.close()
    return applied_now
