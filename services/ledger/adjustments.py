"""Manual adjustments: the admin API applies them (and writes ledger.adjustments); a rebuild
applies them again from that topic."""

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.ledger import domain as d
from services.ledger import metrics
from services.ledger import repository as repo
from services.ledger.service import (
    ADJUSTMENTS_CONSUMER,
    PRODUCER,
    Emitter,
    Ledger,
    UnitOfWork,
    balance_after,
    batch_done,
    due_at,
    spend_time,
)
from shared.db import transaction
from shared.events import (
    derived_event_id,
)
from shared.events.adjustments import AdjustmentRecorded, AdjustmentRecordedPayload
from shared.events.points import (
    PointsAdjusted,
    PointsAdjustedPayload,
)
from shared.inbox import claim_new
from shared.outbox import OutboxMessage
from shared.pipeline import Batch

log = logging.getLogger(__name__)

@dataclass
class AdjustmentOutcome:
    created: bool
    adjustment_id: uuid.UUID
    customer_id: str
    amount_points: int
    reason_code: str
    actor: str
    note: str | None
    balance: d.Balance | None


def adjustment_recorded(
    *, adjustment_id: uuid.UUID, customer_id: str, amount_points: int, reason_code: str, actor: str,
    note: str | None, occurred_at: datetime,
) -> AdjustmentRecorded:
    """The admin's adjustment as an input of the ledger (ledger.adjustments). Its id derives
    from the adjustment id, so a re-sent request names the same event."""
    event_id = derived_event_id("ledger", "AdjustmentRecorded", str(adjustment_id))
    return AdjustmentRecorded(
        event_id=event_id, occurred_at=occurred_at, recorded_at=occurred_at, producer=PRODUCER,
        correlation_id=str(event_id), customer_id=customer_id,
        payload=AdjustmentRecordedPayload(adjustment_id=adjustment_id, customer_id=customer_id,
                                          amount_points=amount_points, reason_code=reason_code, actor=actor,
                                          note=note, occurred_at=occurred_at),
    )


def _apply_adjustment(uow: UnitOfWork, out: Emitter, event: AdjustmentRecorded) -> None:
    """One adjustment, the same whether the admin API just accepted it or it is replayed from
    ledger.adjustments: every id derives from the adjustment id and every date from the
    event's occurred_at, so a rebuild posts the very transfers, lot and PointsAdjusted of the
    original. The customer is locked with their lots attached. Raises InvalidAmount,
    InsufficientPoints."""
    p = event.payload
    book = uow.books[p.customer_id]
    # An opening balance brought over from the retailer's old system is history: its event
    # says so and its lot is never reminded of (no message is ever sent because of history).
    history = d.is_opening_balance(p.reason_code)
    due_at(uow, out, book, at=spend_time(uow, event))
    lot = d.adjust(book, uow.journal, uow.ledger.programs.at(event.recorded_at).program,
                   adjustment_id=p.adjustment_id, amount_points=p.amount_points, now=p.occurred_at)
    if lot is not None and history:
        lot.history = True
    out.emit(PointsAdjusted, PointsAdjustedPayload(amount_points=p.amount_points, balance=balance_after(book.balance()),
                                                   reason_code=p.reason_code, actor=p.actor, note=p.note),
             customer_id=p.customer_id, cause=f"adjust:{p.adjustment_id}", correlation_id=event.correlation_id,
             causation_id=str(event.event_id), history=history)
    uow.adjustments.append(d.Adjustment(p.adjustment_id, p.customer_id, p.amount_points, p.reason_code, p.actor,
                                        p.note, p.occurred_at))


