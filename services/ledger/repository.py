"""SQL of the ledger. Functions take a connection, use keyword-only arguments and never
commit: the use case owns the transaction. Bulk writes use COPY or unnest so that a batch of
a thousand events costs a handful of round trips."""

import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import Any

import asyncpg

from services.ledger.domain.accounts import (
    PROGRAM_ACCOUNTS,
    Account,
    Phase,
    Transfer,
    available_account,
    debt_account,
    pending_account,
)
from services.ledger.domain.adjustments import Adjustment
from services.ledger.domain.books import CustomerBook, Hold, LineEarning, Lot

# ---- customers and accounts -----------------------------------------------------------------

_INSERT_CUSTOMERS = """
WITH new AS (
    INSERT INTO customers (customer_id, tier)
    SELECT id, $2 FROM unnest($1::text[]) AS id
    ON CONFLICT DO NOTHING
    RETURNING customer_id
)
INSERT INTO accounts (account_id, customer_id, kind)
SELECT 'customer:' || new.customer_id || ':' || k, new.customer_id, k
FROM new CROSS JOIN unnest(ARRAY['available', 'pending', 'debt']) AS k
"""

# ORDER BY before FOR UPDATE: rows are locked in customer_id order by every transaction, so
# two batches touching the same customers cannot deadlock each other.
_SELECT_CUSTOMERS = """
SELECT c.customer_id, c.tier, c.has_purchased, c.qualifying_points,
       a.debits_pending AS a_dpe, a.debits_posted AS a_dpo, a.credits_pending AS a_cpe, a.credits_posted AS a_cpo,
       p.debits_posted AS p_dpo, p.credits_posted AS p_cpo,
       d.debits_posted AS d_dpo, d.credits_posted AS d_cpo
FROM customers c
JOIN accounts a ON a.account_id = 'customer:' || c.customer_id || ':available'
JOIN accounts p ON p.account_id = 'customer:' || c.customer_id || ':pending'
JOIN accounts d ON d.account_id = 'customer:' || c.customer_id || ':debt'
WHERE c.customer_id = ANY($1::text[])
ORDER BY c.customer_id
"""

_QUALIFYING = """
SELECT customer_id, sum(earned_points - reversed_points) AS points FROM lots
WHERE customer_id = ANY($1::text[]) AND qualifying AND occurred_at > $2
GROUP BY customer_id
"""

_UPDATE_CUSTOMERS = """
UPDATE customers c SET tier = u.tier, has_purchased = u.has_purchased, qualifying_points = u.qualifying,
    updated_at = now()
FROM unnest($1::text[], $2::text[], $3::bool[], $4::int[]) AS u(customer_id, tier, has_purchased, qualifying)
WHERE c.customer_id = u.customer_id
"""

_ADD_TO_ACCOUNTS = """
UPDATE accounts a SET
    debits_pending = a.debits_pending + u.dpe, debits_posted = a.debits_posted + u.dpo,
    credits_pending = a.credits_pending + u.cpe, credits_posted = a.credits_posted + u.cpo
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[]) AS u(account_id, dpe, dpo, cpe, cpo)
WHERE a.account_id = u.account_id
"""


def _book(row: asyncpg.Record) -> CustomerBook:
    cid = row["customer_id"]
    return CustomerBook(
        customer_id=cid,
        tier=row["tier"],
        qualifying_points=int(row["qualifying_points"]),
        has_purchased=row["has_purchased"],
        available=Account(available_account(cid), "available", row["a_dpe"], row["a_dpo"], row["a_cpe"], row["a_cpo"]),
        pending=Account(pending_account(cid), "pending", 0, row["p_dpo"], 0, row["p_cpo"]),
        debt=Account(debt_account(cid), "debt", 0, row["d_dpo"], 0, row["d_cpo"]),
    )


# The program version check rides on the customers' lock: one round trip for both.
_LOCK_CUSTOMERS = _SELECT_CUSTOMERS.replace(
    "SELECT c.customer_id,", "SELECT (SELECT max(version) FROM program_versions) AS program_version, c.customer_id,", 1,
) + " FOR UPDATE OF c"


