"""asyncpg access to the rewards schema. SQL lives in named constants; every method takes
keyword arguments, works inside the caller's transaction and never commits."""

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import asyncpg

from services.rewards.domain import COUNTED_FOR_LIMIT, CustomerStanding, Redemption, Reward
from shared.outbox import OutboxMessage

_REWARD_COLUMNS = """
    r.reward_id, r.name, r.description, r.cost_points, r.kind, r.active, r.voucher_value,
    r.voucher_currency, r.stock_remaining, r.per_customer_limit, r.valid_from, r.valid_until,
    r.min_tier,
    (SELECT count(*) FROM coupon_codes c WHERE c.reward_id = r.reward_id AND c.redemption_id IS NULL)
        AS coupons_available
"""

INSERT_REWARD = """
INSERT INTO rewards (reward_id, name, description, cost_points, kind, active, voucher_value, voucher_currency,
                     stock_remaining, per_customer_limit, valid_from, valid_until, min_tier)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
ON CONFLICT (reward_id) DO NOTHING
RETURNING reward_id
"""

UPDATE_REWARD = """
UPDATE rewards SET name = $2, description = $3, cost_points = $4, active = $5, voucher_value = $6,
    voucher_currency = $7, stock_remaining = $8, per_customer_limit = $9, valid_from = $10,
    valid_until = $11, min_tier = $12, updated_at = now()
WHERE reward_id = $1
"""

SELECT_REWARD = f"SELECT {_REWARD_COLUMNS} FROM rewards r WHERE r.reward_id = $1"
SELECT_REWARD_FOR_UPDATE = SELECT_REWARD + " FOR UPDATE OF r"
SELECT_REWARDS = f"SELECT {_REWARD_COLUMNS} FROM rewards r WHERE ($1::boolean IS FALSE OR r.active) ORDER BY r.reward_id"

INSERT_COUPON_CODES = """
INSERT INTO coupon_codes (reward_id, code)
SELECT $1, code FROM unnest($2::text[]) AS code
ON CONFLICT DO NOTHING
"""

RETURN_STOCK = """
UPDATE rewards SET stock_remaining = stock_remaining + 1, updated_at = now()
WHERE reward_id = $1 AND stock_remaining IS NOT NULL
"""

# A batch's reservations read the catalog rows once (no coupon count: not needed to reserve).
SELECT_REWARDS_BY_ID = """
SELECT reward_id, name, description, cost_points, kind, active, voucher_value, voucher_currency, stock_remaining,
       per_customer_limit, valid_from, valid_until, min_tier
FROM rewards WHERE reward_id = ANY($1::text[])
"""
# The stock of a batch's limited rewards, locked (id order: no lock cycles) until the batch
# commits: racing reservations queue here, and the batch takes at most what it read.
LOCK_STOCK = """
SELECT reward_id, stock_remaining FROM rewards
WHERE reward_id = ANY($1::text[]) AND stock_remaining IS NOT NULL
ORDER BY reward_id
FOR UPDATE
"""
# Only after LOCK_STOCK in the same transaction: the rows are ours, the counts fit.
TAKE_STOCK_UNITS = """
UPDATE rewards r SET stock_remaining = r.stock_remaining - w.units, updated_at = now()
FROM unnest($1::text[], $2::int[]) AS w(reward_id, units)
WHERE r.reward_id = w.reward_id
"""

# Up to one free code for each of the given redemptions, in pool order. SKIP LOCKED:
# racing reservations take different free codes instead of queueing on one.
TAKE_COUPON_CODES = """
WITH picked AS (
    SELECT reward_id, code, uploaded_at FROM coupon_codes
    WHERE reward_id = $1 AND redemption_id IS NULL
    ORDER BY uploaded_at, code
    LIMIT cardinality($2::uuid[])
    FOR UPDATE SKIP LOCKED
), paired AS (
    SELECT reward_id, code, ($2::uuid[])[(row_number() OVER (ORDER BY uploaded_at, code))::int] AS redemption_id
    FROM picked
)
UPDATE coupon_codes c SET redemption_id = paired.redemption_id, assigned_at = $3
FROM paired
WHERE c.reward_id = paired.reward_id AND c.code = paired.code
RETURNING c.redemption_id, c.code
"""

