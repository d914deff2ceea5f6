"""What the ledger's use cases read and write, behind one small protocol, so that they run
against PostgreSQL (the repository, on the transaction's connection) or an in-memory store
(tests/support/ledger_fakes.py) alike. A store never begins nor commits: the transaction is
its caller's (the shared pipeline's for an input, adjust_points' for the admin API), and
what a use case saved takes effect only with that commit."""

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

import asyncpg

from services.ledger import repository as repo
from services.ledger.domain.accounts import Transfer
from services.ledger.domain.adjustments import Adjustment
from services.ledger.domain.books import CustomerBook, Hold, Lot
from services.ledger.repository import PurchaseKey


@dataclass(frozen=True, slots=True)
class Changes:
    """What one unit of work writes: new transfers, lots (new or changed), holds (new or
    changed), adjustments' audit rows, and the customers whose books changed."""

    transfers: Sequence[Transfer]
    new_lots: Sequence[Lot]
    changed_lots: Sequence[Lot]
    holds: Sequence[Hold]
    adjustments: Sequence[Adjustment]
    books: Iterable[CustomerBook]


class LedgerStore(Protocol):
    """The reads the use cases make (keyword-only, typed models back) and their one write."""

    async def lock_customers(self, *, customer_ids: Iterable[str]) -> tuple[dict[str, CustomerBook], int | None]:
        """Lock and load the customers found, with the latest program version saved (None if none was found)."""

    async def create_customers(self, *, customer_ids: Sequence[str], tier: str) -> dict[str, CustomerBook]:
        """Create the customers not known yet, then lock and load them."""

    async def latest_program_version(self) -> int: ...

    async def purchases_with_lots(self, *, keys: Sequence[PurchaseKey]) -> set[PurchaseKey]: ...

    async def lots_of_purchases(self, *, keys: Sequence[PurchaseKey]) -> dict[PurchaseKey, Lot]: ...

    async def window_lots(self, *, customer_ids: Sequence[str],
                          since: datetime) -> dict[str, dict[uuid.UUID, tuple[datetime, int]]]: ...

    async def earned_by_day(self, *, customer_ids: Sequence[str], since: datetime) -> dict[tuple[str, date], int]: ...

    async def qualifying_points(self, *, customer_ids: Sequence[str], window_start: datetime) -> dict[str, int]: ...

    async def open_lots(self, *, customer_ids: Sequence[str], lot_ids: Sequence[uuid.UUID] = ()) -> list[Lot]: ...

    async def holds_by_id(self, *, redemption_ids: Sequence[uuid.UUID], timed_out_of: Sequence[str] = (),
                          now: datetime | None = None) -> dict[uuid.UUID, Hold]: ...

    async def timed_out_holds(self, *, customer_ids: Sequence[str], now: datetime) -> list[Hold]: ...

    async def find_adjustment(self, *, adjustment_id: uuid.UUID) -> Adjustment | None: ...

    async def applied_adjustments(self, *, adjustment_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]: ...

    async def save(self, changes: Changes) -> None: ...

    async def due_customers(self, *, now: datetime, remind_until: datetime, aged_out_from: datetime,
                            aged_out_until: datetime, after: str, limit: int) -> list[str]:
        """The scheduler's next customers after `after` with something due (repository.due_customers)."""

    async def scheduler_mark(self, *, name: str) -> datetime | None: ...

    async def set_scheduler_mark(self, *, name: str, value: datetime) -> None:
        """Never moves a mark back."""


class PostgresLedgerStore:
    """The repository's functions on one connection, inside its caller's transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def lock_customers(self, *, customer_ids: Iterable[str]) -> tuple[dict[str, CustomerBook], int | None]:
        return await repo.lock_customers(self.conn, customer_ids=customer_ids)

    async def create_customers(self, *, customer_ids: Sequence[str], tier: str) -> dict[str, CustomerBook]:
        return await repo.create_customers(self.conn, customer_ids=customer_ids, tier=tier)

    async def latest_program_version(self) -> int:
        return await repo.latest_program_version(self.conn)

    async def purchases_with_lots(self, *, keys: Sequence[PurchaseKey]) -> set[PurchaseKey]:
        return await repo.purchases_with_lots(self.conn, keys=keys)

    async def lots_of_purchases(self, *, keys: Sequence[PurchaseKey]) -> dict[PurchaseKey, Lot]:
        return await repo.lots_of_purchases(self.conn, keys=keys)

    async def window_lots(self, *, customer_ids: Sequence[str],
                          since: datetime) -> dict[str, dict[uuid.UUID, tuple[datetime, int]]]:
        return await repo.window_lots(self.conn, customer_ids=customer_ids, since=since)

    async def earned_by_day(self, *, customer_ids: Sequence[str], since: datetime) -> dict[tuple[str, date], int]:
        return await repo.earned_by_day(self.conn, customer_ids=customer_ids, since=since)

    async def qualifying_points(self, *, customer_ids: Sequence[str], window_start: datetime) -> dict[str, int]:
        return await repo.qualifying_points(self.conn, customer_ids=customer_ids, window_start=window_start)

    async def open_lots(self, *, customer_ids: Sequence[str], lot_ids: Sequence[uuid.UUID] = ()) -> list[Lot]:
        return await repo.open_lots(self.conn, customer_ids=customer_ids, lot_ids=lot_ids)

    async def holds_by_id(self, *, redemption_ids: Sequence[uuid.UUID], timed_out_of: Sequence[str] = (),
                          now: datetime | None = None) -> dict[uuid.UUID, Hold]:
        return await repo.holds_by_id(self.conn, redemption_ids=redemption_ids, timed_out_of=timed_out_of, now=now)

    async def timed_out_holds(self, *, customer_ids: Sequence[str], now: datetime) -> list[Hold]:
        return await repo.timed_out_holds(self.conn, customer_ids=customer_ids, now=now)

    async def find_adjustment(self, *, adjustment_id: uuid.UUID) -> Adjustment | None:
        return await repo.find_adjustment(self.conn, adjustment_id=adjustment_id)

    async def applied_adjustments(self, *, adjustment_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        return await repo.applied_adjustments(self.conn, adjustment_ids=adjustment_ids)

    async def save(self, changes: Changes) -> None:
        conn = self.conn
        await repo.insert_transfers(conn, transfers=changes.transfers)
        await repo.insert_lots(conn, lots=changes.new_lots)
        await repo.update_lots(conn, lots=changes.changed_lots)
        await repo.save_holds(conn, holds=changes.holds)
        await repo.insert_adjustments(conn, adjustments=changes.adjustments)
        await repo.update_customers(conn, books=changes.books)
        # Last: the shared program-account rows are locked only for the end of the transaction.
        await repo.add_to_accounts(conn, transfers=changes.transfers)

    async def due_customers(self, *, now: datetime, remind_until: datetime, aged_out_from: datetime,
                            aged_out_until: datetime, after: str, limit: int) -> list[str]:
        return await repo.due_customers(self.conn, now=now, remind_until=remind_until, aged_out_from=aged_out_from,
                                        aged_out_until=aged_out_until, after=after, limit=limit)

    async def scheduler_mark(self, *, name: str) -> datetime | None:
        return await repo.scheduler_mark(self.conn, name=name)

    async def set_scheduler_mark(self, *, name: str, value: datetime) -> None:
        await repo.set_scheduler_mark(self.conn, name=name, value=value)
