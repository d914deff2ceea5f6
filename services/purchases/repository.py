"""SQL of the purchases service. Functions take a connection and never commit: the use
case owns the transaction."""

import hashlib
import json
import uuid
from decimal import Decimal
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.purchases.domain import PurchaseIn, RecordedSale
from shared.events.purchases import lines_json

_FIND_HASHES = """
SELECT p.source, p.store_id, p.purchase_id, p.content_hash, p.event_id
FROM purchases p
JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(source, store_id, purchase_id)
  USING (source, store_id, purchase_id)
"""

_INSERT_MANY = """
INSERT INTO purchases (source, purchase_id, type, original_purchase_id, store_id, customer_id, occurred_at,
                       currency, total, lines, content_hash, door, event_id, history, import_policy)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[],
                     $8::text[], $9::numeric[], $10::jsonb[], $11::bytea[], $12::text[], $13::uuid[], $14::boolean[],
                     $15::text[])
ON CONFLICT (source, store_id, purchase_id) DO NOTHING
RETURNING source, store_id, purchase_id
"""

_LOCK_SALE = """
SELECT source, purchase_id, type, customer_id, currency, occurred_at, lines, returned, store_id, total, door,
       claimed_at
FROM purchases WHERE source = $1 AND store_id = $2 AND purchase_id = $3
FOR UPDATE
"""

_SET_RETURNED = "UPDATE purchases SET returned = $4::jsonb WHERE source = $1 AND store_id = $2 AND purchase_id = $3"

_SET_CLAIMED = """
UPDATE purchases SET customer_id = $4, claimed_at = $5 WHERE source = $1 AND store_id = $2 AND purchase_id = $3
"""

_STORE_FOR_KEY = "SELECT store_id FROM store_api_keys WHERE key_hash = $1 AND revoked_at IS NULL"

_ADD_KEY = """
INSERT INTO store_api_keys (key_hash, store_id, label) VALUES ($1, $2, $3)
ON CONFLICT (key_hash) DO UPDATE SET store_id = EXCLUDED.store_id, revoked_at = NULL
"""




Key = tuple[str, str, str]  # (source, store_id, purchase_id): a purchase's identity


async def find_hashes(conn: asyncpg.Connection, *, keys: Sequence[Key]) -> dict[Key, tuple[bytes, uuid.UUID]]:
    """The content hash and event id of the purchases already recorded under these keys."""
    if not keys:
        return {}
    rows = await conn.fetch(_FIND_HASHES, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
    return {(r["source"], r["store_id"], r["purchase_id"]): (bytes(r["content_hash"]), r["event_id"]) for r in rows}


async def insert_purchases(
    conn: asyncpg.Connection,
    *,
    purchases: Sequence[tuple[PurchaseIn, str | None, bytes, str, uuid.UUID, str | None]],
) -> set[Key]:
    """Insert (purchase, customer_id, content_hash, door, event_id, import_policy) rows
    (history where an import policy is given); return the keys actually inserted (a
    concurrent writer may have taken some first)."""
    if not purchases:
        return set()
    rows = await conn.fetch(
        _INSERT_MANY,
        [p.source for p, *_ in purchases],
        [p.purchase_id for p, *_ in purchases],
        [p.type for p, *_ in purchases],
        [p.original_purchase_id for p, *_ in purchases],
        [p.store_id for p, *_ in purchases],
        [customer for _, customer, *_ in purchases],
        [p.occurred_at for p, *_ in purchases],
        [p.currency for p, *_ in purchases],
        [p.total for p, *_ in purchases],
        [lines_json(p.lines) for p, *_ in purchases],
        [row[2] for row in purchases],
        [row[3] for row in purchases],
        [row[4] for row in purchases],
        [row[5] is not None for row in purchases],
        [row[5] for row in purchases],
    )
    return {(r["source"], r["store_id"], r["purchase_id"]) for r in rows}


async def lock_sale(conn: asyncpg.Connection, *, source: str, store_id: str, purchase_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(_LOCK_SALE, source, store_id, purchase_id)


def recorded_sale(row: asyncpg.Record) -> RecordedSale:
    lines = json.loads(row["lines"])
    return RecordedSale(
        source=row["source"],
        store_id=row["store_id"],
        purchase_id=row["purchase_id"],
        type=row["type"],
        customer_id=row["customer_id"],
        currency=row["currency"].strip(),
        occurred_at=row["occurred_at"],
        quantities={line["line_id"]: int(line["quantity"]) for line in lines},
        returned={k: int(v) for k, v in json.loads(row["returned"]).items()},
        prices={line["line_id"]: (Decimal(line["unit_price"]), Decimal(line["discount"])) for line in lines},
    )


async def set_returned(conn: asyncpg.Connection, *, source: str, store_id: str, purchase_id: str,
                       returned: dict[str, int]) -> None:
    await conn.execute(_SET_RETURNED, source, store_id, purchase_id, json.dumps(returned))


async def set_claimed(conn: asyncpg.Connection, *, source: str, store_id: str, purchase_id: str, customer_id: str,
                      claimed_at: datetime) -> None:
    await conn.execute(_SET_CLAIMED, source, store_id, purchase_id, customer_id, claimed_at)


_PARK_RETURN = """
INSERT INTO parked_returns (source, store_id, purchase_id, original_purchase_id, door, purchase, original,
                            correlation_id, kafka, parked_at, import_policy)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9::jsonb, $10, $11)
ON CONFLICT (source, store_id, purchase_id) DO NOTHING
"""

_UNPARK_FOR_SALES = """
DELETE FROM parked_returns r
USING unnest($1::text[], $2::text[], $3::text[]) AS k(source, store_id, purchase_id)
WHERE r.source = k.source AND r.store_id = k.store_id AND r.original_purchase_id = k.purchase_id
RETURNING r.*
"""

_UNPARK_EXPIRED = """
DELETE FROM parked_returns WHERE parked_at < $1 RETURNING *
"""


async def park_return(conn: asyncpg.Connection, *, purchase: PurchaseIn, door: str, original: bytes,
                      correlation_id: str | None, kafka: dict[str, Any], parked_at: datetime,
                      import_policy: str | None = None) -> None:
    await conn.execute(_PARK_RETURN, purchase.source, purchase.store_id, purchase.purchase_id,
                       purchase.original_purchase_id, door,
                       purchase.model_dump_json(), original, correlation_id, json.dumps(kafka), parked_at,
                       import_policy)


async def unpark_returns_for(conn: asyncpg.Connection, *, sales: Sequence[Key]) -> list[asyncpg.Record]:
    """Take (delete) the parked returns of these sales, oldest first."""
    if not sales:
        return []
    rows = await conn.fetch(_UNPARK_FOR_SALES, [k[0] for k in sales], [k[1] for k in sales], [k[2] for k in sales])
    return sorted(rows, key=lambda r: r["parked_at"])


async def unpark_expired(conn: asyncpg.Connection, *, parked_before: datetime) -> list[asyncpg.Record]:
    return await conn.fetch(_UNPARK_EXPIRED, parked_before)


def hash_api_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def store_for_api_key(conn: asyncpg.Connection | asyncpg.Pool, *, key: str) -> str | None:
    return await conn.fetchval(_STORE_FOR_KEY, hash_api_key(key))


async def add_api_key(conn: asyncpg.Connection | asyncpg.Pool, *, key: str, store_id: str, label: str | None = None) -> None:
    await conn.execute(_ADD_KEY, hash_api_key(key), store_id, label)