STOCK_LEVELS = """
SELECT r.reward_id, r.kind, r.stock_remaining,
       (SELECT count(*) FROM coupon_codes c WHERE c.reward_id = r.reward_id AND c.redemption_id IS NULL)
           AS coupons_available
FROM rewards r WHERE r.active
"""

# Serialises one customer's redemption requests (limit counting, idempotency keys) without
# touching any row other customers need. Transaction-scoped: released by commit/rollback.
# Taken by the statement that opens the transaction (shared.db.transaction): one round trip
# for both. Two statements need the simple query protocol, which takes no parameters, so the
# key is an integer computed here (customer_lock_key), never text from the request.
LOCK_CUSTOMER = "SELECT pg_advisory_xact_lock({key:d})"


def customer_lock_key(customer_id: str) -> int:
    digest = hashlib.blake2b(f"rewards.redeem:{customer_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_REDEMPTION_COLUMNS = """
    redemption_id, customer_id, reward_id, idempotency_key, cost_points, kind, status, ledger_status,
    correlation_id, requested_at, failure_reason, code, hold_expires_at, fulfilled_at, finished_at,
    delivery_address, shipment_state, carrier, tracking_number, tracking_url, shipped_at, shipped_by,
    delivered_at, delivered_by
"""

# The redemption and its RedemptionRequested (an outbox row, as shared.outbox.enqueue writes
# it) in one statement: one round trip less on every request.
INSERT_REDEMPTION_WITH_EVENT = """
WITH redemption AS (
    INSERT INTO redemptions (redemption_id, customer_id, reward_id, idempotency_key, cost_points, kind, status,
                             ledger_status, correlation_id, requested_at, last_requested_at, delivery_address)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $15::jsonb)
)
INSERT INTO outbox (topic, key, value, headers) VALUES ($11, $12, $13, $14::jsonb)
"""

SELECT_REDEMPTION = f"SELECT {_REDEMPTION_COLUMNS} FROM redemptions WHERE redemption_id = $1"
SELECT_CUSTOMER_REDEMPTION = SELECT_REDEMPTION + " AND customer_id = $2"
SELECT_CUSTOMER_REDEMPTION_FOR_UPDATE = SELECT_CUSTOMER_REDEMPTION + " FOR UPDATE"
SELECT_REDEMPTION_FOR_UPDATE = SELECT_REDEMPTION + " FOR UPDATE"
SELECT_STATUSES = "SELECT redemption_id, status FROM redemptions WHERE redemption_id = ANY($1::uuid[])"
# A customer's redemptions, newest first, one page after the keyset (requested_at,
# redemption_id) of the previous page's last one: redemptions sharing a requested_at are
# ordered by id, so none is skipped or repeated at a page boundary. Served by
# redemptions_by_customer (customer_id, requested_at DESC): PostgreSQL derives the index
# condition requested_at <= $2 from the row comparison, filters the few rows of the boundary's
# requested_at and sorts each requested_at's rows by id (incremental sort).
LIST_CUSTOMER_REDEMPTIONS = f"""
SELECT {_REDEMPTION_COLUMNS} FROM redemptions
WHERE customer_id = $1 AND (requested_at, redemption_id) < ($2, $3)
ORDER BY requested_at DESC, redemption_id DESC
LIMIT $4
"""
# The rest of a page's last requested_at (the redemptions at that instant after the id), and
# the next older redemption, if any: to end a page on a whole requested_at (see the service).
REST_OF_REQUESTED_AT = f"""
(SELECT {_REDEMPTION_COLUMNS} FROM redemptions WHERE customer_id = $1 AND requested_at = $2 AND redemption_id < $3)
UNION ALL
(SELECT {_REDEMPTION_COLUMNS} FROM redemptions WHERE customer_id = $1 AND requested_at < $2
 ORDER BY requested_at DESC LIMIT 1)
