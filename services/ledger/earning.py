"""Earning from purchases.recorded: sales and claims earn, returns take back (one transaction
per batch, inside the shared pipeline's); imported history earns by its policy."""

import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from services.ledger import domain as d
from services.ledger import metrics
from services.ledger.program import Program
from services.ledger.service import (
    Emitter,
    Ledger,
    UnitOfWork,
    balance_after,
    batch_done,
)
from shared.events.points import (
    PointsExpired,
    PointsExpiredPayload,
    PointsReversed,
    PointsReversedPayload,
)
from shared.events.purchases import PurchasePayload
from shared.pipeline import Batch


def _key(payload: PurchasePayload) -> tuple[str, str, str]:
    """A purchase's identity, as the purchases service keys it: channel, store, id."""
    return (payload.source, payload.store_id, payload.purchase_id)


def _returned_lines(program: Program, payload: PurchasePayload, lot: d.Lot) -> list[tuple[str, str, Decimal]]:
    """The returned lines in the program currency, at the rate the sale earned at (lots from
    before the rate was kept: the program's current rate)."""
    rate = lot.currency_rate if lot.currency_rate is not None else program.rate_to_program_currency(payload.currency)
    if rate is None:
        raise d.UnknownCurrency(f"no rate from {payload.currency} to {program.currency}")
    return [(line.line_id, line.sku, d.line_net_amount(line) * rate) for line in payload.lines]


def _earns(event: Any) -> bool:
    """Whether a purchases.recorded event moves points: live ones do, imported history only
    under the as-earned policy (analytics: the inbox claim and nothing else)."""
    return d.history_earns(event.payload.history, event.payload.import_policy)


@dataclass
class _Earning:
    """One batch of purchases.recorded: the books locked, the lots the returns take back."""

    uow: UnitOfWork
    out: Emitter
    earned: set[tuple[str, str, str]]
    lots_by_purchase: dict[tuple[str, str, str], d.Lot]


def _earn(e: _Earning, event: Any, program: Program, version: int) -> list[Any]:
    """A sale or a claim: earn, unless anonymous (until claimed) or already earned (a claim
    of a sale credited to its customer already)."""
    p = event.payload
    if event.customer_id is None or _key(p) in e.earned:
        return []
    e.earned.add(_key(p))
    return d.earn(e.uow.books[event.customer_id], e.uow.journal, program, version, purchase=p, now=e.uow.now,
                  history=p.history)


def _reverse(e: _Earning, event: Any, program: Program, version: int) -> list[Any]:
    """A return: take back the points of the returned lines from the sale's lot (of the
    return's own store), converted at the rate the sale earned at."""
    p = event.payload
    lot = e.lots_by_purchase.get((p.source, p.store_id, p.original_purchase_id or ""))
    if lot is None:
        return []  # the sale earned nothing here (anonymous, never claimed): nothing to take back
    return d.reverse_return(e.uow.books[lot.customer_id], e.uow.journal, program, return_id=p.purchase_id, lot=lot,
                            returned=_returned_lines(program, p, lot), now=e.uow.now, returned_at=p.occurred_at)


# What each type on purchases.recorded does.
PURCHASE_ACTIONS: dict[str, Callable[[_Earning, Any, Program, int], list[Any]]] = {
    "PurchaseRecorded": _earn,
    "PurchaseClaimed": _earn,
    "ReturnRecorded": _reverse,
}


