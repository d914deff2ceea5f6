"""SQL of the engagement service. Functions take a connection and never commit: the use
case owns the transaction."""

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

# ---- customers, contact data, consent ------------------------------------------------------

async def count_purchase(conn: asyncpg.Connection, *, customer_id: str, occurred_at: datetime) -> int:
    """One more sale for the customer (history too); returns their sale count after it."""
    return await conn.fetchval(
        """INSERT INTO customers (customer_id, purchases, first_sale_at) VALUES ($1, 1, $2)
           ON CONFLICT (customer_id) DO UPDATE SET purchases = customers.purchases + 1,
             first_sale_at = LEAST(customers.first_sale_at, EXCLUDED.first_sale_at)
           RETURNING purchases""", customer_id, occurred_at)


async def ensure_customer(conn: asyncpg.Connection, customer_id: str) -> None:
    await conn.execute("INSERT INTO customers (customer_id) VALUES ($1) ON CONFLICT DO NOTHING", customer_id)


async def set_tier(conn: asyncpg.Connection, *, customer_id: str, tier: str) -> None:
    await conn.execute("""INSERT INTO customers (customer_id, tier) VALUES ($1, $2)
                          ON CONFLICT (customer_id) DO UPDATE SET tier = EXCLUDED.tier""", customer_id, tier)


async def lock_customer(conn: asyncpg.Connection, customer_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM customers WHERE customer_id = $1 FOR UPDATE", customer_id)


async def set_contact(conn: asyncpg.Connection, *, customer_id: str, email: str | None, phone: str | None,
                      locale: str | None, time_zone: str | None, now: datetime) -> None:
    await conn.execute(
        """INSERT INTO customers (customer_id, email, phone, locale, time_zone, contact_updated_at)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (customer_id) DO UPDATE SET email = EXCLUDED.email, phone = EXCLUDED.phone,
             locale = EXCLUDED.locale, time_zone = EXCLUDED.time_zone,
             contact_updated_at = EXCLUDED.contact_updated_at, erased_at = NULL""",
        customer_id, email, phone, locale, time_zone, now)


async def consents(conn: asyncpg.Connection, customer_id: str) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch("SELECT * FROM consents WHERE customer_id = $1", customer_id)
    return {r["channel"]: r for r in rows}


async def set_consent(conn: asyncpg.Connection, *, customer_id: str, channel: str, granted: bool, source: str,
                      now: datetime) -> None:
    await conn.execute(
        """INSERT INTO consents (customer_id, channel, granted, source, changed_at) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (customer_id, channel) DO UPDATE SET granted = EXCLUDED.granted,
             source = EXCLUDED.source, changed_at = EXCLUDED.changed_at""",
        customer_id, channel, granted, source, now)


async def erase_customer(conn: asyncpg.Connection, *, customer_id: str, now: datetime) -> None:
    """Contact data and consent gone; messages' and answers' personal content removed. The
    aggregates (sent, answered, scores) stay: they name no one but the pseudonymous id."""
    await conn.execute("""UPDATE customers SET email = NULL, phone = NULL, locale = NULL, time_zone = NULL,
                          erased_at = $2 WHERE customer_id = $1""", customer_id, now)
    await conn.execute("DELETE FROM consents WHERE customer_id = $1", customer_id)
    await conn.execute("UPDATE messages SET subject = NULL, body = NULL WHERE customer_id = $1", customer_id)
    await conn.execute("UPDATE surveys SET remark = NULL WHERE customer_id = $1", customer_id)
    await conn.execute("UPDATE followups SET remark = NULL, resolution = NULL WHERE customer_id = $1", customer_id)
    await conn.execute("UPDATE timers SET context = '{}' WHERE customer_id = $1", customer_id)


# ---- sales -------------------------------------------------------------------------------

async def insert_sale(conn: asyncpg.Connection, *, purchase_id: str, source: str, customer_id: str, store_id: str,
                      category: str | None, total: Decimal, currency: str, occurred_at: datetime) -> None:
    await conn.execute(
        """INSERT INTO sales (purchase_id, source, customer_id, store_id, category, total, currency, occurred_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING""",
        purchase_id, source, customer_id, store_id, category, total, currency, occurred_at)


async def mark_returned(conn: asyncpg.Connection, *, purchase_id: str, source: str) -> None:
    await conn.execute("UPDATE sales SET returned = true WHERE purchase_id = $1 AND source = $2", purchase_id, source)


async def sale(conn: asyncpg.Connection, *, purchase_id: str, customer_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM sales WHERE purchase_id = $1 AND customer_id = $2 LIMIT 1",
                               purchase_id, customer_id)


async def sales_of(conn: asyncpg.Connection, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], asyncpg.Record]:
    """(customer_id, purchase_id) -> the sale (store, category, returned), for the sales known."""
    if not pairs:
        return {}
    rows = await conn.fetch(
        """SELECT DISTINCT ON (s.customer_id, s.purchase_id) s.customer_id, s.purchase_id, s.store_id, s.category,
                  s.returned FROM sales s
           JOIN unnest($1::text[], $2::text[]) AS w(customer_id, purchase_id) USING (customer_id, purchase_id)""",
        [p[0] for p in pairs], [p[1] for p in pairs])
    return {(r["customer_id"], r["purchase_id"]): r for r in rows}


