"""Use cases of the ledger. Each takes its inputs and dependencies, owns one transaction:
claim the inputs in the inbox, lock the customers, load what the rules need, apply the
rules (domain.py), write transfers, lots, accounts and the outbox together, commit.

Concurrency: every change to a customer's points happens with that customer's row locked
(SELECT ... FOR UPDATE, in customer_id order). Per-partition ordering already serialises one
customer's events inside one consumer; the lock is what makes it hold across consumers,
instances, the scheduler and the admin API, so no two holds can both spend the same points.
The accounts' CHECK constraints are the last line: an overdraft fails the transaction.
"""

import json
import logging
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
from pydantic import BaseModel

from services.ledger import domain as d
from services.ledger import metrics
from services.ledger import repository as repo
from services.ledger.program import STACKING_ORDER, Program
from services.ledger.settings import LedgerSettings
from services.ledger.versions import ProgramStore
from shared.db import transaction
from shared.events import (
    SCHEMA_VERSION,
    Envelope,
    derived_event_id,
    json_opt_str,
    json_str,
    utcnow,
)
from shared.events.adjustments import AdjustmentRecorded, AdjustmentRecordedPayload
from shared.events.points import (
    BalanceAfter,
    PointsAdjusted,
    PointsAdjustedPayload,
    PointsExpired,
    PointsExpiredPayload,
    PointsHeld,
    PointsHeldPayload,
    PointsHoldRejected,
    PointsHoldRejectedPayload,
    PointsMatured,
    PointsMaturedPayload,
    PointsRedeemed,
    PointsRedeemedPayload,
    PointsReleased,
    PointsReleasedPayload,
    PointsReversed,
    PointsReversedPayload,
    PointsWillExpire,
    PointsWillExpirePayload,
    TierChanged,
    TierChangedPayload,
)
from shared.events.purchases import PurchasePayload
from shared.events.rewards import (
    SHIPMENT_EVENT_TYPES,
)
from shared.inbox import claim_new
from shared.outbox import OutboxMessage, enqueue
from shared.pipeline import Batch
from shared.topics import LEDGER_ADJUSTMENTS, POINTS_DLQ, POINTS_EVENTS

log = logging.getLogger(__name__)

PRODUCER = "ledger"
PURCHASES_CONSUMER = "ledger.purchases"
REWARDS_CONSUMER = "ledger.rewards"
ADJUSTMENTS_CONSUMER = "ledger.adjustments"

Clock = Callable[[], datetime]


def make_clock(settings: LedgerSettings) -> Clock:
    if settings.clock_override is not None:
        fixed = settings.clock_override if settings.clock_override.tzinfo else settings.clock_override.replace(tzinfo=timezone.utc)
        return lambda: fixed
    if settings.clock_offset_s:
        offset = timedelta(seconds=settings.clock_offset_s)
        return lambda: utcnow() + offset
    return utcnow


@dataclass
class Ledger:
    """What every use case needs: settings, the clock and the program."""

    settings: LedgerSettings
    programs: ProgramStore
    clock: Clock = utcnow

    @property
    def points_topic(self) -> str:
        return self.settings.topic(POINTS_EVENTS)

    @property
    def dlq_topic(self) -> str:
        return self.settings.topic(POINTS_DLQ)

    @property
    def adjustments_topic(self) -> str:
        return self.settings.topic(LEDGER_ADJUSTMENTS)


# rewards.events types that move no points (a physical reward shipped or delivered): read,
# claimed in the inbox and skipped, never dead-lettered as unknown.
_NO_POINTS = frozenset(cls.model_fields["type"].default for cls in SHIPMENT_EVENT_TYPES)


# ---- outputs ------------------------------------------------------------------------------


def _balance(b: d.Balance) -> BalanceAfter:
    # model_construct: our own integers and strings need no validation (hot path).
    return BalanceAfter.model_construct(
        available_points=b.available_points, pending_points=b.pending_points, held_points=b.held_points,
        debt_points=b.debt_points, tier=b.tier, qualifying_points=b.qualifying_points,
    )