ORDER BY requested_at DESC, redemption_id DESC
"""
COUNT_FOR_LIMIT_BY_REWARD = """
SELECT reward_id, count(*) AS n FROM redemptions
WHERE customer_id = $1 AND status = ANY($2::text[])
GROUP BY reward_id
"""

# Each state change returns the row as it is now: no second round trip to read it back.
# Everything a redemption request is decided on, in one round trip (after the customer lock).
REQUEST_CONTEXT = """
SELECT e.redemption_id AS existing_id,
       r.reward_id, r.name, r.description, r.cost_points, r.kind, r.active, r.voucher_value, r.voucher_currency,
       r.stock_remaining, r.per_customer_limit, r.valid_from, r.valid_until, r.min_tier,
       s.available_points, s.tier,
       (SELECT count(*) FROM redemptions c
        WHERE c.customer_id = $1 AND c.reward_id = $3 AND c.status = ANY($4::text[])) AS counted
FROM (SELECT 1) AS one
LEFT JOIN redemptions e ON e.customer_id = $1 AND e.idempotency_key = $2
LEFT JOIN rewards r ON r.reward_id = $3
LEFT JOIN customer_standing s ON s.customer_id = $1
"""

MARK_FAILED = f"""
UPDATE redemptions SET status = 'failed', failure_reason = $2, ledger_status = $3,
    hold_expires_at = COALESCE($4, hold_expires_at), finished_at = $5
WHERE redemption_id = $1
RETURNING {_REDEMPTION_COLUMNS}
"""
MARK_CANCELLED = f"""
UPDATE redemptions SET status = 'cancelled', failure_reason = $2, finished_at = $3
WHERE redemption_id = $1
RETURNING {_REDEMPTION_COLUMNS}
"""
# A consumer batch's decisions, written in one statement: the rows were locked by
# LOCK_ANSWERED in the same transaction and changed in Python (domain.py).
SAVE_REDEMPTIONS = """
UPDATE redemptions r SET status = u.status, ledger_status = u.ledger_status, failure_reason = u.failure_reason,
    code = u.code, hold_expires_at = u.hold_expires_at, fulfilled_at = u.fulfilled_at, finished_at = u.finished_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[],
            $8::timestamptz[])
    AS u(redemption_id, status, ledger_status, failure_reason, code, hold_expires_at, fulfilled_at, finished_at)
WHERE r.redemption_id = u.redemption_id
"""

# Fulfilment of physical rewards: only the shipment's columns; the saga's are not touched.
SAVE_SHIPMENT = """
UPDATE redemptions SET shipment_state = $2, carrier = $3, tracking_number = $4, tracking_url = $5, shipped_at = $6,
    shipped_by = $7, delivered_at = $8, delivered_by = $9
WHERE redemption_id = $1
"""
# The fulfilment queue, oldest fulfilment first, one page after the cursor (fulfilled_at,
# redemption_id): each state has its own partial index, so each has its own query.
_QUEUE = """
SELECT {columns}, w.name AS reward_name FROM redemptions d JOIN rewards w ON w.reward_id = d.reward_id
WHERE {state} AND (d.fulfilled_at, d.redemption_id) > ($1, $2)
ORDER BY d.fulfilled_at, d.redemption_id
LIMIT $3
"""
_AWAITING = "d.kind = 'physical' AND d.status = 'fulfilled' AND d.shipment_state IS NULL"
SHIPMENT_COUNTS = f"""
SELECT count(*) AS awaiting, min(d.fulfilled_at) AS oldest_fulfilled_at FROM redemptions d WHERE {_AWAITING}
"""

# Recovery: requests the ledger has not answered yet. SKIP LOCKED lets several instances
# share the work, and skips a row whose answer is being applied right now.
SELECT_UNANSWERED = f"""
SELECT {_REDEMPTION_COLUMNS}, request_attempts FROM redemptions
WHERE status = 'requested' AND last_requested_at < $1
ORDER BY last_requested_at
LIMIT $2
FOR UPDATE SKIP LOCKED
"""
MARK_REQUESTED_AGAIN = """
UPDATE redemptions SET request_attempts = request_attempts + 1, last_requested_at = $2
WHERE redemption_id = $1
RETURNING request_attempts
"""

# The projection: the newest BalanceAfter per customer wins (occurred_at), so a replayed
# older event cannot roll a customer's standing back.
UPSERT_STANDINGS = """
INSERT INTO customer_standing (customer_id, available_points, held_points, tier, qualifying_points, as_of)
SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::int[], $6::timestamptz[])
ON CONFLICT (customer_id) DO UPDATE SET
    available_points = EXCLUDED.available_points, held_points = EXCLUDED.held_points, tier = EXCLUDED.tier,
    qualifying_points = EXCLUDED.qualifying_points, as_of = EXCLUDED.as_of, updated_at = now()
