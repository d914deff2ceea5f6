"""The scheduler: mature, expire, remind, void timed-out holds, re-tier; restartable in chunks."""

import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import asyncpg

from services.ledger import domain as d
from services.ledger import metrics
from services.ledger.service import Emitter, Ledger, UnitOfWork, balance_after, due_at
from shared.events.points import (
    PointsWillExpire,
    PointsWillExpirePayload,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class SchedulerRun:
    customers: int = 0
    matured_points: int = 0
    expired_points: int = 0
    voided_holds: int = 0
    reminders: int = 0
    tier_changes: int = 0


async def run_scheduler(pool: asyncpg.Pool, ledger: Ledger, *, now: datetime | None = None) -> SchedulerRun:
    """Mature lots whose return window closed, void timed-out holds, expire lots, remind of
    expiries, re-tier customers whose points left the window. Restartable: each chunk of
    customers is one transaction, and every transfer and event id derives from the lot or
    hold (and date), so a re-run after a crash repeats nothing."""
    started = time.perf_counter()
    now = now or ledger.clock()
    s = ledger.settings
    program = ledger.programs.at(now).program
    window = timedelta(days=program.tier_window_days)
    # Re-tier whoever had qualifying points leave the window since the last complete run
    # (a persisted mark); re-tiering twice changes nothing, so a crash mid-run costs nothing.
    aged_out_until = now - window
    async with pool.acquire() as conn:
        aged_out_from = await ledger.store(conn).scheduler_mark(name="aged_out_until") or _EPOCH
    run = SchedulerRun()
    after = ""
    while True:
        async with pool.acquire() as conn:
            chunk = await ledger.store(conn).due_customers(
                now=now, remind_until=now + timedelta(days=s.expiry_reminder_days),
                aged_out_from=min(aged_out_from, aged_out_until), aged_out_until=aged_out_until, after=after,
                limit=s.scheduler_batch_customers)
            if not chunk:
                break
            after = chunk[-1]
            async with conn.transaction():
                uow = await _schedule_chunk(conn, ledger, chunk, now, run)
            uow.count_postings()  # once committed
    if run.customers:  # a ledger at rest writes nothing
        async with pool.acquire() as conn:
            await ledger.store(conn).set_scheduler_mark(name="aged_out_until", value=aged_out_until)
    metrics.SCHEDULER_SECONDS.observe(time.perf_counter() - started)
    return run


async def _schedule_chunk(conn: asyncpg.Connection, ledger: Ledger, chunk: list[str], now: datetime,
                          run: SchedulerRun) -> UnitOfWork:
    uow = UnitOfWork(conn, ledger, now)
    out = Emitter(ledger, now)
    await uow.lock(chunk)
    ids = sorted(uow.books)
    qualifying = await uow.store.qualifying_points(customer_ids=ids, window_start=uow.window_start)
    uow.attach_lots(await uow.store.open_lots(customer_ids=ids))
    uow.attach_holds(await uow.store.timed_out_holds(customer_ids=ids, now=now))
    remind_until = now + timedelta(days=ledger.settings.expiry_reminder_days)
    today = now.date()
    for cid in ids:
        book = uow.books[cid]
        run.customers += 1
        voided, matured, expired = due_at(uow, out, book, at=now)
        run.voided_holds += voided
        run.matured_points += matured
        run.expired_points += expired
        lots = sorted(book.lots.values(), key=lambda x: (x.expires_at, str(x.lot_id)))
        reminders: dict[date, int] = {}
        for lot in lots:
            # Never a reminder for imported history: no message is ever sent because of it.
            if (not lot.pending and lot.remaining_points > 0 and lot.reminded_on is None and not lot.history
                    and lot.expires_at <= remind_until):
                day = lot.expires_at.astimezone(timezone.utc).date()
                reminders[day] = reminders.get(day, 0) + lot.remaining_points
                lot.reminded_on, lot.changed = today, True
        for day, points in sorted(reminders.items()):
            run.reminders += 1
            out.emit(PointsWillExpire, PointsWillExpirePayload(amount_points=points, balance=balance_after(book.balance()),
                                                               expires_on=day),
                     customer_id=cid, cause=f"remind:{cid}:{day.isoformat()}")
        moved_tier = d.requalify(book, uow.program, qualifying.get(cid, 0))
        if moved_tier:
            run.tier_changes += 1
            out.tier_moved(moved_tier, cause=f"window:{cid}:{today.isoformat()}:{moved_tier.to_tier}")
    await uow.save(out.messages)
    return uow