async def first_touch(conn: asyncpg.Connection, rows: Sequence[tuple[str, str, datetime]]) -> None:
    await conn.execute(
        """UPDATE sales s SET first_touch_at = w.at FROM unnest($1::text[], $2::text[], $3::timestamptz[])
             AS w(customer_id, purchase_id, at)
           WHERE s.customer_id = w.customer_id AND s.purchase_id = w.purchase_id AND s.first_touch_at IS NULL""",
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


# ---- journey versions ------------------------------------------------------------------------

async def latest_journeys(conn: asyncpg.Connection, *, source: str | None = None) -> asyncpg.Record | None:
    if source is None:
        return await conn.fetchrow("SELECT * FROM journey_versions ORDER BY version DESC LIMIT 1")
    return await conn.fetchrow("SELECT * FROM journey_versions WHERE source = $1 ORDER BY version DESC LIMIT 1",
                               source)


async def journeys_version(conn: asyncpg.Connection, version: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM journey_versions WHERE version = $1", version)


async def save_journeys(conn: asyncpg.Connection, *, document: dict, digest: str, source: str, actor: str) -> int:
    # The table lock serialises savers (two instances starting at once with a new file).
    await conn.execute("LOCK TABLE journey_versions IN SHARE ROW EXCLUSIVE MODE")
    return await conn.fetchval(
        """INSERT INTO journey_versions (version, document, digest, source, actor)
           SELECT coalesce(max(version), 0) + 1, $1, $2, $3, $4 FROM journey_versions RETURNING version""",
        json.dumps(document), digest, source, actor)


# ---- journey instances and timers ----------------------------------------------------------

async def start_instance(conn: asyncpg.Connection, *, instance_id: uuid.UUID, customer_id: str, journey: str,
                         version: int, trigger_event_id: uuid.UUID, purchase_id: str | None, single: bool,
                         now: datetime) -> bool:
    """False when the journey allows one active instance per customer and one is active."""
    status = await conn.execute(
        """INSERT INTO journey_instances (instance_id, customer_id, journey, journey_version, trigger_event_id,
             purchase_id, single, status, started_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8)
           ON CONFLICT DO NOTHING""",
        instance_id, customer_id, journey, version, trigger_event_id, purchase_id, single, now)
    return status.endswith(" 1")


async def active_instances(conn: asyncpg.Connection, *, customer_id: str, journeys: Sequence[str],
                           purchase_id: str | None = None) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT * FROM journey_instances WHERE customer_id = $1 AND status = 'active' AND journey = ANY($2)
           AND ($3::text IS NULL OR purchase_id = $3)""", customer_id, list(journeys), purchase_id)


async def end_instances(conn: asyncpg.Connection, *, instance_ids: Sequence[uuid.UUID], status: str,
                        reason: str | None, now: datetime) -> list[asyncpg.Record]:
    """End instances; their scheduled timers are skipped. Returns those timers."""
    if not instance_ids:
        return []
    await conn.execute("""UPDATE journey_instances SET status = $2, exit_reason = $3, ended_at = $4
                          WHERE instance_id = ANY($1) AND status = 'active'""", list(instance_ids), status, reason, now)
    return await conn.fetch(
        """UPDATE timers SET status = 'skipped', reason = $2, completed_at = $3
           WHERE instance_id = ANY($1) AND status = 'scheduled' RETURNING *""", list(instance_ids), reason, now)


async def finish_instances_without_timers(conn: asyncpg.Connection, instance_ids: Sequence[uuid.UUID],
                                          now: datetime) -> None:
    await conn.execute(
        """UPDATE journey_instances i SET status = 'done', ended_at = $2
           WHERE i.instance_id = ANY($1) AND i.status = 'active'
             AND NOT EXISTS (SELECT 1 FROM timers t WHERE t.instance_id = i.instance_id AND t.status = 'scheduled')""",
        list(instance_ids), now)


TIMER_COLUMNS = ("timer_id", "instance_id", "customer_id", "journey", "journey_version", "step", "trigger_event_id",
                 "purchase_id", "purchase_source", "due_at", "valid_until", "status", "context", "created_at")


async def insert_timers(conn: asyncpg.Connection, rows: Sequence[tuple]) -> None:
    """Rows in TIMER_COLUMNS order; a timer already there (same idempotency key) stays as it is."""
    if not rows:
        return
    await conn.executemany(
        f"""INSERT INTO timers ({", ".join(TIMER_COLUMNS)})
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) ON CONFLICT (timer_id) DO NOTHING""",
        rows)


# The due scan: the partial index timers_due (status = 'scheduled') in due order, rows other
# dispatchers hold skipped.
CLAIM_DUE = """SELECT * FROM timers WHERE status = 'scheduled' AND due_at <= $1
               ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED"""


async def claim_due(conn: asyncpg.Connection, *, now: datetime, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(CLAIM_DUE, now, limit)


async def lock_customers(conn: asyncpg.Connection, customer_ids: Sequence[str]) -> dict[str, asyncpg.Record]:
    """Locked in id order (no deadlock between dispatchers): two never decide one customer's caps at once."""
    rows = await conn.fetch("""SELECT * FROM customers WHERE customer_id = ANY($1) ORDER BY customer_id
                               FOR UPDATE""", sorted(set(customer_ids)))
    return {r["customer_id"]: r for r in rows}


async def consents_of(conn: asyncpg.Connection, customer_ids: Sequence[str]) -> dict[tuple[str, str], bool]:
    rows = await conn.fetch("SELECT customer_id, channel, granted FROM consents WHERE customer_id = ANY($1)",
                            list(set(customer_ids)))
    return {(r["customer_id"], r["channel"]): r["granted"] for r in rows}


async def recent_messages(conn: asyncpg.Connection, customer_ids: Sequence[str],
                          since: datetime) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT customer_id, channel, capped, survey, sent_at FROM messages
           WHERE customer_id = ANY($1) AND sent_at > $2 AND (capped OR survey)""", list(set(customer_ids)), since)


def _columns(rows: Sequence[tuple]) -> list[list]:
    """Rows as one list per column: a batch is one statement over unnest($1, $2, ...), not a
    statement per row."""
    return [list(column) for column in zip(*rows, strict=True)]


async def complete_timers(conn: asyncpg.Connection, rows: Sequence[tuple[uuid.UUID, str, str | None, datetime]]) -> None:
    """(timer_id, status, reason, completed_at); one row per timer."""
    if rows:
        await conn.execute(
            """UPDATE timers t SET status = w.status, reason = w.reason, completed_at = w.completed_at
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[]) AS w(timer_id, status, reason,
                 completed_at)
               WHERE t.timer_id = w.timer_id""", *_columns(rows))


async def reschedule_timers(conn: asyncpg.Connection, rows: Sequence[tuple[uuid.UUID, datetime, int, str]]) -> None:
    """(timer_id, due_at, attempts, reason): deferred or to be retried; one row per timer."""
    if rows:
        await conn.execute(
            """UPDATE timers t SET due_at = w.due_at, attempts = w.attempts, reason = w.reason
               FROM unnest($1::uuid[], $2::timestamptz[], $3::integer[], $4::text[]) AS w(timer_id, due_at, attempts,
                 reason)
               WHERE t.timer_id = w.timer_id""", *_columns(rows))


async def record_decisions(conn: asyncpg.Connection, rows: Sequence[tuple[uuid.UUID, datetime, str, str | None,
                                                                         datetime | None]]) -> None:
    if rows:
        await conn.copy_records_to_table("decisions", records=rows,
                                         columns=["timer_id", "decided_at", "decision", "reason", "until_at"])


async def insert_messages(conn: asyncpg.Connection, rows: Sequence[tuple]) -> None:
    if rows:
        await conn.execute(
            """INSERT INTO messages (touchpoint_id, customer_id, channel, journey, step, capped, survey, sent_at,
                 subject, body)
               SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::boolean[],
                 $7::boolean[], $8::timestamptz[], $9::text[], $10::text[])
               ON CONFLICT DO NOTHING""", *_columns(rows))


async def timeline(conn: asyncpg.Connection, customer_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT t.timer_id, t.journey, t.step, t.due_at, t.status, t.reason, t.attempts, t.completed_at
           FROM timers t WHERE t.customer_id = $1 ORDER BY t.due_at, t.step""", customer_id)


def json_context(context: Any) -> dict:
    return context if isinstance(context, dict) else json.loads(context or "{}")
