"""The inbox: exactly-once effect for at-least-once delivery.

A consumer calls `claim_new` inside the transaction that applies the events; only the ids it
returns are new. If the transaction rolls back, the claims roll back with it, so a crash
before commit simply means the redelivered events are new again.
"""

import uuid
from collections.abc import Sequence

import asyncpg

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