class Emitter:
    """Builds points.events envelopes for the outbox. Ids derive from the cause, so a
    re-run of the same cause emits the same ids (downstream inboxes drop the repeat)."""

    def __init__(self, ledger: Ledger, now: datetime) -> None:
        self._topic = ledger.points_topic
        self._now = now
        self._now_iso: str | None = None
        self.messages: list[OutboxMessage] = []

    def emit(self, cls: type[Envelope[Any]], payload: BaseModel, *, customer_id: str, cause: str,
             correlation_id: str | None = None, causation_id: str | None = None, history: bool = False) -> None:
        """`history`: caused by imported history; consumers (engagement) never message for it."""
        event_id = derived_event_id("ledger", cls.__name__, cause)
        if history:
            payload = payload.model_copy(update={"history": True})
        # model_construct: every field is built here from validated data; skipping validation
        # halves the cost of an event on the hot path. The payloads are validated models.
        event = cls.model_construct(event_id=event_id, occurred_at=self._now, recorded_at=self._now,
                                    producer=PRODUCER, correlation_id=correlation_id or str(event_id),
                                    causation_id=causation_id, customer_id=customer_id, payload=payload)
        # Built directly rather than with OutboxMessage.event, which serialises twice.
        self.messages.append(OutboxMessage(self._topic, customer_id, event.model_dump_json().encode(),
                                           {"type": cls.__name__, "correlation_id": event.correlation_id}))

    def emit_points_earned(self, o: d.Earned, p: PurchasePayload, rule_version: int, *,
                           correlation_id: str | None, causation_id: str | None, history: bool = False) -> None:
        """The hot path's emit: PointsEarned written from a template, several times cheaper
        than building and serialising the pydantic model. Every string from outside goes
        through the C JSON string encoder; the result validates as the contract's model
        (tests/unit/test_ledger_events.py holds it to that, hostile strings included)."""
        event_id = str(derived_event_id("ledger", "PointsEarned",
                                        f"earn:{d.purchase_ref(p.source, p.purchase_id, p.store_id)}"))
        if self._now_iso is None:
            self._now_iso = json_str(self._now.isoformat())
        now, lot, e, b = self._now_iso, o.lot, o.earning, o.balance
        correlation_id = correlation_id or event_id
        value = (
            f'{{"event_id":"{event_id}","type":"PointsEarned","schema_version":{SCHEMA_VERSION},'
            f'"occurred_at":{now},"recorded_at":{now},"producer":"{PRODUCER}",'
            f'"correlation_id":{json_str(correlation_id)},'
            f'"causation_id":{json_opt_str(causation_id)},'
            f'"customer_id":{json_str(o.customer_id)},"payload":{{"amount_points":{e.points},'
            f'"balance":{{"available_points":{b.available_points},"pending_points":{b.pending_points},'
            f'"held_points":{b.held_points},"debt_points":{b.debt_points},"tier":{json_str(b.tier)},'
            f'"qualifying_points":{b.qualifying_points}}},'
            f'"purchase_id":{json_str(p.purchase_id)},"source":{json_str(p.source)},"rule_version":{rule_version},'
            f'"pending":{"true" if lot.pending else "false"},'
            f'"matures_at":{json_str(lot.matures_at.isoformat()) if lot.pending else "null"},'
            f'"expires_at":{json_str(lot.expires_at.isoformat())},"tier_multiplier":{json_str(str(e.tier_multiplier))},'
            f'"breakdown":{_dumps(e.breakdown)},"history":{"true" if history else "false"}}}}}'
        )
        self.messages.append(OutboxMessage(self._topic, o.customer_id, value.encode(),
                                           {"type": "PointsEarned", "correlation_id": correlation_id}))

    def tier_moved(self, moved: d.TierMoved, *, cause: str, correlation_id: str | None = None,
                   history: bool = False) -> None:
        self.emit(TierChanged, TierChangedPayload(from_tier=moved.from_tier, to_tier=moved.to_tier,
                                                  qualifying_points=moved.qualifying_points,
                                                  balance=_balance(moved.balance)),
                  customer_id=moved.customer_id, cause=f"tier:{cause}", correlation_id=correlation_id,
                  history=history)