async def apply_purchases(ledger: Ledger, batch: Batch[Any]) -> None:
    """Earn for sales and claims, reverse for returns: the batch's one transaction (the
    pipeline claimed the inputs in the inbox and holds program_versions' lock). Imported
    history under the analytics policy stops at the inbox."""
    started = time.perf_counter()
    conn, now = batch.conn, ledger.clock()
    uow = UnitOfWork(conn, ledger, now)
    out = Emitter(ledger, now)
    applied: Tally[str] = Tally()
    items = [item for item in batch.items if _earns(item.event)]
    if len(items) < len(batch.items):
        applied["history_analytics"] += len(batch.items) - len(items)
    if not items:  # nothing but analytics history: the inbox claim was all there was to do
        for event_type, n in applied.items():
            uow.counted[metrics.EVENTS.labels(event_type, "applied")] += n
        batch.after_commit(lambda: batch_done("purchases", uow, batch, started=started))
        return
    events = [item.event for item in items]
    sales = [e for e in events if e.type != "ReturnRecorded" and e.customer_id]
    returns = [e for e in events if e.type == "ReturnRecorded"]
    await uow.lock([e.customer_id for e in sales], create=True)
    await uow.lock([e.customer_id for e in returns if e.customer_id])
    # A purchase is (source, store_id, purchase_id): two stores of a chain, or a POS sale and
    # an e-shop order, may share an id.
    earned = await uow.store.purchases_with_lots(keys=[_key(e.payload) for e in sales])
    lots_by_purchase = await uow.store.lots_of_purchases(
        keys=[(e.payload.source, e.payload.store_id, e.payload.original_purchase_id) for e in returns
              if e.payload.original_purchase_id])
    # A return is booked to the sale's customer; should the event name another, lock the
    # sale's customer too and re-read the lots under that lock.
    others = [lot.customer_id for lot in lots_by_purchase.values() if lot.customer_id not in uow.books]
    if others:
        await uow.lock(others)
        lots_by_purchase = await uow.store.lots_of_purchases(keys=list(lots_by_purchase))
    uow.attach_lots(list(lots_by_purchase.values()))
    if sales and len(uow.program.tiers) > 1:
        # The tier of each sale is the one its qualifying points reached at its own time.
        window_days = max(ledger.programs.at(e.recorded_at).program.tier_window_days for e in sales)
        since = min(e.payload.occurred_at for e in sales) - timedelta(days=window_days)
        for cid, lots in (await uow.store.window_lots(customer_ids=list(uow.books), since=since)).items():
            uow.books[cid].window_lots = lots
    if any(ledger.programs.at(e.recorded_at).program.daily_cap_points is not None for e in sales):
        since = min(e.payload.occurred_at for e in sales) - timedelta(days=1)
        for (cid, day), points in (await uow.store.earned_by_day(customer_ids=list(uow.books), since=since)).items():
            uow.books[cid].earned_by_day[day] = points

    earning = _Earning(uow, out, earned, lots_by_purchase)
    for item in items:
        event = item.event
        applied[event.type] += 1
        p = event.payload
        cause, history = str(event.event_id), p.history
        rules = ledger.programs.at(event.recorded_at)
        try:
            program = ledger.programs.with_rate_for(rules, p.currency)
            outcomes = PURCHASE_ACTIONS[event.type](earning, event, program, rules.version)
        except d.LedgerError as exc:  # unknown currency, points out of range
            batch.refuse(item, exc.reason, [{"loc": ["payload"], "msg": str(exc), "type": exc.reason}])
            continue
        for o in outcomes:
            if isinstance(o, d.Earned):
                lots_by_purchase[_key(p)] = o.lot
                out.emit_points_earned(o, p, rules.version, correlation_id=event.correlation_id, causation_id=cause,
                                       history=history)
                if history:
                    _settle_history_lot(uow, out, uow.books[o.customer_id], o.lot)
            elif isinstance(o, d.Reversed):
                if o.amount_points == 0:
                    continue
                out.emit(PointsReversed, PointsReversedPayload(
                    amount_points=o.amount_points, balance=balance_after(o.balance), return_id=o.return_id,
                    original_purchase_id=o.lot.purchase_id or "", source=o.lot.purchase_source,
                    debt_points_added=o.debt_points_added,
                ), customer_id=o.customer_id, cause=f"reverse:{d.purchase_ref(p.source, o.return_id, p.store_id)}",
                    correlation_id=event.correlation_id, causation_id=cause, history=history)
            else:
                out.tier_moved(o, cause=cause, correlation_id=event.correlation_id, history=history)
    await uow.save([])
    batch.publish(*out.messages)
    for event_type, n in applied.items():
        uow.counted[metrics.EVENTS.labels(event_type, "applied")] += n
    batch.after_commit(lambda: batch_done("purchases", uow, batch, started=started))


def _settle_history_lot(uow: UnitOfWork, out: Emitter, book: d.CustomerBook, lot: d.Lot) -> None:
    """A lot of imported history is brought to the ledger's clock at once: d.earn credited it
    available if its return window had closed by now, and what would have expired by now is
    recorded as expired here, its event marked history (the lot is never reminded of: see
    the scheduler). Its returns, dated before the expiry, take the expired points back
    (d.reverse_return)."""
    first_transfer = len(uow.journal.transfers)
    expired = d.expire(book, uow.journal, lot, now=uow.now)
    if expired:
        cause = ",".join(str(t.transfer_id) for t in uow.journal.transfers[first_transfer:])
        out.emit(PointsExpired, PointsExpiredPayload(amount_points=expired, balance=balance_after(book.balance()),
                                                     lot_ids=[str(lot.lot_id)]), customer_id=book.customer_id,
                 cause=f"expire:{cause}", history=True)
