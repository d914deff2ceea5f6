"""One customer's books as loaded for a transaction: their accounts, the lots (credits with
their own expiry) and holds it needs; and what every use case spends with: lots in the order
they expire, debt paid first from new credits."""

import uuid
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal

from services.ledger.domain.accounts import Account, Code, Journal, Transfer, available_account, debt_account, pending_account
from services.ledger.domain.errors import invariant
from shared.events import derived_event_id


@dataclass(slots=True)
class LineEarning:
    """What one purchase line earned, kept on the lot so that a return can take back exactly
    the points of the lines returned."""

    line_id: str
    sku: str
    net_amount: Decimal  # in the program currency
    points: Decimal  # exact, before the tier multiplier and rounding
    returned_amount: Decimal = Decimal(0)  # in the program currency, cumulative

    def to_json(self) -> dict[str, str]:
        return {
            "line_id": self.line_id,
            "sku": self.sku,
            "net_amount": str(self.net_amount),
            "points": str(self.points),
            "returned_amount": str(self.returned_amount),
        }

    @classmethod
    def from_json(cls, d: dict[str, str]) -> "LineEarning":
        return cls(d["line_id"], d["sku"], Decimal(d["net_amount"]), Decimal(d["points"]), Decimal(d["returned_amount"]))


@dataclass(slots=True)
class Lot:
    """A credit of points with its own expiry. `remaining` is spendable (or maturing, while
    pending), `held` is reserved by holds; everything else has left the lot (spent, expired,
    reversed or paid to debt)."""

    lot_id: uuid.UUID
    customer_id: str
    source: str  # purchase | adjustment | refund (see refund)
    purchase_id: str | None
    occurred_at: datetime
    amount_points: int
    remaining_points: int
    pending: bool
    matures_at: datetime
    expires_at: datetime
    rule_version: int | None
    held_points: int = 0
    expired_points: int = 0
    # Qualifying points (tiers) of this lot: what the purchase earned net of returns.
    qualifying: bool = False
    earned_points: int = 0
    reversed_points: int = 0
    bonus_points: int = 0
    tier_multiplier: Decimal = Decimal(1)
    lines: list[LineEarning] = field(default_factory=list)
    return_ids: list[str] = field(default_factory=list)
    breakdown: list[dict[str, str | int]] = field(default_factory=list)
    reminded_on: date | None = None
    # The purchase's channel (pos | eshop) and store: with purchase_id, what names the
    # purchase (chain stores number receipts independently). None on adjustments, and on lots
    # written before channels (migration 0003) or stores (0013) were kept.
    purchase_source: str | None = None
    purchase_store: str | None = None
    # The rate the sale was converted at (1 unit of its currency in program currency): its
    # returns convert at the same rate, whatever the rate when they arrive. None on lots
    # written before it was kept (their returns convert at the program's current rate).
    currency_rate: Decimal | None = None
    # Earned by imported history (policy as-earned): its events carry history=true and no
    # expiry reminder is ever sent for it.
    history: bool = False
    is_new: bool = False
    changed: bool = False


def purchase_ref(source: str, purchase_id: str, store_id: str | None = None) -> str:
    """A purchase's name inside derived ids: its channel, its store and its id, since a POS
    sale and an e-shop order, or two stores of a chain, may carry the same id. Joined with
    derived_event_id's own separator (\x1f), so it is the same as passing them as separate
    parts, and no id derived from fewer parts (lots written before channels or stores were
    kept, store None) can ever equal it. Never shown."""
    if store_id is None:
        return f"{source}\x1f{purchase_id}"
    return f"{source}\x1f{store_id}\x1f{purchase_id}"


@dataclass(slots=True)
class Hold:
    redemption_id: uuid.UUID
    customer_id: str
    amount_points: int
    state: str  # held | posted | voided | refunded
    expires_at: datetime
    transfer_id: uuid.UUID
    # lot_id (str) -> points taken from it. They add up to the amount, except after a late
    # redemption (redeem_after_void), where what the lots could not cover became debt.
    allocations: dict[str, int]
    is_new: bool = False
    changed: bool = False


@dataclass(frozen=True, slots=True)
class Balance:
    available_points: int
    pending_points: int
    held_points: int
    debt_points: int
    tier: str
    qualifying_points: int


