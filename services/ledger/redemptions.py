"""The redemption saga from rewards.events: hold, post, void, refund; late redemptions."""

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from services.ledger import domain as d
from services.ledger import metrics
from services.ledger.service import (
    Emitter,
    Ledger,
    UnitOfWork,
    balance_after,
    batch_done,
    due_at,
    spend_time,
)
from shared.events.points import (
    PointsHeld,
    PointsHeldPayload,
    PointsHoldRejected,
    PointsHoldRejectedPayload,
    PointsRedeemed,
    PointsRedeemedPayload,
    PointsReleased,
    PointsReleasedPayload,
)
from shared.events.rewards import SHIPMENT_EVENT_TYPES
from shared.pipeline import Batch

log = logging.getLogger(__name__)

# rewards.events types that move no points (a physical reward shipped or delivered): read,
# claimed in the inbox and skipped, never dead-lettered as unknown.
NO_POINTS = frozenset(cls.model_fields["type"].default for cls in SHIPMENT_EVENT_TYPES)


def _hold_expiry(ledger: Ledger, requested_timeout_s: int, now: datetime) -> datetime:
    s = ledger.settings
    timeout_s = requested_timeout_s if requested_timeout_s > 0 else s.hold_timeout_s
    return now + timedelta(seconds=min(timeout_s, s.max_hold_timeout_s))


async def apply_rewards(ledger: Ledger, batch: Batch[Any]) -> None:
    """Holds, posts, voids and refunds for the redemption saga: the batch's one transaction."""
    started = time.perf_counter()
    conn, now = batch.conn, ledger.clock()
    uow = UnitOfWork(conn, ledger, now)
    out = Emitter(ledger, now)
    events = [e for e in batch.events if e.type not in NO_POINTS]
    await uow.lock([e.customer_id for e in events if e.customer_id])
    # With the holds named, those of the requesting customers that timed out: a spend
    # first voids them (due_at).
    holds = await uow.store.holds_by_id(
        redemption_ids=[e.payload.redemption_id for e in events],
        timed_out_of=sorted({e.customer_id for e in events if e.type == "RedemptionRequested" and e.customer_id}),
        now=now)
    await uow.lock([h.customer_id for h in holds.values()])
    requesting = {e.customer_id for e in events if e.type == "RedemptionRequested" and e.customer_id in uow.books}
    requesting = sorted(requesting | _may_redeem_late(events, holds))
    allocated = [uuid.UUID(lot_id) for h in holds.values() for lot_id in h.allocations]
    if requesting or allocated:
        uow.attach_lots(await uow.store.open_lots(customer_ids=requesting, lot_ids=allocated))
    uow.attach_holds(list(holds.values()))

    for item in batch.items:
        event = item.event
        reason = REDEMPTION_ACTIONS[event.type](uow, out, event)
        if reason is not None:
            batch.refuse(item, reason, [{"loc": ["payload", "redemption_id"], "msg": reason, "type": reason}])
    await uow.save([])
    batch.publish(*out.messages)
    batch.after_commit(lambda: batch_done("rewards", uow, batch, started=started))


def _may_redeem_late(events: Sequence[Any], holds: dict[uuid.UUID, d.Hold]) -> set[str]:
    """Customers whose fulfilment may find its hold voided (timed out before, or failed or
    cancelled earlier in this batch): a late redemption spends from all their available
    lots, so all must be loaded, as for a new hold."""
    voiding: set[uuid.UUID] = set()
    customers: set[str] = set()
    for e in events:
        rid = e.payload.redemption_id
        h = holds.get(rid)
        if h is None:
            continue
        if e.type in ("RedemptionFailed", "RedemptionCancelled"):
            voiding.add(rid)
        elif e.type == "RedemptionFulfilled" and (h.state == "voided" or rid in voiding):
            customers.add(h.customer_id)
    return customers


def _saga_kw(event: Any) -> dict[str, Any]:
    return dict(correlation_id=event.correlation_id, causation_id=str(event.event_id))