async def lock_customers(
    conn: asyncpg.Connection, *, customer_ids: Iterable[str]
) -> tuple[dict[str, CustomerBook], int | None]:
    """Lock the customers' rows for the rest of the transaction (the per-customer mutex of
    every change to their points) and load their books without lots; and the latest program
    version saved, when any customer was found (None otherwise). One round trip."""
    ids = sorted(set(customer_ids))
    if not ids:
        return {}, None
    rows = await conn.fetch(_LOCK_CUSTOMERS, ids)
    return {r["customer_id"]: _book(r) for r in rows}, (rows[0]["program_version"] or 0) if rows else None


async def create_customers(conn: asyncpg.Connection, *, customer_ids: Sequence[str], tier: str) -> dict[str, CustomerBook]:
    """Create the customers not known yet (entry tier `tier`) and lock them; whatever the
    insert did not create (a concurrent transaction did) is locked after it."""
    await conn.execute(_INSERT_CUSTOMERS, list(customer_ids), tier)
    rows = await conn.fetch(_SELECT_CUSTOMERS + " FOR UPDATE OF c", list(customer_ids))
    return {r["customer_id"]: _book(r) for r in rows}


async def read_customer(conn: asyncpg.Connection, *, customer_id: str) -> CustomerBook | None:
    row = await conn.fetchrow(_SELECT_CUSTOMERS, [customer_id])
    return _book(row) if row else None


async def qualifying_points(conn: asyncpg.Connection, *, customer_ids: Sequence[str], window_start: datetime) -> dict[str, int]:
    """The windowed sum from the lots (the customer row keeps a running figure)."""
    rows = await conn.fetch(_QUALIFYING, list(customer_ids), window_start)
    return {r["customer_id"]: int(r["points"]) for r in rows}


async def update_customers(conn: asyncpg.Connection, *, books: Iterable[CustomerBook]) -> None:
    changed = [b for b in books if b.changed]
    if changed:
        await conn.execute(_UPDATE_CUSTOMERS, [b.customer_id for b in changed], [b.tier for b in changed],
                           [b.has_purchased for b in changed], [b.qualifying_points for b in changed])


def account_deltas(transfers: Iterable[Transfer]) -> dict[str, list[int]]:
    """Per account: [debits_pending, debits_posted, credits_pending, credits_posted] to add."""
    deltas: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for t in transfers:
        debit, credit, amount = deltas[t.debit_account_id], deltas[t.credit_account_id], t.amount_points
        if t.phase is Phase.POSTED:
            debit[1] += amount
            credit[3] += amount
        elif t.phase is Phase.PENDING:
            debit[0] += amount
            credit[2] += amount
        elif t.phase is Phase.POST_PENDING:
            debit[0] -= amount
            credit[2] -= amount
            debit[1] += amount
            credit[3] += amount
        else:
            debit[0] -= amount
            credit[2] -= amount
    return deltas


async def add_to_accounts(conn: asyncpg.Connection, *, transfers: Sequence[Transfer]) -> None:
    """Apply the transfers' totals to the accounts as increments (never absolute values), so
    the shared program accounts stay right under concurrent transactions. Customer accounts
    first (their customers are locked), then program accounts one by one in a fixed order:
    these hot rows are then locked briefly and always in the same order."""
    deltas = account_deltas(transfers)
    customer = [k for k in deltas if k not in PROGRAM_ACCOUNTS]
    if customer:
        await conn.execute(_ADD_TO_ACCOUNTS, customer, *([deltas[k][i] for k in customer] for i in range(4)))
    for k in PROGRAM_ACCOUNTS:
        if k in deltas:
            await conn.execute(_ADD_TO_ACCOUNTS, [k], *([deltas[k][i]] for i in range(4)))


# ---- transfers ------------------------------------------------------------------------------

_TRANSFER_COLUMNS = ("transfer_id", "debit_account_id", "credit_account_id", "amount_points", "code", "phase",
                     "pending_id", "customer_id", "ref", "lot_id", "rule_version", "occurred_at")