# ASCII-only output: lone surrogates or control characters in an id cannot break the JSON.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


# ---- persistence shared by the use cases --------------------------------------------------


class UnitOfWork:
    """The books of one transaction: customers loaded (locked), one journal, what changed."""

    def __init__(self, conn: asyncpg.Connection, ledger: Ledger, now: datetime) -> None:
        self.conn = conn
        self.ledger = ledger
        self.now = now
        # The version in force at this unit's time: for what no input dates (a new customer's
        # entry tier, the scheduler's round). An input's own rules come from the version in
        # force when it was recorded (ledger.programs.at).
        self.program = ledger.programs.at(now).program
        self.books: dict[str, d.CustomerBook] = {}
        self.journal = d.Journal(d.new_program_accounts())
        self.holds: dict[uuid.UUID, d.Hold] = {}
        self.late_redemptions: list[d.LateRedemption] = []
        self.adjustments: list[d.Adjustment] = []
        self.counted: Tally[Any] = Tally()  # metric children to increment once committed
        self._program_checked = False

    @property
    def window_start(self) -> datetime:
        return self.now - timedelta(days=self.program.tier_window_days)

    async def lock(self, customer_ids: Sequence[str], *, create: bool = False) -> None:
        wanted = [c for c in set(customer_ids) if c not in self.books]
        if not wanted:
            return
        found, latest = await repo.lock_customers(self.conn, customer_ids=wanted)
        if not self._program_checked:
            # Another instance may have saved a version since this one last looked: the
            # inputs of this transaction must earn under it if it is in force at their time.
            if latest is None:
                latest = await repo.latest_program_version(self.conn)
            if latest > self.ledger.programs.latest_version:
                await self.ledger.programs.refresh(self.conn)
                self.program = self.ledger.programs.at(self.now).program
                log.info("program versions saved elsewhere picked up",
                         extra={"rule_version": self.ledger.programs.latest_version})
            self._program_checked = True
        missing = sorted(c for c in wanted if c not in found)  # created in one order everywhere: no deadlock
        if missing and create:
            found.update(await repo.create_customers(self.conn, customer_ids=missing, tier=self.program.tiers[0].name))
        for book in found.values():
            self.books[book.customer_id] = book
            self.journal.accounts.update(book.accounts())

    def attach_lots(self, lots: Sequence[d.Lot]) -> None:
        for lot in lots:
            book = self.books.get(lot.customer_id)
            if book is not None:
                book.lots.setdefault(lot.lot_id, lot)

    def attach_holds(self, holds: Sequence[d.Hold]) -> None:
        for h in holds:
            self.holds.setdefault(h.redemption_id, h)
            book = self.books.get(h.customer_id)
            if book is not None:
                book.holds.setdefault(h.redemption_id, h)

    async def save(self, messages: Sequence[OutboxMessage]) -> None:
        conn, transfers = self.conn, self.journal.transfers
        lots = [lot for b in self.books.values() for lot in b.lots.values()]
        await repo.insert_transfers(conn, transfers=transfers)
        await repo.insert_lots(conn, lots=[x for x in lots if x.is_new])
        await repo.update_lots(conn, lots=[x for x in lots if x.changed and not x.is_new])
        await repo.save_holds(conn, holds=[h for h in self.holds.values() if h.is_new or h.changed])
        await repo.insert_adjustments(conn, adjustments=self.adjustments)
        await repo.update_customers(conn, books=self.books.values())
        # Last: the shared program-account rows are locked only for the end of the transaction.
        await repo.add_to_accounts(conn, transfers=transfers)
        await enqueue(conn, messages)

    def count_postings(self) -> None:
        """After commit: the business counters, from what was actually written."""
        by_code: Tally[d.Code] = Tally()
        points: Tally[d.Code] = Tally()
        issued = 0
        for t in self.journal.transfers:
            by_code[t.code] += 1
            points[t.code] += t.amount_points
            if t.debit_account_id == d.ISSUANCE:
                issued += t.amount_points
        for code, n in by_code.items():
            metrics.POSTINGS.labels(code.value).inc(n)
        metrics.POINTS_ISSUED.inc(issued)
        # Debt is owed for a return (against issuance) or a late redemption (against redemption).
        redeemed_as_debt = sum(t.amount_points for t in self.journal.transfers
                               if t.code is d.Code.DEBT and t.credit_account_id == d.REDEMPTION)
        metrics.POINTS_REVERSED.inc(points[d.Code.REVERSE] + points[d.Code.DEBT] - redeemed_as_debt)
        metrics.POINTS_REDEEMED.inc(points[d.Code.POST] + redeemed_as_debt)
        metrics.POINTS_EXPIRED.inc(points[d.Code.EXPIRE])
        for counter, n in self.counted.items():
            counter.inc(n)
        for late in self.late_redemptions:
            metrics.LATE_FULFILMENTS.labels("debt" if late.debt_points_added else "covered").inc()
            log.warning("fulfilment after the hold was voided: points redeemed late", extra={
                "customer_id": late.hold.customer_id, "redemption_id": str(late.hold.redemption_id),
                "amount_points": late.hold.amount_points, "taken_points": late.taken_points,
                "debt_points_added": late.debt_points_added})