def _request(uow: UnitOfWork, out: Emitter, event: Any) -> str | None:
    """RedemptionRequested: hold the points, or answer why not (PointsHoldRejected)."""
    p, rid = event.payload, event.payload.redemption_id
    uow.counted[metrics.EVENTS.labels(event.type, "applied")] += 1
    book = uow.books.get(event.customer_id or "")

    def reject(reason: str, balance: d.Balance | None) -> None:
        uow.counted[metrics.HOLDS.labels(reason)] += 1
        empty = d.Balance(0, 0, 0, 0, uow.program.tiers[0].name, 0)
        out.emit(PointsHoldRejected, PointsHoldRejectedPayload(
            amount_points=p.cost_points, balance=balance_after(balance or empty), redemption_id=rid, reason=reason,
        ), customer_id=event.customer_id or "", cause=f"reject:{event.event_id}", **_saga_kw(event))

    if book is None:
        reject("account_unknown", None)
    elif rid in uow.holds:
        # A re-sent request: its first answer is already on its way (outbox); not final.
        reject("duplicate_redemption", book.balance())
    else:
        due_at(uow, out, book, at=spend_time(uow, event))
        try:
            h = d.hold(book, uow.journal, redemption_id=rid, amount_points=p.cost_points,
                       expires_at=_hold_expiry(uow.ledger, p.hold_timeout_s, spend_time(uow, event)))
        except d.LedgerError as exc:
            reject(exc.reason, book.balance())
            return None
        uow.holds[rid] = h
        uow.counted[metrics.HOLDS.labels("held")] += 1
        out.emit(PointsHeld, PointsHeldPayload(amount_points=h.amount_points, balance=balance_after(book.balance()),
                                               redemption_id=rid, hold_expires_at=h.expires_at),
                 customer_id=book.customer_id, cause=f"hold:{rid}", **_saga_kw(event))
    return None


def _fulfil(uow: UnitOfWork, out: Emitter, event: Any) -> str | None:
    """RedemptionFulfilled: post the hold; if it was voided meanwhile, redeem late (debt for
    what the balance no longer covers). Without any hold it is refused: a reward was given
    for points never held, which must not pass unnoticed."""
    rid = event.payload.redemption_id
    uow.counted[metrics.EVENTS.labels(event.type, "applied")] += 1
    h = uow.holds.get(rid)
    if h is None:
        return "fulfilled_without_hold"
    book = uow.books[h.customer_id]
    if d.post_hold(book, uow.journal, h):
        out.emit(PointsRedeemed, PointsRedeemedPayload(amount_points=h.amount_points,
                                                       balance=balance_after(book.balance()), redemption_id=rid),
                 customer_id=book.customer_id, cause=f"post:{rid}", **_saga_kw(event))
        return None
    if h.state == "voided":  # a late redemption spends, like a new hold
        due_at(uow, out, book, at=spend_time(uow, event))
    if late := d.redeem_after_void(book, uow.journal, h):
        # The reward was given after we voided the hold (we or the rewards' outbox lagged
        # past the timeout): the points are taken now, the shortfall as debt.
        uow.late_redemptions.append(late)
        out.emit(PointsRedeemed, PointsRedeemedPayload(
            amount_points=h.amount_points, balance=balance_after(late.balance), redemption_id=rid,
            after_hold_voided=True, debt_points_added=late.debt_points_added,
        ), customer_id=book.customer_id, cause=f"post:{rid}", **_saga_kw(event))
    return None


def _release(uow: UnitOfWork, out: Emitter, event: Any) -> str | None:
    """RedemptionFailed or RedemptionCancelled: void the hold, or refund the points when it
    was posted already (cancelled after fulfilment, a failure reported after posting).
    Nothing held (the request was rejected): nothing to do."""
    p, rid = event.payload, event.payload.redemption_id
    uow.counted[metrics.EVENTS.labels(event.type, "applied")] += 1
    h = uow.holds.get(rid)
    if h is None:
        return None
    book = uow.books[h.customer_id]
    if d.void_hold(book, uow.journal, h):
        out.emit(PointsReleased, PointsReleasedPayload(amount_points=h.amount_points, balance=balance_after(book.balance()),
                                                       redemption_id=rid, phase="void", reason=p.reason),
                 customer_id=book.customer_id, cause=f"void:{rid}", **_saga_kw(event))
    # The cancellation's own time, not this run's: a rebuild dates a refund lot the same way.
    elif h.state == "posted" and d.refund(book, uow.journal, h, uow.ledger.programs.at(event.recorded_at).program,
                                          now=event.occurred_at):
        out.emit(PointsReleased, PointsReleasedPayload(amount_points=h.amount_points, balance=balance_after(book.balance()),
                                                       redemption_id=rid, phase="refund", reason=p.reason),
                 customer_id=book.customer_id, cause=f"refund:{rid}", **_saga_kw(event))
    return None


def _ignore(uow: UnitOfWork, out: Emitter, event: Any) -> str | None:
    """A shipment or a delivery moves no points."""
    uow.counted[metrics.EVENTS.labels(event.type, "ignored")] += 1
    return None


# What each type on rewards.events does; a step returns a dead-letter reason when it cannot
# be applied.
REDEMPTION_ACTIONS: dict[str, Callable[[UnitOfWork, Emitter, Any], str | None]] = {
    "RedemptionRequested": _request,
    "RedemptionFulfilled": _fulfil,
    "RedemptionFailed": _release,
    "RedemptionCancelled": _release,
    "RedemptionShipped": _ignore,
    "RedemptionDelivered": _ignore,
}
assert set(REDEMPTION_ACTIONS) == NO_POINTS | {"RedemptionRequested", "RedemptionFulfilled", "RedemptionFailed",
                                                "RedemptionCancelled"}