async def insert_transfers(conn: asyncpg.Connection, *, transfers: Sequence[Transfer]) -> None:
    """COPY: the fastest way into PostgreSQL; a duplicate transfer id fails the whole batch
    (the unique constraint is the last line of defence against a double credit)."""
    if not transfers:
        return
    await conn.copy_records_to_table(
        "transfers",
        records=[(t.transfer_id, t.debit_account_id, t.credit_account_id, t.amount_points, t.code.value,
                  t.phase.value, t.pending_id, t.customer_id, t.ref, t.lot_id, t.rule_version, t.occurred_at)
                 for t in transfers],
        columns=_TRANSFER_COLUMNS,
    )


_HISTORY = """
SELECT t.seq, t.transfer_id, t.debit_account_id, t.credit_account_id, t.amount_points, t.code, t.phase,
       t.ref, t.lot_id, t.rule_version, t.occurred_at, t.created_at,
       CASE WHEN t.code = 'earn' THEN l.breakdown END AS breakdown, l.purchase_id, l.purchase_source,
       a.reason_code, a.actor, a.note
FROM transfers t
LEFT JOIN lots l ON l.lot_id = t.lot_id AND l.source = 'purchase'
LEFT JOIN adjustments a ON a.transfer_id = t.transfer_id
WHERE t.customer_id = $1 AND ($2::bigint IS NULL OR t.seq < $2)
ORDER BY t.seq DESC
LIMIT $3
"""