@dataclass(slots=True)
class CustomerBook:
    customer_id: str
    tier: str
    qualifying_points: int  # earned net of returns, purchases inside the tier window
    has_purchased: bool
    available: Account
    pending: Account
    debt: Account
    lots: dict[uuid.UUID, Lot] = field(default_factory=dict)
    holds: dict[uuid.UUID, Hold] = field(default_factory=dict)
    earned_by_day: dict[date, int] = field(default_factory=dict)
    # Qualifying lots not loaded whole, as (occurred_at, points net of returns): what the
    # tier at a purchase's own time is computed from (qualifying_at). Lots in `lots` win.
    window_lots: dict[uuid.UUID, tuple[datetime, int]] = field(default_factory=dict)
    changed: bool = False

    @classmethod
    def new(cls, customer_id: str, tier: str) -> "CustomerBook":
        return cls(
            customer_id=customer_id,
            tier=tier,
            qualifying_points=0,
            has_purchased=False,
            available=Account(available_account(customer_id), "available"),
            pending=Account(pending_account(customer_id), "pending"),
            debt=Account(debt_account(customer_id), "debt"),
        )

    def accounts(self) -> dict[str, Account]:
        return {a.account_id: a for a in (self.available, self.pending, self.debt)}

    @property
    def available_points(self) -> int:
        a = self.available
        return a.credits_posted - a.debits_posted - a.debits_pending

    @property
    def pending_points(self) -> int:
        return self.pending.credits_posted - self.pending.debits_posted

    @property
    def held_points(self) -> int:
        return self.available.debits_pending

    @property
    def debt_points(self) -> int:
        return self.debt.debits_posted - self.debt.credits_posted

    def balance(self) -> Balance:
        return Balance(
            self.available_points, self.pending_points, self.held_points, self.debt_points,
            self.tier, self.qualifying_points,
        )


def spendable_lots(book: CustomerBook) -> list[Lot]:
    """Available lots in the order spending consumes them: the ones that expire first."""
    lots = [lot for lot in book.lots.values() if not lot.pending and lot.remaining_points > 0]
    lots.sort(key=lambda lot: (lot.expires_at, lot.occurred_at, str(lot.lot_id)))
    return lots


def take_from_lots(book: CustomerBook, amount: int) -> dict[str, int]:
    """Spend `amount` from the lots that expire first (the caller checked the balance covers
    it). Returns lot_id (str) -> points taken."""
    allocations: dict[str, int] = {}
    left = amount
    for lot in spendable_lots(book):
        if left == 0:
            break
        take = min(left, lot.remaining_points)
        lot.remaining_points -= take
        lot.changed = True
        allocations[str(lot.lot_id)] = take
        left -= take
    # The account balance equals the sum of the lots' remaining points; if it said "enough",
    # the lots have enough. Anything else is a bug that must not post.
    invariant(left == 0, f"lots of {book.customer_id} short by {left} points for a covered amount")
    return allocations


def pay_debt(book: CustomerBook, journal: Journal, *, source: Account, amount: int, cause: str,
             lot: Lot | None, ref: str | None = None) -> int:
    """Debt is paid first from new credits: up to `amount` leaves `source` for the debt account.
    `cause` derives the transfer id; `ref` (default: the cause) is what the history shows."""
    pay = min(amount, book.debt_points)
    if pay > 0:
        journal.post(Transfer(
            derived_event_id("ledger", "debt_payoff", cause), source.account_id, book.debt.account_id, pay,
            Code.DEBT_PAYOFF, book.customer_id, ref or cause, lot_id=lot.lot_id if lot else None,
        ))
        if lot is not None:
            lot.remaining_points -= pay
    return pay


def check_book(book: CustomerBook) -> None:
    """The invariants that tie lots to accounts, for a book holding all its lots and holds."""
    lots = list(book.lots.values())
    invariant(all(lot.remaining_points >= 0 and lot.held_points >= 0 for lot in lots), "a lot below zero")
    invariant(book.available_points == sum(x.remaining_points for x in lots if not x.pending), "available != lots")
    invariant(book.pending_points == sum(x.remaining_points for x in lots if x.pending), "pending != lots")
    invariant(book.held_points == sum(x.held_points for x in lots), "held != lots")
    invariant(book.held_points == sum(h.amount_points for h in book.holds.values() if h.state == "held"),
              "held != holds")
    for account in (book.available, book.pending, book.debt):
        account.check()
