"""The inbox: exactly-once effect for at-least-once delivery.

A consumer calls `claim_new` inside the transaction that applies the events; only the ids it
returns are new. If the transaction rolls back, the claims roll back with it, so a crash
before commit simply means the redelivered events are new again.
"""

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone

import asyncpg

from shared.settings import ServiceSettings

log = logging.getLogger(__name__)

_CLAIM = """
INSERT INTO inbox (consumer, event_id)
SELECT $1, id FROM unnest($2::uuid[]) AS id
ON CONFLICT DO NOTHING
RETURNING event_id
"""


async def claim_new(conn: asyncpg.Connection, *, consumer: str, event_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Record the events as processed by `consumer`; return the ones not seen before."""
    if not event_ids:
        return set()
    rows = await conn.fetch(_CLAIM, consumer, list(event_ids))
    return {r["event_id"] for r in rows}


# ---- retention -------------------------------------------------------------------------------
#
# The inbox only has to remember an event for as long as it can be delivered again: a
# redelivery comes from the topic, so an event the topic no longer holds cannot come back
# (except by a replay, see below). Rows older than the topics' retention plus a margin are
# deleted, in chunks of short transactions, by a periodic sweep every service runs
# (ServiceRuntime). The BRIN index on processed_at (shared migration 0003) finds them: rows
# arrive in time order, and it costs inserts almost nothing.
#
# What it means for replays: an input older than the retention that is replayed later (a
# consumer group reset to offset 0 on topics kept longer than the retention setting says) is
# new to the inbox and applied again. A replay from offset 0 must therefore start from an
# empty database, as the ledger's rebuild does (services/ledger/README.md, Replay).

_SWEEP = """
DELETE FROM inbox WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM inbox WHERE processed_at < $1 LIMIT $2
))
"""


async def sweep_inbox(pool: asyncpg.Pool, *, older_than: datetime, chunk_rows: int = 5000,
                      max_chunks: int = 1000) -> int:
    """Delete inbox rows processed before `older_than`, `chunk_rows` at a time (each chunk its
    own short transaction: no long lock, no huge WAL burst). Returns the rows deleted."""
    deleted = 0
    for _ in range(max_chunks):
        status = await pool.execute(_SWEEP, older_than, chunk_rows)
        n = int(status.split()[-1])
        deleted += n
        if n < chunk_rows:
            break
    return deleted


def inbox_retention_job(settings: ServiceSettings, pool: Callable[[], asyncpg.Pool | None]
                        ) -> tuple[float, str, Callable[[], Awaitable[object]]] | None:
    """The periodic sweep as (interval_s, name, job) for ServiceRuntime, or None when the
    settings keep the inbox forever (topic_retention_days = 0: topics kept forever)."""
    keep = settings.inbox_keep_for()
    if keep is None:
        return None

    async def sweep() -> None:
        p = pool()
        if p is None:
            return
        deleted = await sweep_inbox(p, older_than=datetime.now(timezone.utc) - keep,
                                    chunk_rows=settings.inbox_sweep_chunk_rows)
        if deleted:
            log.info("inbox rows past retention deleted", extra={"rows": deleted, "kept_days": keep.days})

    return settings.inbox_sweep_interval_s, "inbox-retention", sweep
