"""Tiers: the qualifying points of a rolling window and the tier they reach, at a purchase's
own time (what it earns with) and now (what the customer holds)."""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.ledger.domain.books import Balance, CustomerBook, Lot
from services.ledger.program import Program, Tier


@dataclass(frozen=True, slots=True)
class TierMoved:
    customer_id: str
    from_tier: str
    to_tier: str
    qualifying_points: int
    balance: Balance


def in_tier_window(program: Program, occurred_at: datetime, now: datetime) -> bool:
    return occurred_at > now - timedelta(days=program.tier_window_days)


def retier(book: CustomerBook, program: Program) -> TierMoved | None:
    """Move the customer to the tier their qualifying points reach, if it is another."""
    new_tier = program.tier_for(book.qualifying_points).name
    if new_tier == book.tier:
        return None
    old, book.tier = book.tier, new_tier
    book.changed = True
    return TierMoved(book.customer_id, old, new_tier, book.qualifying_points, book.balance())


def requalify(book: CustomerBook, program: Program, qualifying_points: int) -> TierMoved | None:
    """Set the qualifying points recomputed over the window (earnings age out of it) and
    move the tier if they cross a threshold."""
    if qualifying_points != book.qualifying_points:
        book.qualifying_points = qualifying_points
        book.changed = True
    return retier(book, program)


def qualifying_points_of(lots: Iterable[Lot], program: Program, now: datetime) -> int:
    return sum(
        lot.earned_points - lot.reversed_points
        for lot in lots
        if lot.qualifying and in_tier_window(program, lot.occurred_at, now)
    )


def qualifying_at(book: CustomerBook, program: Program, at: datetime) -> int:
    """The customer's qualifying points in the tier window that ends at `at` (business
    time): from the lots in the book and the window lots loaded for it. What a purchase's
    tier is computed from, so that its earning depends on the purchase's own time, never on
    when the ledger applies it (a rebuild months later, imported history)."""
    start = at - timedelta(days=program.tier_window_days)
    seen = dict(book.window_lots)
    for lot in book.lots.values():
        if lot.qualifying:
            seen[lot.lot_id] = (lot.occurred_at, lot.earned_points - lot.reversed_points)
    return sum(points for occurred_at, points in seen.values() if start < occurred_at <= at)


def tier_at(book: CustomerBook, program: Program, at: datetime) -> Tier:
    """The tier a purchase made at `at` earns with: the one its qualifying points then reach."""
    if len(program.tiers) == 1:
        return program.tiers[0]
    return program.tier_for(qualifying_at(book, program, at))