async def transfers_of(conn: asyncpg.Connection, *, customer_id: str, before_seq: int | None, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(_HISTORY, customer_id, before_seq, limit)


# ---- lots -----------------------------------------------------------------------------------

_LOT_COLUMNS = (
    "lot_id", "customer_id", "source", "purchase_id", "occurred_at", "amount_points", "remaining_points",
    "held_points", "expired_points", "pending", "matures_at", "expires_at", "rule_version", "qualifying",
    "earned_points", "reversed_points", "bonus_points", "tier_multiplier", "lines", "breakdown", "return_ids",
    "reminded_on", "purchase_source", "purchase_store", "currency_rate", "history",
)
_SELECT_LOTS = f"SELECT {', '.join(_LOT_COLUMNS)} FROM lots"


def _lot(r: asyncpg.Record) -> Lot:
    return Lot(
        lot_id=r["lot_id"], customer_id=r["customer_id"], source=r["source"], purchase_id=r["purchase_id"],
        occurred_at=r["occurred_at"], amount_points=r["amount_points"], remaining_points=r["remaining_points"],
        pending=r["pending"], matures_at=r["matures_at"], expires_at=r["expires_at"], rule_version=r["rule_version"],
        held_points=r["held_points"], expired_points=r["expired_points"], qualifying=r["qualifying"],
        earned_points=r["earned_points"], reversed_points=r["reversed_points"], bonus_points=r["bonus_points"],
        tier_multiplier=r["tier_multiplier"], lines=[LineEarning.from_json(x) for x in json.loads(r["lines"])],
        return_ids=list(r["return_ids"]), reminded_on=r["reminded_on"], purchase_source=r["purchase_source"],
        purchase_store=r["purchase_store"], currency_rate=r["currency_rate"], history=r["history"],
    )


PurchaseKey = tuple[str, str, str]  # (source, store_id, purchase_id), as the purchases service keys it


def _match(key: PurchaseKey, found: dict[tuple[str | None, str | None, str], Any]) -> Any:
    """A lot written before stores (store None) answers for any store of its channel, one
    written before channels were kept (both None) for any purchase of that id."""
    source, store, pid = key
    return found.get((source, store, pid)) or found.get((source, None, pid)) or found.get((None, None, pid))


async def lots_of_purchases(conn: asyncpg.Connection, *, keys: Sequence[PurchaseKey]) -> dict[PurchaseKey, Lot]:
    """The lots of these purchases, by (source, store_id, purchase_id)."""
    if not keys:
        return {}
    rows = await conn.fetch(_SELECT_LOTS + " WHERE purchase_id = ANY($1::text[])", list({k[2] for k in keys}))
    by_key = {(lot.purchase_source, lot.purchase_store, lot.purchase_id or ""): lot for lot in map(_lot, rows)}
    return {key: lot for key in set(keys) if (lot := _match(key, by_key)) is not None}


async def purchases_with_lots(conn: asyncpg.Connection, *, keys: Sequence[PurchaseKey]) -> set[PurchaseKey]:
    """Which of these purchases already earned (cheap: no lot bodies)."""
    if not keys:
        return set()
    rows = await conn.fetch("SELECT purchase_id, purchase_source, purchase_store FROM lots"
                            " WHERE purchase_id = ANY($1::text[])", list({k[2] for k in keys}))
    found = {(r["purchase_source"], r["purchase_store"], r["purchase_id"]): True for r in rows}
    return {key for key in keys if _match(key, found)}


async def window_lots(conn: asyncpg.Connection, *, customer_ids: Sequence[str],
                      since: datetime) -> dict[str, dict[uuid.UUID, tuple[datetime, int]]]:
    """The customers' qualifying lots dated after `since`, as (occurred_at, points net of
    returns): what the tier at a purchase's own time is computed from."""
    rows = await conn.fetch(
        "SELECT customer_id, lot_id, occurred_at, earned_points - reversed_points AS points FROM lots"
        " WHERE customer_id = ANY($1::text[]) AND qualifying AND occurred_at > $2", list(customer_ids), since)
    out: dict[str, dict[uuid.UUID, tuple[datetime, int]]] = defaultdict(dict)
    for r in rows:
        out[r["customer_id"]][r["lot_id"]] = (r["occurred_at"], int(r["points"]))
    return out


# Every redemption batch, adjustment and scheduler chunk runs this. The first arm is served
# by lots_open (migration 0007), whose predicate is this condition word for word: keep them
# the same, or the planner can no longer prove the index applies and scans the table
# (tests/integration/test_ledger_schema.py runs EXPLAIN on a populated table).
OPEN_LOTS = (_SELECT_LOTS + " WHERE (customer_id = ANY($1::text[]) AND (pending OR remaining_points > 0 OR held_points > 0))"
             " OR lot_id = ANY($2::uuid[])")


async def open_lots(
    conn: asyncpg.Connection, *, customer_ids: Sequence[str], lot_ids: Sequence[uuid.UUID] = ()
) -> list[Lot]:
    """Every lot of these customers that still has points in it (pending, remaining or
    held), plus the named lots: what holds, expiry and refunds work on."""
    rows = await conn.fetch(OPEN_LOTS, list(customer_ids), list(lot_ids))
    return [_lot(r) for r in rows]


async def earned_by_day(
    conn: asyncpg.Connection, *, customer_ids: Sequence[str], since: datetime
) -> dict[tuple[str, date], int]:
    rows = await conn.fetch(
        "SELECT customer_id, (occurred_at AT TIME ZONE 'UTC')::date AS day, sum(earned_points) AS points FROM lots"
        " WHERE customer_id = ANY($1::text[]) AND qualifying AND occurred_at >= $2 GROUP BY 1, 2",
        list(customer_ids), since,
    )
    return {(r["customer_id"], r["day"]): int(r["points"]) for r in rows}


def _lines_json(lot: Lot) -> str:
    return json.dumps([x.to_json() for x in lot.lines])


async def insert_lots(conn: asyncpg.Connection, *, lots: Sequence[Lot]) -> None:
    if not lots:
        return
    await conn.copy_records_to_table(
        "lots",
        records=[(x.lot_id, x.customer_id, x.source, x.purchase_id, x.occurred_at, x.amount_points,
                  x.remaining_points, x.held_points, x.expired_points, x.pending, x.matures_at, x.expires_at,
                  x.rule_version, x.qualifying, x.earned_points, x.reversed_points, x.bonus_points,
                  x.tier_multiplier, _lines_json(x), json.dumps(x.breakdown), x.return_ids,
                  x.reminded_on, x.purchase_source, x.purchase_store, x.currency_rate, x.history) for x in lots],
        columns=_LOT_COLUMNS,
    )


_UPDATE_LOTS = """
UPDATE lots l SET remaining_points = u.remaining, held_points = u.held, expired_points = u.expired,
    pending = u.pending, reversed_points = u.reversed, lines = u.lines, return_ids = string_to_array(u.return_ids, E'\\x1f'),
    reminded_on = u.reminded_on
FROM unnest($1::uuid[], $2::int[], $3::int[], $4::int[], $5::bool[], $6::int[], $7::jsonb[], $8::text[], $9::date[])
    AS u(lot_id, remaining, held, expired, pending, reversed, lines, return_ids, reminded_on)
WHERE l.lot_id = u.lot_id
"""


async def update_lots(conn: asyncpg.Connection, *, lots: Sequence[Lot]) -> None:
    """Absolute values: safe because every lot belongs to a customer locked by this transaction."""
    if not lots:
        return
    await conn.execute(
        _UPDATE_LOTS, [x.lot_id for x in lots], [x.remaining_points for x in lots], [x.held_points for x in lots],
        [x.expired_points for x in lots], [x.pending for x in lots], [x.reversed_points for x in lots],
        [_lines_json(x) for x in lots], ["\x1f".join(x.return_ids) for x in lots], [x.reminded_on for x in lots],
    )


# ---- holds ----------------------------------------------------------------------------------

_HOLD_COLUMNS = "redemption_id, customer_id, amount_points, state, expires_at, transfer_id, allocations"


def _hold(r: asyncpg.Record) -> Hold:
    return Hold(r["redemption_id"], r["customer_id"], r["amount_points"], r["state"], r["expires_at"],
                r["transfer_id"], json.loads(r["allocations"]))


async def holds_by_id(conn: asyncpg.Connection, *, redemption_ids: Sequence[uuid.UUID],
                      timed_out_of: Sequence[str] = (), now: datetime | None = None) -> dict[uuid.UUID, Hold]:
    """The named holds; with `timed_out_of`, in the same round trip, also those customers'
    holds still held and timed out by `now`."""
    if not redemption_ids and not timed_out_of:
        return {}
    rows = await conn.fetch(
        f"SELECT {_HOLD_COLUMNS} FROM holds WHERE redemption_id = ANY($1::uuid[])"
        " OR (customer_id = ANY($2::text[]) AND state = 'held' AND expires_at <= $3)",
        list(set(redemption_ids)), list(timed_out_of), now)
    return {r["redemption_id"]: _hold(r) for r in rows}


async def timed_out_holds(conn: asyncpg.Connection, *, customer_ids: Sequence[str], now: datetime) -> list[Hold]:
    rows = await conn.fetch(
        f"SELECT {_HOLD_COLUMNS} FROM holds WHERE customer_id = ANY($1::text[]) AND state = 'held' AND expires_at <= $2",
        list(customer_ids), now)
    return [_hold(r) for r in rows]


async def save_holds(conn: asyncpg.Connection, *, holds: Sequence[Hold]) -> None:
    new = [h for h in holds if h.is_new]
    changed = [h for h in holds if h.changed and not h.is_new]
    if new:
        await conn.execute(
            f"INSERT INTO holds ({_HOLD_COLUMNS}) SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[],"
            " $5::timestamptz[], $6::uuid[], $7::jsonb[])",
            [h.redemption_id for h in new], [h.customer_id for h in new], [h.amount_points for h in new],
            [h.state for h in new], [h.expires_at for h in new], [h.transfer_id for h in new],
            [json.dumps(h.allocations) for h in new],
        )
    if changed:
        # Allocations too: a late redemption takes its points from other lots than the hold did.
        await conn.execute(
            "UPDATE holds h SET state = u.state, allocations = u.allocations, updated_at = now()"
            " FROM unnest($1::uuid[], $2::text[], $3::jsonb[]) AS u(redemption_id, state, allocations)"
            " WHERE h.redemption_id = u.redemption_id",
            [h.redemption_id for h in changed], [h.state for h in changed],
            [json.dumps(h.allocations) for h in changed],
        )


# ---- adjustments ----------------------------------------------------------------------------


async def find_adjustment(conn: asyncpg.Connection, *, adjustment_id: uuid.UUID) -> Adjustment | None:
    r = await conn.fetchrow("SELECT * FROM adjustments WHERE adjustment_id = $1", adjustment_id)
    if r is None:
        return None
    return Adjustment(r["adjustment_id"], r["customer_id"], r["amount_points"], r["reason_code"], r["actor"], r["note"],
                      r["created_at"])


_INSERT_ADJUSTMENTS = """
INSERT INTO adjustments (adjustment_id, customer_id, amount_points, reason_code, actor, note, transfer_id, created_at)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::text[], $7::uuid[],
                     $8::timestamptz[])
"""


async def applied_adjustments(conn: asyncpg.Connection, *, adjustment_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """The ones among `adjustment_ids` that already have their audit row (so their transfer)."""
    if not adjustment_ids:
        return set()
    rows = await conn.fetch("SELECT adjustment_id FROM adjustments WHERE adjustment_id = ANY($1::uuid[])",
                            list(adjustment_ids))
    return {r["adjustment_id"] for r in rows}


async def insert_adjustments(conn: asyncpg.Connection, *, adjustments: Sequence[Adjustment]) -> None:
    """The audit rows. `created_at` is when the ledger accepted the adjustment (the event's
    occurred_at), not when the row was written, so a rebuilt ledger keeps the original times."""
    if not adjustments:
        return
    await conn.execute(
        _INSERT_ADJUSTMENTS, [a.adjustment_id for a in adjustments], [a.customer_id for a in adjustments],
        [a.amount_points for a in adjustments], [a.reason_code for a in adjustments], [a.actor for a in adjustments],
        [a.note for a in adjustments], [a.transfer_id for a in adjustments], [a.occurred_at for a in adjustments],
    )


# ---- program versions -----------------------------------------------------------------------


_PROGRAM_COLUMNS = "version, document, source, actor, created_at, effective_from"


# Held by every transaction that applies inputs, from its BEGIN (shared.db.transaction) to its
# end. ROW EXCLUSIVE does not conflict with itself (batches run side by side) but does with
# the SHARE ROW EXCLUSIVE a save takes (lock_program_versions): a version is never saved while
# inputs are being applied anywhere, so its effective_from, taken under that lock, is later
# than every input applied before it, and a batch that begins after it sees it (and picks it
# up: UnitOfWork.lock compares the latest version saved with what its ProgramStore knows).
APPLYING_INPUTS = "LOCK TABLE program_versions IN ROW EXCLUSIVE MODE"


async def lock_program_versions(conn: asyncpg.Connection) -> None:
    """Until the transaction ends: concurrent saves take turns instead of both picking the
    same number, a start restoring versions does not interleave with a save, and no input is
    applied anywhere (APPLYING_INPUTS waits for it; it waits for those being applied)."""
    await conn.execute("LOCK TABLE program_versions IN SHARE ROW EXCLUSIVE MODE")


async def latest_program_version(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT coalesce(max(version), 0) FROM program_versions")


async def program_history(conn: asyncpg.Connection, *, after: int = 0) -> list[asyncpg.Record]:
    """Every version numbered above `after`, oldest first, documents included."""
    return await conn.fetch(f"SELECT {_PROGRAM_COLUMNS} FROM program_versions WHERE version > $1 ORDER BY version",
                            after)


async def program_versions(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT version, source, actor, created_at, effective_from FROM program_versions"
                            " ORDER BY version DESC")


async def insert_program_version(conn: asyncpg.Connection, *, document: dict[str, Any], source: str, actor: str,
                                 effective_from: datetime) -> asyncpg.Record:
    """A new version, numbered after the latest (call under lock_program_versions)."""
    return await conn.fetchrow(
        "INSERT INTO program_versions (version, document, source, actor, effective_from)"
        " SELECT coalesce(max(version), 0) + 1, $1::jsonb, $2, $3, $4 FROM program_versions"
        f" RETURNING {_PROGRAM_COLUMNS}",
        json.dumps(document), source, actor, effective_from,
    )


async def restore_program_versions(conn: asyncpg.Connection, *, versions: Sequence[Any]) -> list[int]:
    """Versions published by a ledger (ProgramVersionPublishedPayload) that this database
    lacks, with their numbers and times. Returns the numbers added."""
    if not versions:
        return []
    rows = await conn.fetch(
        "INSERT INTO program_versions (version, document, source, actor, created_at, effective_from)"
        " SELECT * FROM unnest($1::int[], $2::jsonb[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[])"
        " ON CONFLICT (version) DO NOTHING RETURNING version",
        [v.version for v in versions], [json.dumps(v.document) for v in versions], [v.source for v in versions],
        [v.actor for v in versions], [v.created_at for v in versions], [v.effective_from for v in versions],
    )
    return sorted(r["version"] for r in rows)


# ---- scheduler ------------------------------------------------------------------------------

_DUE_CUSTOMERS = """
SELECT customer_id FROM (
    SELECT customer_id FROM lots WHERE pending AND matures_at <= $1
    UNION SELECT customer_id FROM lots WHERE remaining_points > 0 AND NOT pending AND expires_at <= $1
    UNION SELECT customer_id FROM lots WHERE remaining_points > 0 AND NOT pending AND expires_at <= $2
                                              AND reminded_on IS NULL AND NOT history
    UNION SELECT customer_id FROM holds WHERE state = 'held' AND expires_at <= $1
    UNION SELECT customer_id FROM lots WHERE qualifying AND occurred_at > $3 AND occurred_at <= $4
) due
WHERE customer_id > $5
ORDER BY customer_id
LIMIT $6
"""


async def due_customers(
    conn: asyncpg.Connection, *, now: datetime, remind_until: datetime, aged_out_from: datetime,
    aged_out_until: datetime, after: str, limit: int,
) -> list[str]:
    """Customers with something for the scheduler: lots to mature, expire or remind of, holds
    timed out, or qualifying points that left the tier window (from, until]."""
    rows = await conn.fetch(_DUE_CUSTOMERS, now, remind_until, aged_out_from, aged_out_until, after, limit)
    return [r["customer_id"] for r in rows]


async def scheduler_mark(conn: asyncpg.Connection, *, name: str) -> datetime | None:
    return await conn.fetchval("SELECT value FROM scheduler_marks WHERE name = $1", name)


async def set_scheduler_mark(conn: asyncpg.Connection, *, name: str, value: datetime) -> None:
    await conn.execute(
        "INSERT INTO scheduler_marks (name, value) VALUES ($1, $2)"
        " ON CONFLICT (name) DO UPDATE SET value = greatest(scheduler_marks.value, EXCLUDED.value)",
        name, value)


# ---- read side and metrics ------------------------------------------------------------------


async def next_expiry(conn: asyncpg.Connection, *, customer_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT expires_at, sum(remaining_points) AS points FROM lots"
        " WHERE customer_id = $1 AND remaining_points > 0 AND NOT pending"
        " GROUP BY expires_at ORDER BY expires_at LIMIT 1",
        customer_id,
    )


async def totals(conn: asyncpg.Connection) -> dict[str, int]:
    """Ledger-wide sums for the liability and invariant gauges."""
    row = await conn.fetchrow(
        """
        SELECT coalesce(sum(debits_posted - credits_posted), 0) AS posted_imbalance,
               coalesce(sum(debits_pending - credits_pending), 0) AS pending_imbalance,
               coalesce(sum(credits_posted - debits_posted - debits_pending) FILTER (WHERE kind = 'available'), 0)
                   AS available,
               coalesce(sum(debits_pending) FILTER (WHERE kind = 'available'), 0) AS held,
               coalesce(sum(credits_posted - debits_posted) FILTER (WHERE kind = 'pending'), 0) AS pending,
               coalesce(sum(debits_posted - credits_posted) FILTER (WHERE kind = 'debt'), 0) AS debt,
               coalesce(sum(credits_posted - debits_posted) FILTER (WHERE kind = 'redemption'), 0) AS redeemed,
               coalesce(sum(credits_posted - debits_posted) FILTER (WHERE kind = 'expiry'), 0) AS expired,
               coalesce(sum(debits_posted - credits_posted) FILTER (WHERE kind = 'issuance'), 0) AS issued
        FROM accounts
        """
    )
    return {k: int(v) for k, v in row.items()}
