"""The ledger's use cases in memory: `MemoryLedgerStore` is services/ledger/store.py's
LedgerStore over Python objects (each read a copy, so what a use case does to it stays its
own until saved; each save checked as the database's constraints would, and applied only when
the fake connection commits), and `MemoryLedgerHarness` runs the real subscriptions through
the real shared pipeline on a FakePool with it. No PostgreSQL, no broker: milliseconds a test."""

import abc
import copy
import itertools
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from asyncpg.exceptions import CheckViolationError, UniqueViolationError

from services.ledger import domain as d
from services.ledger.adjustments import AdjustmentOutcome, adjust_points
from services.ledger.handlers import subscriptions
from services.ledger.program import Program
from services.ledger.scheduler import SchedulerRun, run_scheduler
from services.ledger.repository import PurchaseKey, account_deltas
from services.ledger.service import Ledger
from services.ledger.settings import LedgerSettings
from services.ledger.store import Changes
from services.ledger.versions import ProgramStore
from shared.events import utcnow
from shared.pipeline import BatchReport, Pipeline, Record
from tests.support.fakes import FakeConnection, FakeDatabase, FakePool

_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


class MemoryLedgerTables:
    """The ledger's tables, committed state only."""

    def __init__(self, program_version: int = 1) -> None:
        self.program_version = program_version
        self.customers: dict[str, dict[str, Any]] = {}  # tier, has_purchased, qualifying_points
        self.accounts: dict[str, list[int]] = {a: [0, 0, 0, 0] for a in d.PROGRAM_ACCOUNTS}  # dpe, dpo, cpe, cpo
        self.lots: dict[uuid.UUID, d.Lot] = {}
        self.holds: dict[uuid.UUID, d.Hold] = {}
        self.adjustments: dict[uuid.UUID, d.Adjustment] = {}
        self.transfers: dict[uuid.UUID, d.Transfer] = {}
        self.scheduler_marks: dict[str, datetime] = {}

    def store(self, conn: FakeConnection) -> "MemoryLedgerStore":
        """Ledger.store: the store of one connection's transactions."""
        return MemoryLedgerStore(self, conn)

    def book(self, customer_id: str) -> d.CustomerBook:
        row, a = self.customers[customer_id], self.accounts
        av, pe, de = (a[f"customer:{customer_id}:{k}"] for k in ("available", "pending", "debt"))
        return d.CustomerBook(
            customer_id=customer_id, tier=row["tier"], qualifying_points=row["qualifying_points"],
            has_purchased=row["has_purchased"],
            available=d.Account(d.available_account(customer_id), "available", *av),
            pending=d.Account(d.pending_account(customer_id), "pending", 0, pe[1], 0, pe[3]),
            debt=d.Account(d.debt_account(customer_id), "debt", 0, de[1], 0, de[3]),
        )

    def balance(self, customer_id: str) -> d.Balance:
        return self.book(customer_id).balance()

    def trial_balance(self) -> tuple[int, int]:
        """(posted debits - posted credits, pending debits - pending credits) over every account: (0, 0)."""
        return (sum(x[1] - x[3] for x in self.accounts.values()), sum(x[0] - x[2] for x in self.accounts.values()))


def _kept(x: Any) -> Any:
    """A row as stored: a copy with no pending flags."""
    row = copy.deepcopy(x)
    row.is_new = row.changed = False
    return row


