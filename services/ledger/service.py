"""What every use case of the ledger is built of: the Ledger (settings, clock, program), the
Emitter of points.events, the UnitOfWork of one transaction (customers locked, one journal)
and what is due for a customer at a time. The use cases, one module each: earning.py
(purchases.recorded), redemptions.py (rewards.events), adjustments.py (admin API and
ledger.adjustments), scheduler.py, queries.py (reads). Each takes its inputs and
dependencies, owns one transaction (the shared pipeline's for an input): lock the
customers, load what the rules need, apply the rules (domain/), write transfers, lots,
accounts and the outbox together, commit.

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
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
from pydantic import BaseModel

from services.ledger import domain as d
from services.ledger import metrics
from services.ledger.settings import LedgerSettings
from services.ledger.store import Changes, LedgerStore, PostgresLedgerStore
from services.ledger.versions import ProgramStore
from shared.events import (
    SCHEMA_VERSION,
    Envelope,
    derived_event_id,
    json_opt_str,
    json_str,
    utcnow,
)
from shared.events.points import (
    BalanceAfter,
    PointsExpired,
    PointsExpiredPayload,
    PointsMatured,
    PointsMaturedPayload,
    PointsReleased,
    PointsReleasedPayload,
    TierChanged,
    TierChangedPayload,
)
from shared.events.purchases import PurchasePayload
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
    """What every use case needs: settings, the clock, the program, and the store a unit of
    work reads and writes through on its transaction's connection (PostgreSQL; unit tests
    give an in-memory one)."""

    settings: LedgerSettings
    programs: ProgramStore
    clock: Clock = utcnow
    store: Callable[[asyncpg.Connection], LedgerStore] = PostgresLedgerStore

    @property
    def points_topic(self) -> str:
        return self.settings.topic(POINTS_EVENTS)

    @property
    def dlq_topic(self) -> str:
        return self.settings.topic(POINTS_DLQ)

    @property
    def adjustments_topic(self) -> str:
        return self.settings.topic(LEDGER_ADJUSTMENTS)



# ---- outputs ------------------------------------------------------------------------------


def balance_after(b: d.Balance) -> BalanceAfter:
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
            f'"breakdown":{_breakdown_json(e.breakdown)},"history":{"true" if history else "false"}}}}}'
        )
        self.messages.append(OutboxMessage(self._topic, o.customer_id, value.encode(),
                                           {"type": "PointsEarned", "correlation_id": correlation_id}))

    def tier_moved(self, moved: d.TierMoved, *, cause: str, correlation_id: str | None = None,
                   history: bool = False) -> None:
        self.emit(TierChanged, TierChangedPayload(from_tier=moved.from_tier, to_tier=moved.to_tier,
                                                  qualifying_points=moved.qualifying_points,
                                                  balance=balance_after(moved.balance)),
                  customer_id=moved.customer_id, cause=f"tier:{cause}", correlation_id=correlation_id,
                  history=history)


# ASCII-only output: lone surrogates or control characters in an id cannot break the JSON.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def _breakdown_json(breakdown: list[dict]) -> str:
    """The earning's breakdown as _dumps writes it, from a template (a quarter of the cost);
    anything but {"rule": str, "points": str} items goes through _dumps."""
    parts = []
    for item in breakdown:
        rule, points = item.get("rule"), item.get("points")
        if len(item) != 2 or type(rule) is not str or type(points) is not str:
            return _dumps(breakdown)
        parts.append(f'{{"rule":{json_str(rule)},"points":{json_str(points)}}}')
    return "[" + ",".join(parts) + "]"


# ---- persistence shared by the use cases --------------------------------------------------


class UnitOfWork:
    """The books of one transaction: customers loaded (locked), one journal, what changed.
    It reads and writes through `store` (ledger.store on the connection); the transaction,
    BEGIN to COMMIT, is its caller's."""

    def __init__(self, conn: asyncpg.Connection, ledger: Ledger, now: datetime) -> None:
        self.conn = conn
        self.store = ledger.store(conn)
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
        found, latest = await self.store.lock_customers(customer_ids=wanted)
        if not self._program_checked:
            # Another instance may have saved a version since this one last looked: the
            # inputs of this transaction must earn under it if it is in force at their time.
            if latest is None:
                latest = await self.store.latest_program_version()
            if latest > self.ledger.programs.latest_version:
                await self.ledger.programs.refresh(self.conn)
                self.program = self.ledger.programs.at(self.now).program
                log.info("program versions saved elsewhere picked up",
                         extra={"rule_version": self.ledger.programs.latest_version})
            self._program_checked = True
        missing = sorted(c for c in wanted if c not in found)  # created in one order everywhere: no deadlock
        if missing and create:
            found.update(await self.store.create_customers(customer_ids=missing, tier=self.program.tiers[0].name))
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
        lots = [lot for b in self.books.values() for lot in b.lots.values()]
        await self.store.save(Changes(
            transfers=self.journal.transfers, new_lots=[x for x in lots if x.is_new],
            changed_lots=[x for x in lots if x.changed and not x.is_new],
            holds=[h for h in self.holds.values() if h.is_new or h.changed], adjustments=self.adjustments,
            books=self.books.values(),
        ))
        await enqueue(self.conn, messages)

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


def batch_done(stream: str, uow: UnitOfWork, batch: Batch[Any], *, started: float) -> None:
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


def due_at(uow: UnitOfWork, out: Emitter, book: d.CustomerBook, *, at: datetime) -> tuple[int, int, int]:
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
                amount_points=h.amount_points, balance=balance_after(book.balance()), redemption_id=h.redemption_id,
                phase="void", reason="hold_timeout"), customer_id=book.customer_id, cause=f"void:{h.redemption_id}")
    lots = sorted(book.lots.values(), key=lambda x: (x.expires_at, str(x.lot_id)))
    matured = 0
    for lot in lots:
        moved = d.mature(book, uow.journal, lot, now=at)
        if moved:
            matured += moved
            out.emit(PointsMatured, PointsMaturedPayload(amount_points=moved, balance=balance_after(book.balance()),
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
        out.emit(PointsExpired, PointsExpiredPayload(amount_points=expired, balance=balance_after(book.balance()),
                                                     lot_ids=expired_lots), customer_id=book.customer_id,
                 cause=f"expire:{cause}", history=all_history)
    return voided, matured, expired


def spend_time(uow: UnitOfWork, event: Any) -> datetime:
    """When a spend happened: its event's time, never later than this run's clock (a producer
    whose clock runs ahead must not expire points early)."""
    return min(event.occurred_at, uow.now)