def _batch_done(stream: str, uow: UnitOfWork, batch: Batch[Any], *, started: float) -> None:
    """After a batch's commit: its counters and figures."""
    uow.count_postings()
    metrics.BATCH_SIZE.labels(stream).observe(batch.read)
    metrics.BATCH_SECONDS.labels(stream).observe(time.perf_counter() - started)
    _latency(stream, batch.events)


def _latency(stream: str, events: Sequence[Any]) -> None:
    """One observation per batch, its oldest input: the worst latency, at a fraction of the
    cost of observing every event."""
    recorded = [event.recorded_at for event in events]
    if recorded:
        metrics.EVENT_LATENCY.labels(stream).observe(max((utcnow() - min(recorded)).total_seconds(), 0.0))


def count_dead_letter(reason: str) -> None:
    """After the commit, for each input the pipeline sent to points.dlq."""
    metrics.DEAD_LETTERS.labels(reason).inc()


# ---- earning from purchases.recorded ------------------------------------------------------


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
        batch.after_commit(lambda: _batch_done("purchases", uow, batch, started=started))
        return
    events = [item.event for item in items]
    sales = [e for e in events if e.type != "ReturnRecorded" and e.customer_id]
    returns = [e for e in events if e.type == "ReturnRecorded"]
    await uow.lock([e.customer_id for e in sales], create=True)
    await uow.lock([e.customer_id for e in returns if e.customer_id])
    # A purchase is (source, store_id, purchase_id): two stores of a chain, or a POS sale and
    # an e-shop order, may share an id.
    earned = await repo.purchases_with_lots(conn, keys=[_key(e.payload) for e in sales])
    lots_by_purchase = await repo.lots_of_purchases(
        conn, keys=[(e.payload.source, e.payload.store_id, e.payload.original_purchase_id) for e in returns
                    if e.payload.original_purchase_id])
    # A return is booked to the sale's customer; should the event name another, lock the
    # sale's customer too and re-read the lots under that lock.
    others = [lot.customer_id for lot in lots_by_purchase.values() if lot.customer_id not in uow.books]
    if others:
        await uow.lock(others)
        lots_by_purchase = await repo.lots_of_purchases(conn, keys=list(lots_by_purchase))
    uow.attach_lots(list(lots_by_purchase.values()))
    if sales and len(uow.program.tiers) > 1:
        # The tier of each sale is the one its qualifying points reached at its own time.
        window_days = max(ledger.programs.at(e.recorded_at).program.tier_window_days for e in sales)
        since = min(e.payload.occurred_at for e in sales) - timedelta(days=window_days)
        for cid, lots in (await repo.window_lots(conn, customer_ids=list(uow.books), since=since)).items():
            uow.books[cid].window_lots = lots
    if any(ledger.programs.at(e.recorded_at).program.daily_cap_points is not None for e in sales):
        since = min(e.payload.occurred_at for e in sales) - timedelta(days=1)
        for (cid, day), points in (await repo.earned_by_day(conn, customer_ids=list(uow.books), since=since)).items():
            uow.books[cid].earned_by_day[day] = points

    earning = _Earning(uow, out, earned, lots_by_purchase)
    for item in items:
        event = item.event
        applied[event.type] += 1
        p = event.payload
        cause, history = str(event.event_id), p.history
        rules = ledger.programs.at(event.recorded_at)
        try:
            outcomes = PURCHASE_ACTIONS[event.type](earning, event, rules.program, rules.version)
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
                    amount_points=o.amount_points, balance=_balance(o.balance), return_id=o.return_id,
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
    batch.after_commit(lambda: _batch_done("purchases", uow, batch, started=started))


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
        out.emit(PointsExpired, PointsExpiredPayload(amount_points=expired, balance=_balance(book.balance()),
                                                     lot_ids=[str(lot.lot_id)]), customer_id=book.customer_id,
                 cause=f"expire:{cause}", history=True)