WHERE customer_standing.as_of <= EXCLUDED.as_of
"""
SELECT_STANDING = "SELECT available_points, tier FROM customer_standing WHERE customer_id = $1"



@dataclass(frozen=True, slots=True)
class StandingRow:
    customer_id: str
    available_points: int
    held_points: int
    tier: str
    qualifying_points: int
    as_of: datetime


@dataclass(frozen=True, slots=True)
class RequestContext:
    existing_id: uuid.UUID | None
    reward: Reward | None
    standing: CustomerStanding
    counted_redemptions: int


@dataclass(frozen=True, slots=True)
class StockLevel:
    reward_id: str
    kind: str
    stock_remaining: int | None
    coupons_available: int


_REQUEST_REWARD_FIELDS = (
    "reward_id", "name", "description", "cost_points", "kind", "active", "voucher_value", "voucher_currency",
    "stock_remaining", "per_customer_limit", "valid_from", "valid_until", "min_tier",
)


# What a points.events batch reads first, in one round trip: the customers' standings are
# recorded (idempotent: a redelivered BalanceAfter changes nothing), and the redemptions the
# ledger answered are locked (in id order, so that two transactions never wait on each other
# in a cycle), each with its reward (read, not locked: LOCK_STOCK locks what is taken).
_REDEMPTION_FIELDS = tuple(c.strip() for c in _REDEMPTION_COLUMNS.split(","))
_REWARD_FIELDS = _REQUEST_REWARD_FIELDS
LOCK_ANSWERED = f"""
WITH standings AS ({UPSERT_STANDINGS})
SELECT {", ".join(f"d.{c}" for c in _REDEMPTION_FIELDS)}, {", ".join(f"w.{c} AS w_{c}" for c in _REWARD_FIELDS)}
FROM redemptions d JOIN rewards w ON w.reward_id = d.reward_id
WHERE d.redemption_id = ANY($7::uuid[])
ORDER BY d.redemption_id
FOR UPDATE OF d
"""

# The batch's changed redemptions and the events they emit (outbox rows, as
# shared.outbox.enqueue writes them) in one statement.
SAVE_REDEMPTIONS_AND_ENQUEUE = f"""
WITH saved AS ({SAVE_REDEMPTIONS})
INSERT INTO outbox (topic, key, value, headers)
SELECT * FROM unnest($9::text[], $10::text[], $11::bytea[], $12::jsonb[])
"""


_QUEUE_COLUMNS = ", ".join(f"d.{c}" for c in _REDEMPTION_FIELDS)
SHIPMENT_QUEUE = {
    "awaiting_shipment": _QUEUE.format(columns=_QUEUE_COLUMNS, state=_AWAITING),
    "shipped": _QUEUE.format(columns=_QUEUE_COLUMNS, state="d.shipment_state = 'shipped'"),
    "delivered": _QUEUE.format(columns=_QUEUE_COLUMNS, state="d.shipment_state = 'delivered'"),
}
# The first page's cursor: before every fulfilment.
_QUEUE_START = (datetime(1, 1, 1, tzinfo=timezone.utc), uuid.UUID(int=0))
# The first page of a customer's redemptions: after (older than) this key comes every one.
_NEWEST_FIRST_START = (datetime.max.replace(tzinfo=timezone.utc), uuid.UUID(int=2**128 - 1))


@dataclass(frozen=True, slots=True)
class QueueEntry:
    redemption: Redemption
    reward_name: str


@dataclass(frozen=True, slots=True)
class ShipmentCounts:
    awaiting: int
    oldest_fulfilled_at: datetime | None


def _reward(row: asyncpg.Record) -> Reward:
    return Reward(**dict(row))


def _redemption(row: asyncpg.Record) -> Redemption:
    data = {f: row[f] for f in _REDEMPTION_FIELDS}
    if data["delivery_address"] is not None:  # jsonb arrives as text (no codec on the pool)
        data["delivery_address"] = json.loads(data["delivery_address"])
    return Redemption(**data)


class RewardsRepository:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    # ---- catalog ---------------------------------------------------------------------------

    async def insert_reward(self, *, reward: Reward) -> bool:
        """False when the reward_id exists already."""
        return await self._conn.fetchval(INSERT_REWARD, *self._reward_values(reward)) is not None

    async def update_reward(self, *, reward: Reward) -> None:
        r = reward
        await self._conn.execute(
            UPDATE_REWARD, r.reward_id, r.name, r.description, r.cost_points, r.active, r.voucher_value,
            r.voucher_currency, r.stock_remaining, r.per_customer_limit, r.valid_from, r.valid_until, r.min_tier,
        )

    @staticmethod
    def _reward_values(r: Reward) -> tuple:
        return (r.reward_id, r.name, r.description, r.cost_points, r.kind, r.active, r.voucher_value,
                r.voucher_currency, r.stock_remaining, r.per_customer_limit, r.valid_from, r.valid_until, r.min_tier)

    async def get_reward(self, *, reward_id: str, for_update: bool = False) -> Reward | None:
        row = await self._conn.fetchrow(SELECT_REWARD_FOR_UPDATE if for_update else SELECT_REWARD, reward_id)
        return _reward(row) if row else None

    async def list_rewards(self, *, active_only: bool) -> list[Reward]:
        return [_reward(r) for r in await self._conn.fetch(SELECT_REWARDS, active_only)]

    async def add_coupon_codes(self, *, reward_id: str, codes: Sequence[str]) -> int:
        """Returns how many were new (a code already in the pool is skipped)."""
        status = await self._conn.execute(INSERT_COUPON_CODES, reward_id, list(codes))
        return int(status.split()[-1])

    async def return_stock(self, *, reward_id: str) -> None:
        await self._conn.execute(RETURN_STOCK, reward_id)

    async def get_rewards(self, *, reward_ids: Sequence[str]) -> dict[str, Reward]:
        rows = await self._conn.fetch(SELECT_REWARDS_BY_ID, list(reward_ids))
        return {r["reward_id"]: _reward(r) for r in rows}

    async def lock_stock(self, *, reward_ids: Sequence[str]) -> dict[str, int]:
        """Units left of each limited reward, locked until the transaction ends (an
        unlimited reward is absent)."""
        rows = await self._conn.fetch(LOCK_STOCK, list(reward_ids))
        return {r["reward_id"]: r["stock_remaining"] for r in rows}

    async def take_stock_units(self, *, units: dict[str, int]) -> None:
        """Only for rewards locked by lock_stock, never more than it returned."""
        if units:
            await self._conn.execute(TAKE_STOCK_UNITS, list(units), list(units.values()))

    async def take_coupon_codes(
        self, *, reward_id: str, redemption_ids: Sequence[uuid.UUID], now: datetime
    ) -> dict[uuid.UUID, str]:
        """A free code for each redemption while the pool lasts: {redemption_id: code}."""
        rows = await self._conn.fetch(TAKE_COUPON_CODES, reward_id, list(redemption_ids), now)
        return {r["redemption_id"]: r["code"] for r in rows}

    async def stock_levels(self) -> list[StockLevel]:
        return [StockLevel(**dict(r)) for r in await self._conn.fetch(STOCK_LEVELS)]

    # ---- redemptions -----------------------------------------------------------------------

    @staticmethod
    def customer_lock(customer_id: str) -> str:
        """The statement taking the customer's redemption lock (until COMMIT or ROLLBACK), to
        open a transaction with (service.customer_transaction)."""
        return LOCK_CUSTOMER.format(key=customer_lock_key(customer_id))

    async def request_context(self, *, customer_id: str, idempotency_key: str, reward_id: str) -> RequestContext:
        row = await self._conn.fetchrow(REQUEST_CONTEXT, customer_id, idempotency_key, reward_id,
                                        list(COUNTED_FOR_LIMIT))
        reward = None
        if row["reward_id"] is not None:
            reward = Reward(**{f: row[f] for f in _REQUEST_REWARD_FIELDS})
        standing = CustomerStanding()
        if row["tier"] is not None:
            standing = CustomerStanding(available_points=row["available_points"], tier=row["tier"], known=True)
        return RequestContext(existing_id=row["existing_id"], reward=reward, standing=standing,
                              counted_redemptions=row["counted"])

    async def counts_for_limit(self, *, customer_id: str) -> dict[str, int]:
        rows = await self._conn.fetch(COUNT_FOR_LIMIT_BY_REWARD, customer_id, list(COUNTED_FOR_LIMIT))
        return {r["reward_id"]: r["n"] for r in rows}

    async def insert_redemption_with_event(self, *, redemption: Redemption, event: OutboxMessage) -> None:
        r, m = redemption, event
        await self._conn.execute(
            INSERT_REDEMPTION_WITH_EVENT, r.redemption_id, r.customer_id, r.reward_id, r.idempotency_key,
            r.cost_points, r.kind, r.status, r.ledger_status, r.correlation_id, r.requested_at,
            m.topic, m.key, m.value, json.dumps(m.headers),
            json.dumps(r.delivery_address) if r.delivery_address is not None else None,
        )

    async def get_redemption(self, *, redemption_id: uuid.UUID, for_update: bool = False) -> Redemption | None:
        row = await self._conn.fetchrow(SELECT_REDEMPTION_FOR_UPDATE if for_update else SELECT_REDEMPTION,
                                        redemption_id)
        return _redemption(row) if row else None

    async def get_customer_redemption(
        self, *, redemption_id: uuid.UUID, customer_id: str, for_update: bool = False
    ) -> Redemption | None:
        """Only the customer's own redemption: another customer's id reads as not found."""
        sql = SELECT_CUSTOMER_REDEMPTION_FOR_UPDATE if for_update else SELECT_CUSTOMER_REDEMPTION
        row = await self._conn.fetchrow(sql, redemption_id, customer_id)
        return _redemption(row) if row else None

    async def statuses(self, *, redemption_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
        rows = await self._conn.fetch(SELECT_STATUSES, list(redemption_ids))
        return {r["redemption_id"]: r["status"] for r in rows}

    async def list_customer_redemptions(
        self, *, customer_id: str, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[Redemption]:
        """Up to `limit` of the customer's redemptions, newest first (requested_at, then id,
        descending), after the key (requested_at, redemption_id); from the newest without one."""
        after_requested_at, after_id = after or _NEWEST_FIRST_START
        rows = await self._conn.fetch(LIST_CUSTOMER_REDEMPTIONS, customer_id, after_requested_at, after_id, limit)
        return [_redemption(r) for r in rows]

    async def rest_of_requested_at(
        self, *, customer_id: str, requested_at: datetime, after_id: uuid.UUID
    ) -> tuple[list[Redemption], bool]:
        """The customer's redemptions at exactly `requested_at` after `after_id` (id descending),
        and whether any older one exists."""
        rows = [_redemption(r) for r in await self._conn.fetch(REST_OF_REQUESTED_AT, customer_id, requested_at,
                                                                 after_id)]
        rest = [r for r in rows if r.requested_at == requested_at]
        return rest, len(rows) > len(rest)

    async def mark_failed(
        self, *, redemption_id: uuid.UUID, reason: str, ledger_status: str, now: datetime,
        hold_expires_at: datetime | None = None,
    ) -> Redemption:
        return _redemption(
            await self._conn.fetchrow(MARK_FAILED, redemption_id, reason, ledger_status, hold_expires_at, now)
        )

    async def mark_cancelled(self, *, redemption_id: uuid.UUID, reason: str, now: datetime) -> Redemption:
        return _redemption(await self._conn.fetchrow(MARK_CANCELLED, redemption_id, reason, now))

    async def lock_answered(
        self, *, redemption_ids: Sequence[uuid.UUID], standings: Sequence[StandingRow]
    ) -> dict[uuid.UUID, tuple[Redemption, Reward]]:
        """Record the standings; lock the redemptions (until the transaction ends), each with
        its reward as it is now."""
        if not redemption_ids and not standings:
            return {}
        s = standings
        rows = await self._conn.fetch(
            LOCK_ANSWERED, [r.customer_id for r in s], [r.available_points for r in s], [r.held_points for r in s],
            [r.tier for r in s], [r.qualifying_points for r in s], [r.as_of for r in s], list(set(redemption_ids)),
        )
        return {row["redemption_id"]: (_redemption(row),
                                       Reward(**{f: row[f"w_{f}"] for f in _REWARD_FIELDS}))
                for row in rows}

    async def save_and_enqueue(self, *, redemptions: Sequence[Redemption], messages: Sequence[OutboxMessage]) -> None:
        """Write the state of redemptions this transaction locked and changed, and add the
        messages to the outbox."""
        if not redemptions and not messages:
            return
        rs, ms = redemptions, messages
        await self._conn.execute(
            SAVE_REDEMPTIONS_AND_ENQUEUE, [r.redemption_id for r in rs], [r.status for r in rs],
            [r.ledger_status for r in rs], [r.failure_reason for r in rs], [r.code for r in rs],
            [r.hold_expires_at for r in rs], [r.fulfilled_at for r in rs], [r.finished_at for r in rs],
            [m.topic for m in ms], [m.key for m in ms], [m.value for m in ms], [json.dumps(m.headers) for m in ms],
        )

    # ---- fulfilment of physical rewards ------------------------------------------------------

    async def save_shipment(self, *, redemption: Redemption) -> None:
        r = redemption
        await self._conn.execute(SAVE_SHIPMENT, r.redemption_id, r.shipment_state, r.carrier, r.tracking_number,
                                 r.tracking_url, r.shipped_at, r.shipped_by, r.delivered_at, r.delivered_by)

    async def shipment_queue(
        self, *, state: str, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[QueueEntry]:
        """One page of the redemptions in `state`, oldest fulfilment first, after the cursor."""
        after_fulfilled_at, after_id = after or _QUEUE_START
        rows = await self._conn.fetch(SHIPMENT_QUEUE[state], after_fulfilled_at, after_id, limit)
        return [QueueEntry(_redemption(r), r["reward_name"]) for r in rows]

    async def shipment_counts(self) -> ShipmentCounts:
        row = await self._conn.fetchrow(SHIPMENT_COUNTS)
        return ShipmentCounts(awaiting=row["awaiting"], oldest_fulfilled_at=row["oldest_fulfilled_at"])

    async def lock_unanswered(self, *, requested_before: datetime, limit: int) -> list[tuple[Redemption, int]]:
        rows = await self._conn.fetch(SELECT_UNANSWERED, requested_before, limit)
        return [(_redemption(r), r["request_attempts"]) for r in rows]

    async def mark_requested_again(self, *, redemption_id: uuid.UUID, now: datetime) -> int:
        return await self._conn.fetchval(MARK_REQUESTED_AGAIN, redemption_id, now)

    # ---- projection of the ledger ----------------------------------------------------------

    async def get_standing(self, *, customer_id: str) -> CustomerStanding:
        row = await self._conn.fetchrow(SELECT_STANDING, customer_id)
        if row is None:
            return CustomerStanding()
        return CustomerStanding(available_points=row["available_points"], tier=row["tier"], known=True)
