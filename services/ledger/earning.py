"""Earning from purchases.recorded: sales and claims earn, returns take back (one transaction
per batch, inside the shared pipeline's)."""

import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from services.ledger import domain as d
from services.ledger import metrics
from services.ledger import repository as repo
from services.ledger.program import Program
from services.ledger.service import (
    Emitter,
    Ledger,
    UnitOfWork,
    balance_after,
    batch_done,
)
from shared.events.points import (
    PointsReversed,
    PointsReversedPayload,
)
from shared.events.purchases import PurchasePayload
from shared.pipeline import Batch


def _key(payload: PurchasePayload) -> tuple[str, str]:
    return (payload.source, payload.purchase_id)


def _returned_lines(program: Program, payload: PurchasePayload) -> list[tuple[str, str, Decimal]]:
    rate = program.rate_to_program_currency(payload.currency)
    if rate is None:
        raise d.UnknownCurrency(f"no rate from {payload.currency} to {program.currency}")
    return [(line.line_id, line.sku, d.line_net_amount(line) * rate) for line in payload.lines]


@dataclass
class _Earning:
    """One batch of purchases.recorded: the books locked, the lots the returns take back."""

    uow: UnitOfWork
    out: Emitter
    earned: set[tuple[str, str]]
    lots_by_purchase: dict[tuple[str, str], d.Lot]


def _earn(e: _Earning, event: Any, program: Program, version: int) -> list[Any]:
    """A sale or a claim: earn, unless anonymous (until claimed) or already earned (a claim
    of a sale credited to its customer already)."""
    p = event.payload
    if event.customer_id is None or _key(p) in e.earned:
        return []
    e.earned.add(_key(p))
    return d.earn(e.uow.books[event.customer_id], e.uow.journal, program, version, purchase=p, now=e.uow.now)


def _reverse(e: _Earning, event: Any, program: Program, version: int) -> list[Any]:
    """A return: take back the points of the returned lines from the sale's lot."""
    p = event.payload
    lot = e.lots_by_purchase.get((p.source, p.original_purchase_id or ""))
    if lot is None:
        return []  # the sale earned nothing here (anonymous, never claimed): nothing to take back
    return d.reverse_return(e.uow.books[lot.customer_id], e.uow.journal, program, return_id=p.purchase_id, lot=lot,
                            returned=_returned_lines(program, p), now=e.uow.now)


# What each type on purchases.recorded does.
PURCHASE_ACTIONS: dict[str, Callable[[_Earning, Any, Program, int], list[Any]]] = {
    "PurchaseRecorded": _earn,
    "PurchaseClaimed": _earn,
    "ReturnRecorded": _reverse,
}


async def apply_purchases(ledger: Ledger, batch: Batch[Any]) -> None:
    """Earn for sales and claims, reverse for returns: the batch's one transaction (the
    pipeline claimed the inputs in the inbox and holds program_versions' lock)."""
    started = time.perf_counter()
    conn, now = batch.conn, ledger.clock()
    uow = UnitOfWork(conn, ledger, now)
    out = Emitter(ledger, now)
    applied: Tally[str] = Tally()
    events = batch.events
    sales = [e for e in events if e.type != "ReturnRecorded" and e.customer_id]
    returns = [e for e in events if e.type == "ReturnRecorded"]
    await uow.lock([e.customer_id for e in sales], create=True)
    await uow.lock([e.customer_id for e in returns if e.customer_id])
    # A purchase is (source, purchase_id): a POS sale and an e-shop order may share an id.
    earned = await repo.purchases_with_lots(conn, keys=[_key(e.payload) for e in sales])
    lots_by_purchase = await repo.lots_of_purchases(
        conn, keys=[(e.payload.source, e.payload.original_purchase_id) for e in returns
                    if e.payload.original_purchase_id])
    # A return is booked to the sale's customer; should the event name another, lock the
    # sale's customer too and re-read the lots under that lock.
    others = [lot.customer_id for lot in lots_by_purchase.values() if lot.customer_id not in uow.books]
    if others:
        await uow.lock(others)
        lots_by_purchase = await repo.lots_of_purchases(conn, keys=list(lots_by_purchase))
    uow.attach_lots(list(lots_by_purchase.values()))
    if any(ledger.programs.at(e.recorded_at).program.daily_cap_points is not None for e in sales):
        since = min(e.payload.occurred_at for e in sales) - timedelta(days=1)
        for (cid, day), points in (await repo.earned_by_day(conn, customer_ids=list(uow.books), since=since)).items():
            uow.books[cid].earned_by_day[day] = points

    earning = _Earning(uow, out, earned, lots_by_purchase)
    for item in batch.items:
        event = item.event
        applied[event.type] += 1
        p = event.payload
        cause = str(event.event_id)
        rules = ledger.programs.at(event.recorded_at)
        try:
            outcomes = PURCHASE_ACTIONS[event.type](earning, event, rules.program, rules.version)
        except d.LedgerError as exc:  # unknown currency, points out of range
            batch.refuse(item, exc.reason, [{"loc": ["payload"], "msg": str(exc), "type": exc.reason}])
            continue
        for o in outcomes:
            if isinstance(o, d.Earned):
                lots_by_purchase[_key(p)] = o.lot
                out.emit_points_earned(o, p, rules.version, correlation_id=event.correlation_id, causation_id=cause)
            elif isinstance(o, d.Reversed):
                if o.amount_points == 0:
                    continue
                out.emit(PointsReversed, PointsReversedPayload(
                    amount_points=o.amount_points, balance=balance_after(o.balance), return_id=o.return_id,
                    original_purchase_id=o.lot.purchase_id or "", source=o.lot.purchase_source,
                    debt_points_added=o.debt_points_added,
                ), customer_id=o.customer_id, cause=f"reverse:{d.purchase_ref(p.source, o.return_id)}",
                    correlation_id=event.correlation_id, causation_id=cause)
            else:
                out.tier_moved(o, cause=cause, correlation_id=event.correlation_id)
    await uow.save([])
    batch.publish(*out.messages)
    for event_type, n in applied.items():
        uow.counted[metrics.EVENTS.labels(event_type, "applied")] += n
    batch.after_commit(lambda: batch_done("purchases", uow, batch, started=started))