async def adjust_points(
    conn: asyncpg.Connection, ledger: Ledger, *, adjustment_id: uuid.UUID, customer_id: str, amount_points: int,
    reason_code: str, actor: str, note: str | None,
) -> AdjustmentOutcome:
    """A manual credit or debit, audited (who, why) next to its transfer. Idempotent by
    adjustment_id. Raises InvalidAmount, InsufficientPoints.

    In the same transaction the adjustment goes out on ledger.adjustments (outbox) and its
    event id into this ledger's inbox for that stream: the consumer then skips it, while a
    ledger rebuilt from offset 0 applies it again. A refused adjustment rolls back with its
    event, so the topic only ever holds what was applied."""
    await ledger.programs.ensure_loaded(conn, wait=False)  # HTTP only
    now = ledger.clock()
    event = adjustment_recorded(adjustment_id=adjustment_id, customer_id=customer_id, amount_points=amount_points,
                                reason_code=reason_code, actor=actor, note=note, occurred_at=now)
    async with transaction(conn, opening=repo.APPLYING_INPUTS):
        uow = UnitOfWork(conn, ledger, now)
        await uow.lock([customer_id], create=True)
        existing = await uow.store.find_adjustment(adjustment_id=adjustment_id)
        if existing is not None:
            sent = {"customer_id": customer_id, "amount_points": amount_points, "reason_code": reason_code,
                    "actor": actor, "note": note}
            differing = sorted(k for k, v in sent.items() if getattr(existing, k) != v)
            if differing:
                raise d.AdjustmentIdReused(f"adjustment {adjustment_id} was applied with other {', '.join(differing)}")
            book = uow.books.get(existing.customer_id)
            return AdjustmentOutcome(False, adjustment_id, existing.customer_id, existing.amount_points,
                                     existing.reason_code, existing.actor, existing.note,
                                     book.balance() if book else None)
        book = uow.books[customer_id]
        uow.attach_lots(await uow.store.open_lots(customer_ids=[customer_id]))
        uow.attach_holds(await uow.store.timed_out_holds(customer_ids=[customer_id], now=now))
        out = Emitter(ledger, now)
        out.messages.append(OutboxMessage.event(ledger.adjustments_topic, event, key=customer_id))
        _apply_adjustment(uow, out, event)
        await claim_new(conn, consumer=ADJUSTMENTS_CONSUMER, event_ids=[event.event_id])
        await uow.save(out.messages)
    uow.count_postings()
    log.info("adjustment", extra={"customer_id": customer_id, "amount_points": amount_points,
                                  "reason_code": reason_code, "actor": actor})
    return AdjustmentOutcome(True, adjustment_id, customer_id, amount_points, reason_code, actor, note, book.balance())


async def apply_adjustments(ledger: Ledger, batch: Batch[Any]) -> None:
    """ledger.adjustments: one transaction per batch. In normal operation every event is
    already in the inbox (the admin API applied it) and nothing happens; replayed into an
    empty database, each is applied as the API applied it. One the balance no longer covers
    (the streams were replayed in another order) is dead-lettered, never half-applied."""
    started = time.perf_counter()
    conn, now = batch.conn, ledger.clock()
    uow = UnitOfWork(conn, ledger, now)
    out = Emitter(ledger, now)
    events = batch.events
    await uow.lock([e.customer_id for e in events], create=True)
    # The audit row is the proof an adjustment was applied, whatever event id carried it.
    applied = await uow.store.applied_adjustments(adjustment_ids=[e.payload.adjustment_id for e in events])
    to_apply = sorted({e.customer_id for e in events if e.payload.adjustment_id not in applied})
    if to_apply:
        uow.attach_lots(await uow.store.open_lots(customer_ids=to_apply))
        uow.attach_holds(await uow.store.timed_out_holds(customer_ids=to_apply, now=now))
    for item in batch.items:
        event = item.event
        if event.payload.adjustment_id in applied:
            continue
        try:
            _apply_adjustment(uow, out, event)
        except d.LedgerError as exc:  # the balance does not cover a debit; 0 or out-of-range points
            batch.refuse(item, exc.reason, [{"loc": ["payload", "amount_points"], "msg": str(exc),
                                             "type": exc.reason}])
            continue
        applied.add(event.payload.adjustment_id)
        uow.counted[metrics.EVENTS.labels(event.type, "applied")] += 1
    await uow.save([])
    batch.publish(*out.messages)
    batch.after_commit(lambda: batch_done("adjustments", uow, batch, started=started))