# ---- the redemption saga from rewards.events ----------------------------------------------


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
    events = [e for e in batch.events if e.type not in _NO_POINTS]
    await uow.lock([e.customer_id for e in events if e.customer_id])
    # With the holds named, those of the requesting customers that timed out: a spend
    # first voids them (_due_at).
    holds = await repo.holds_by_id(
        conn, redemption_ids=[e.payload.redemption_id for e in events],
        timed_out_of=sorted({e.customer_id for e in events if e.type == "RedemptionRequested" and e.customer_id}),
        now=now)
    await uow.lock([h.customer_id for h in holds.values()])
    requesting = {e.customer_id for e in events if e.type == "RedemptionRequested" and e.customer_id in uow.books}
    requesting = sorted(requesting | _may_redeem_late(events, holds))
    allocated = [uuid.UUID(lot_id) for h in holds.values() for lot_id in h.allocations]
    if requesting or allocated:
        uow.attach_lots(await repo.open_lots(conn, customer_ids=requesting, lot_ids=allocated))
    uow.attach_holds(list(holds.values()))

    for item in batch.items:
        event = item.event
        reason = REDEMPTION_ACTIONS[event.type](uow, out, event)
        if reason is not None:
            batch.refuse(item, reason, [{"loc": ["payload", "redemption_id"], "msg": reason, "type": reason}])
    await uow.save([])
    batch.publish(*out.messages)
    batch.after_commit(lambda: _batch_done("rewards", uow, batch, started=started))


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
            amount_points=p.cost_points, balance=_balance(balance or empty), redemption_id=rid, reason=reason,
        ), customer_id=event.customer_id or "", cause=f"reject:{event.event_id}", **_saga_kw(event))

    if book is None:
        reject("account_unknown", None)
    elif rid in uow.holds:
        # A re-sent request: its first answer is already on its way (outbox); not final.
        reject("duplicate_redemption", book.balance())
    else:
        _due_at(uow, out, book, at=_spend_time(uow, event))
        try:
            h = d.hold(book, uow.journal, redemption_id=rid, amount_points=p.cost_points,
                       expires_at=_hold_expiry(uow.ledger, p.hold_timeout_s, _spend_time(uow, event)))
        except d.LedgerError as exc:
            reject(exc.reason, book.balance())
            return None
        uow.holds[rid] = h
        uow.counted[metrics.HOLDS.labels("held")] += 1
        out.emit(PointsHeld, PointsHeldPayload(amount_points=h.amount_points, balance=_balance(book.balance()),
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
                                                       balance=_balance(book.balance()), redemption_id=rid),
                 customer_id=book.customer_id, cause=f"post:{rid}", **_saga_kw(event))
        return None
    if h.state == "voided":  # a late redemption spends, like a new hold
        _due_at(uow, out, book, at=_spend_time(uow, event))
    if late := d.redeem_after_void(book, uow.journal, h):
        # The reward was given after we voided the hold (we or the rewards' outbox lagged
        # past the timeout): the points are taken now, the shortfall as debt.
        uow.late_redemptions.append(late)
        out.emit(PointsRedeemed, PointsRedeemedPayload(
            amount_points=h.amount_points, balance=_balance(late.balance), redemption_id=rid,
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
        out.emit(PointsReleased, PointsReleasedPayload(amount_points=h.amount_points, balance=_balance(book.balance()),
                                                       redemption_id=rid, phase="void", reason=p.reason),
                 customer_id=book.customer_id, cause=f"void:{rid}", **_saga_kw(event))
    # The cancellation's own time, not this run's: a rebuild dates a refund lot the same way.
    elif h.state == "posted" and d.refund(book, uow.journal, h, uow.ledger.programs.at(event.recorded_at).program,
                                          now=event.occurred_at):
        out.emit(PointsReleased, PointsReleasedPayload(amount_points=h.amount_points, balance=_balance(book.balance()),
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
assert set(REDEMPTION_ACTIONS) == _NO_POINTS | {"RedemptionRequested", "RedemptionFulfilled", "RedemptionFailed",
                                                "RedemptionCancelled"}


# ---- the scheduler ------------------------------------------------------------------------


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
        aged_out_from = await repo.scheduler_mark(conn, name="aged_out_until") or _EPOCH
    run = SchedulerRun()
    after = ""
    while True:
        async with pool.acquire() as conn:
            chunk = await repo.due_customers(
                conn, now=now, remind_until=now + timedelta(days=s.expiry_reminder_days),
                aged_out_from=min(aged_out_from, aged_out_until), aged_out_until=aged_out_until, after=after,
                limit=s.scheduler_batch_customers)
            if not chunk:
                break
            after = chunk[-1]
            async with conn.transaction():
                await _schedule_chunk(conn, ledger, chunk, now, run)
    if run.customers:  # a ledger at rest writes nothing
        async with pool.acquire() as conn:
            await repo.set_scheduler_mark(conn, name="aged_out_until", value=aged_out_until)
    metrics.SCHEDULER_SECONDS.observe(time.perf_counter() - started)
    return run


async def _schedule_chunk(conn: asyncpg.Connection, ledger: Ledger, chunk: list[str], now: datetime,
                          run: SchedulerRun) -> None:
    uow = UnitOfWork(conn, ledger, now)
    out = Emitter(ledger, now)
    await uow.lock(chunk)
    ids = sorted(uow.books)
    qualifying = await repo.qualifying_points(conn, customer_ids=ids, window_start=uow.window_start)
    uow.attach_lots(await repo.open_lots(conn, customer_ids=ids))
    uow.attach_holds(await repo.timed_out_holds(conn, customer_ids=ids, now=now))
    remind_until = now + timedelta(days=ledger.settings.expiry_reminder_days)
    today = now.date()
    for cid in ids:
        book = uow.books[cid]
        run.customers += 1
        voided, matured, expired = _due_at(uow, out, book, at=now)
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
            out.emit(PointsWillExpire, PointsWillExpirePayload(amount_points=points, balance=_balance(book.balance()),
                                                               expires_on=day),
                     customer_id=cid, cause=f"remind:{cid}:{day.isoformat()}")
        moved_tier = d.requalify(book, uow.program, qualifying.get(cid, 0))
        if moved_tier:
            run.tier_changes += 1
            out.tier_moved(moved_tier, cause=f"window:{cid}:{today.isoformat()}:{moved_tier.to_tier}")
    await uow.save(out.messages)
    uow.count_postings()


def _due_at(uow: UnitOfWork, out: Emitter, book: d.CustomerBook, *, at: datetime) -> tuple[int, int, int]:
    """Void the customer's holds timed out by `at`, then mature and expire their lots due at
    `at` (the book holds all their open lots and timed-out holds), with their events. The
    scheduler does it for everyone on its round; a spend (a hold, a late redemption, an
    adjustment) does it first for its customer at its own time, so it never takes points
    already expired, nor misses points already matured or held by a hold already timed out,
    whenever the scheduler last ran; and a rebuild, replaying the spend with its original
    time, finds the same lots and holds. Ids derive from the lots and holds, so whichever
    comes first, the other finds nothing left to do. Returns holds voided, points matured,
    points expired."""
    voided = 0
    for h in sorted(book.holds.values(), key=lambda x: (x.expires_at, str(x.redemption_id))):
        if h.state == "held" and h.expires_at <= at and d.void_hold(book, uow.journal, h):
            voided += 1
            out.emit(PointsReleased, PointsReleasedPayload(
                amount_points=h.amount_points, balance=_balance(book.balance()), redemption_id=h.redemption_id,
                phase="void", reason="hold_timeout"), customer_id=book.customer_id, cause=f"void:{h.redemption_id}")
    lots = sorted(book.lots.values(), key=lambda x: (x.expires_at, str(x.lot_id)))
    matured = 0
    for lot in lots:
        moved = d.mature(book, uow.journal, lot, now=at)
        if moved:
            matured += moved
            out.emit(PointsMatured, PointsMaturedPayload(amount_points=moved, balance=_balance(book.balance()),
                                                         purchase_id=lot.purchase_id or str(lot.lot_id),
                                                         source=lot.purchase_source),
                     customer_id=book.customer_id, cause=f"mature:{lot.lot_id}", history=lot.history)
    expired_lots, expired, first_transfer, all_history = [], 0, len(uow.journal.transfers), True
    for lot in lots:
        points = d.expire(book, uow.journal, lot, now=at)
        if points:
            expired_lots.append(str(lot.lot_id))
            expired += points
            all_history = all_history and lot.history
    if expired:
        cause = ",".join(str(t.transfer_id) for t in uow.journal.transfers[first_transfer:])
        out.emit(PointsExpired, PointsExpiredPayload(amount_points=expired, balance=_balance(book.balance()),
                                                     lot_ids=expired_lots), customer_id=book.customer_id,
                 cause=f"expire:{cause}", history=all_history)
    return voided, matured, expired


def _spend_time(uow: UnitOfWork, event: Any) -> datetime:
    """When a spend happened: its event's time, never later than this run's clock (a producer
    whose clock runs ahead must not expire points early)."""
    return min(event.occurred_at, uow.now)


# ---- admin: adjustments and the program ---------------------------------------------------


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
    _due_at(uow, out, book, at=_spend_time(uow, event))
    lot = d.adjust(book, uow.journal, uow.ledger.programs.at(event.recorded_at).program,
                   adjustment_id=p.adjustment_id, amount_points=p.amount_points, now=p.occurred_at)
    if lot is not None and history:
        lot.history = True
    out.emit(PointsAdjusted, PointsAdjustedPayload(amount_points=p.amount_points, balance=_balance(book.balance()),
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
        existing = await repo.find_adjustment(conn, adjustment_id=adjustment_id)
        if existing is not None:
            book = uow.books[existing["customer_id"]] if existing["customer_id"] in uow.books else None
            return AdjustmentOutcome(False, adjustment_id, existing["customer_id"], existing["amount_points"],
                                     existing["reason_code"], existing["actor"], existing["note"],
                                     book.balance() if book else None)
        book = uow.books[customer_id]
        uow.attach_lots(await repo.open_lots(conn, customer_ids=[customer_id]))
        uow.attach_holds(await repo.timed_out_holds(conn, customer_ids=[customer_id], now=now))
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
    applied = await repo.applied_adjustments(conn, adjustment_ids=[e.payload.adjustment_id for e in events])
    to_apply = sorted({e.customer_id for e in events if e.payload.adjustment_id not in applied})
    if to_apply:
        uow.attach_lots(await repo.open_lots(conn, customer_ids=to_apply))
        uow.attach_holds(await repo.timed_out_holds(conn, customer_ids=to_apply, now=now))
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
    batch.after_commit(lambda: _batch_done("adjustments", uow, batch, started=started))


# ---- read side ----------------------------------------------------------------------------


@dataclass
class BalanceView:
    balance: d.Balance
    next_expiry_at: datetime | None
    next_expiry_points: int


async def balance_of(conn: asyncpg.Connection, ledger: Ledger, customer_id: str) -> BalanceView | None:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        book = await repo.read_customer(conn, customer_id=customer_id)
        if book is None:
            return None
        nxt = await repo.next_expiry(conn, customer_id=customer_id)
    return BalanceView(book.balance(), nxt["expires_at"] if nxt else None, int(nxt["points"]) if nxt else 0)


@dataclass
class Simulation:
    rule_version: int
    earning: d.Earning
    pending: bool
    matures_at: datetime
    expires_at: datetime
    stacking_order: tuple[str, ...] = STACKING_ORDER


async def simulate(
    conn: asyncpg.Connection, ledger: Ledger, *, purchase: PurchasePayload, customer_id: str | None,
    tier: str | None, first_purchase: bool | None,
) -> Simulation:
    """What `purchase` would earn now, rule by rule, for a customer (their tier, first
    purchase and daily cap as they stand) or for the given tier. Raises UnknownCurrency,
    ProgramHistoryUnavailable (the program is not loaded and ledger.programs cannot be read)."""
    await ledger.programs.ensure_loaded(conn, wait=False)  # HTTP only
    now = ledger.clock()
    rules = ledger.programs.at(now)
    program, version = rules.program, rules.version
    earned_today = 0
    if customer_id is not None:
        book = await repo.read_customer(conn, customer_id=customer_id)
        if book is not None:
            tier = tier or book.tier
            first_purchase = book.has_purchased is False if first_purchase is None else first_purchase
            day = d.utc_day(purchase.occurred_at)
            by_day = await repo.earned_by_day(conn, customer_ids=[customer_id],
                                              since=purchase.occurred_at - timedelta(days=1))
            earned_today = by_day.get((customer_id, day), 0)
    earning = d.calculate_earning(program, purchase, tier=program.tier_named(tier or program.tiers[0].name),
                                  first_purchase=True if first_purchase is None else first_purchase,
                                  earned_today_points=earned_today)
    matures_at = purchase.occurred_at + timedelta(days=program.pending_days)
    return Simulation(version, earning, matures_at > now, matures_at, matures_at + timedelta(days=program.expiry_days))


async def refresh_gauges(pool: asyncpg.Pool) -> dict[str, int]:
    async with pool.acquire() as conn:
        t = await repo.totals(conn)
    metrics.LIABILITY.labels("available").set(t["available"])
    metrics.LIABILITY.labels("pending").set(t["pending"])
    metrics.LIABILITY.labels("held").set(t["held"])
    metrics.LIABILITY.labels("debt").set(t["debt"])
    metrics.INVARIANT.labels("posted").set(t["posted_imbalance"])
    metrics.INVARIANT.labels("pending").set(t["pending_imbalance"])
    spent = t["expired"] + t["redeemed"]
    metrics.BREAKAGE.set(t["expired"] / spent if spent else 0.0)
    return t