class MemoryLedgerStore:
    """One connection's view of MemoryLedgerTables (LedgerStore)."""

    def __init__(self, tables: MemoryLedgerTables, conn: FakeConnection) -> None:
        self.tables = tables
        self.conn = conn

    def _write(self, effect: Callable[[], None]) -> None:
        """At the commit inside a transaction; at once outside one (autocommit)."""
        if self.conn.in_transaction:
            self.conn.on_commit(effect)
        else:
            effect()

    # ---- customers ----------------------------------------------------------------------

    async def lock_customers(self, *, customer_ids: Iterable[str]) -> tuple[dict[str, d.CustomerBook], int | None]:
        found = {c: self.tables.book(c) for c in sorted(set(customer_ids)) if c in self.tables.customers}
        return found, (self.tables.program_version if found else None)

    async def create_customers(self, *, customer_ids: Sequence[str], tier: str) -> dict[str, d.CustomerBook]:
        t = self.tables
        new = [c for c in customer_ids if c not in t.customers]

        def insert() -> None:
            for c in new:
                t.customers.setdefault(c, {"tier": tier, "has_purchased": False, "qualifying_points": 0})
                for k in ("available", "pending", "debt"):
                    t.accounts.setdefault(f"customer:{c}:{k}", [0, 0, 0, 0])

        self._write(insert)
        books = {c: d.CustomerBook.new(c, tier) for c in new}
        return {**books, **{c: t.book(c) for c in customer_ids if c in t.customers}}

    async def latest_program_version(self) -> int:
        return self.tables.program_version

    # ---- lots -----------------------------------------------------------------------------

    def _lots_of(self, keys: Sequence[PurchaseKey]) -> dict[PurchaseKey, d.Lot]:
        by_key = {(x.purchase_source, x.purchase_store, x.purchase_id): x for x in self.tables.lots.values()
                  if x.purchase_id is not None}
        return {k: by_key[k] for k in set(keys) if k in by_key}

    async def purchases_with_lots(self, *, keys: Sequence[PurchaseKey]) -> set[PurchaseKey]:
        return set(self._lots_of(keys))

    async def lots_of_purchases(self, *, keys: Sequence[PurchaseKey]) -> dict[PurchaseKey, d.Lot]:
        return copy.deepcopy(self._lots_of(keys))

    def _qualifying(self, customer_ids: Sequence[str], after: datetime) -> list[d.Lot]:
        return [x for x in self.tables.lots.values()
                if x.customer_id in customer_ids and x.qualifying and x.occurred_at > after]

    async def window_lots(self, *, customer_ids: Sequence[str],
                          since: datetime) -> dict[str, dict[uuid.UUID, tuple[datetime, int]]]:
        out: dict[str, dict[uuid.UUID, tuple[datetime, int]]] = defaultdict(dict)
        for x in self._qualifying(customer_ids, since):
            out[x.customer_id][x.lot_id] = (x.occurred_at, x.earned_points - x.reversed_points)
        return out

    async def earned_by_day(self, *, customer_ids: Sequence[str], since: datetime) -> dict[tuple[str, date], int]:
        out: dict[tuple[str, date], int] = defaultdict(int)
        for x in self._qualifying(customer_ids, since - timedelta(microseconds=1)):  # occurred_at >= since
            out[(x.customer_id, d.utc_day(x.occurred_at))] += x.earned_points
        return dict(out)

    async def qualifying_points(self, *, customer_ids: Sequence[str], window_start: datetime) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for x in self._qualifying(customer_ids, window_start):
            out[x.customer_id] += x.earned_points - x.reversed_points
        return dict(out)

    async def open_lots(self, *, customer_ids: Sequence[str], lot_ids: Sequence[uuid.UUID] = ()) -> list[d.Lot]:
        return [copy.deepcopy(x) for x in self.tables.lots.values()
                if (x.customer_id in customer_ids and (x.pending or x.remaining_points > 0 or x.held_points > 0))
                or x.lot_id in lot_ids]

    # ---- holds and adjustments ------------------------------------------------------------

    async def holds_by_id(self, *, redemption_ids: Sequence[uuid.UUID], timed_out_of: Sequence[str] = (),
                          now: datetime | None = None) -> dict[uuid.UUID, d.Hold]:
        return {h.redemption_id: copy.deepcopy(h) for h in self.tables.holds.values()
                if h.redemption_id in redemption_ids
                or (h.customer_id in timed_out_of and h.state == "held" and now is not None and h.expires_at <= now)}

    async def timed_out_holds(self, *, customer_ids: Sequence[str], now: datetime) -> list[d.Hold]:
        return [copy.deepcopy(h) for h in self.tables.holds.values()
                if h.customer_id in customer_ids and h.state == "held" and h.expires_at <= now]

    async def find_adjustment(self, *, adjustment_id: uuid.UUID) -> d.Adjustment | None:
        return self.tables.adjustments.get(adjustment_id)

    async def applied_adjustments(self, *, adjustment_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        return {a for a in adjustment_ids if a in self.tables.adjustments}

    # ---- the write ------------------------------------------------------------------------

    async def save(self, changes: Changes) -> None:
        """Refused here, as the statements would be, by the database's keys and CHECKs; applied at commit."""
        t = self.tables
        transfers = list(changes.transfers)
        _unique("transfer_id", [x.transfer_id for x in transfers], t.transfers)
        _unique("pending_id", [x.pending_id for x in transfers if x.pending_id is not None],
                {x.pending_id for x in t.transfers.values() if x.pending_id is not None})
        _unique("lot_id", [x.lot_id for x in changes.new_lots], t.lots)
        _unique("redemption_id", [h.redemption_id for h in changes.holds if h.is_new], t.holds)
        _unique("adjustment_id", [a.adjustment_id for a in changes.adjustments], t.adjustments)
        accounts = {k: [a + b for a, b in zip(t.accounts.get(k, [0, 0, 0, 0]), delta)]
                    for k, delta in account_deltas(transfers).items()}
        for account_id, totals in accounts.items():
            _check_account(account_id, totals)
        books = [(b.customer_id, {"tier": b.tier, "has_purchased": b.has_purchased,
                                  "qualifying_points": b.qualifying_points}) for b in changes.books if b.changed]
        rows = ([_kept(x) for x in (*changes.new_lots, *changes.changed_lots)], [_kept(h) for h in changes.holds])

        def apply() -> None:
            t.transfers.update((x.transfer_id, x) for x in transfers)
            t.lots.update((x.lot_id, x) for x in rows[0])
            t.holds.update((h.redemption_id, h) for h in rows[1])
            t.adjustments.update((a.adjustment_id, a) for a in changes.adjustments)
            t.customers.update(books)
            t.accounts.update(accounts)

        self._write(apply)

    # ---- the scheduler --------------------------------------------------------------------

    async def due_customers(self, *, now: datetime, remind_until: datetime, aged_out_from: datetime,
                            aged_out_until: datetime, after: str, limit: int) -> list[str]:
        def due(x: d.Lot) -> bool:
            spendable = x.remaining_points > 0 and not x.pending
            return ((x.pending and x.matures_at <= now) or (spendable and x.expires_at <= now)
                    or (spendable and x.expires_at <= remind_until and x.reminded_on is None and not x.history)
                    or (x.qualifying and aged_out_from < x.occurred_at <= aged_out_until))

        customers = {x.customer_id for x in self.tables.lots.values() if due(x)}
        customers |= {h.customer_id for h in self.tables.holds.values() if h.state == "held" and h.expires_at <= now}
        return sorted(c for c in customers if c > after)[:limit]

    async def scheduler_mark(self, *, name: str) -> datetime | None:
        return self.tables.scheduler_marks.get(name)

    async def set_scheduler_mark(self, *, name: str, value: datetime) -> None:
        marks = self.tables.scheduler_marks
        self._write(lambda: marks.__setitem__(name, max(value, marks.get(name, value))))


def _unique(key: str, new: list[Any], existing: Any) -> None:
    if len(set(new)) < len(new) or any(x in existing for x in new):
        raise UniqueViolationError(f"duplicate key value violates unique constraint on {key}")


def _check_account(account_id: str, totals: list[int]) -> None:
    """The accounts' CHECKs (migrations/0001_ledger.sql)."""
    dpe, dpo, cpe, cpo = totals
    kind = account_id.rsplit(":", 1)[1]
    if min(totals) < 0 or (kind in ("available", "pending") and dpo + dpe > cpo) or (kind == "debt" and cpo > dpo):
        raise CheckViolationError(f"account {account_id} would break its CHECK: {totals}")


class LedgerHarness(abc.ABC):
    """The ledger's subscriptions, through the shared pipeline, on `pool` with the ledger's
    `store`: what a use-case test drives. The subclass says where the state is read from
    (MemoryLedgerHarness here; tests/integration/test_ledger_use_cases_postgres.py runs the
    same tests on PostgreSQL). The clock is the real one shifted by `advance`, as the events
    built by tests/support/ledger.py carry real times."""

    def __init__(self, pool: Any, store: Callable[[Any], Any], program: Program | None = None) -> None:
        self.settings = LedgerSettings(topic_prefix="unit.", program_file=Path("services/ledger/program.yaml"))
        programs = ProgramStore(self.settings.program_file)
        # Loaded as if from the database: version 1 in force since long ago.
        programs._add([{"version": 1, "effective_from": _EPOCH,
                        "document": (program or Program()).model_dump(mode="json")}])
        self.offset = timedelta()
        self.ledger = Ledger(self.settings, programs, clock=self.now, store=store)
        self.pool = pool
        self.pipeline = Pipeline(lambda: self.pool, producer="ledger", clock=self.now, max_attempts=1, backoff_s=0)
        self.subscriptions = {s.lane: s for s in subscriptions(self.settings, self.ledger)}
        self._offsets = itertools.count()

    def now(self) -> datetime:
        return utcnow() + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)

    async def send(self, lane: str, *envelopes: dict[str, Any]) -> BatchReport:
        """One batch on the lane's topic (purchases, rewards or adjustments), applied and
        committed. Each event happens now by the harness's clock: its envelope's occurred_at
        and recorded_at are set to it (a sale's own time, in its payload, stays)."""
        sub = self.subscriptions[lane]
        at = self.now().isoformat()
        records = [Record(json.dumps({**e, "occurred_at": at, "recorded_at": at}).encode(),
                          key=(e.get("customer_id") or "").encode(), topic=sub.topic, partition=0,
                          offset=next(self._offsets)) for e in envelopes]
        return await self.pipeline.process(sub, records)

    async def run_scheduler(self) -> SchedulerRun:
        """One round of the scheduler at the harness's clock."""
        return await run_scheduler(self.pool, self.ledger)

    async def adjust(self, customer_id: str, amount_points: int, *, adjustment_id: uuid.UUID,
                     reason_code: str = "goodwill", actor: str = "ops@test", note: str | None = None,
                     ) -> AdjustmentOutcome:
        """The admin API's use case (its own transaction on a pooled connection)."""
        async with self.pool.acquire() as conn:
            return await adjust_points(conn, self.ledger, adjustment_id=adjustment_id, customer_id=customer_id,
                                       amount_points=amount_points, reason_code=reason_code, actor=actor, note=note)

    # ---- what the tests read back (committed state) ----------------------------------------

    @abc.abstractmethod
    async def balance(self, customer_id: str) -> d.Balance: ...

    @abc.abstractmethod
    async def hold_state(self, redemption_id: uuid.UUID) -> str: ...

    @abc.abstractmethod
    async def lots_of(self, customer_id: str) -> list[tuple[int, int]]:
        """(remaining_points, held_points) of each of the customer's lots."""

    @abc.abstractmethod
    async def count(self, table: str) -> int:
        """Rows of `table` (transfers, adjustments)."""

    @abc.abstractmethod
    async def trial_balance(self) -> tuple[int, int]:
        """(posted debits - posted credits, pending debits - pending credits) over every account: (0, 0)."""

    @abc.abstractmethod
    async def published(self, event_type: str | None = None) -> list[dict[str, Any]]:
        """Every event committed to the outbox (points.events, dead letters, ledger.adjustments), decoded."""


class MemoryLedgerHarness(LedgerHarness):
    """On a FakePool and MemoryLedgerTables: no server, milliseconds a test."""

    def __init__(self, program: Program | None = None) -> None:
        self.tables = MemoryLedgerTables(program_version=1)
        self.database = FakeDatabase()
        super().__init__(FakePool(self.database), self.tables.store, program)

    async def balance(self, customer_id: str) -> d.Balance:
        return self.tables.balance(customer_id)

    async def hold_state(self, redemption_id: uuid.UUID) -> str:
        return self.tables.holds[redemption_id].state

    async def lots_of(self, customer_id: str) -> list[tuple[int, int]]:
        return [(x.remaining_points, x.held_points) for x in self.tables.lots.values() if x.customer_id == customer_id]

    async def count(self, table: str) -> int:
        return len(getattr(self.tables, table))

    async def trial_balance(self) -> tuple[int, int]:
        return self.tables.trial_balance()

    async def published(self, event_type: str | None = None) -> list[dict[str, Any]]:
        return [json.loads(row["value"]) for row in self.database.outbox
                if event_type is None or json.loads(row["headers"]).get("type") == event_type]
