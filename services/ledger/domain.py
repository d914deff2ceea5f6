"""The ledger's rules, pure: earning, lots, returns and debt, holds, expiry, tiers.

Accounts and transfers follow TigerBeetle: an account keeps posted and pending debit and
credit totals, a transfer moves an integer amount from a debit account to a credit account
with a code saying why, and its id derives from the event that caused it. Program accounts
(issuance, redemption, expiry) sit on the other side of every customer movement, so the sum
of all debits always equals the sum of all credits.

Each customer has three accounts:
- available (credit-normal): spendable points; holds are pending debits on it;
- pending (credit-normal): earned points still inside the return window;
- debt (debit-normal): points owed: reversed by a return after they had been spent, or
  redeemed by a fulfilment that arrived after its hold was voided and found them spent.

`CustomerBook` is one customer's state as loaded for a batch (accounts, the lots and holds
the batch needs); operations mutate it and append transfers to a `Journal`. The service
persists what changed. No I/O here.
"""

import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_FLOOR, Decimal
from enum import StrEnum
from fractions import Fraction

from services.ledger.program import Program, Tier
from shared.events import derived_event_id
from shared.events.purchases import PurchaseLine, PurchasePayload

ISSUANCE = "program:issuance"
REDEMPTION = "program:redemption"
EXPIRY = "program:expiry"
PROGRAM_ACCOUNTS = (ISSUANCE, REDEMPTION, EXPIRY)


class LedgerError(Exception):
    """A rule refused an operation; `reason` is the machine-readable cause."""

    reason = "ledger_error"


class UnknownCurrency(LedgerError):
    reason = "unknown_currency"


class InvariantViolated(Exception):
    """A state the rules can never produce (a lot below zero, an account overdrawn by the
    service's own arithmetic): a bug, never the input's fault, so not a LedgerError. Raised,
    not asserted, so that `python -O` keeps the guard; the transaction fails and nothing
    of it is written."""


def invariant(holds: bool, message: str) -> None:
    if not holds:
        raise InvariantViolated(message)


# No hold or adjustment may exceed this: far beyond any real use, well inside the integer
# columns, so an absurd request is refused with a reason. (An absurd purchase fails its
# batch and, after the bounded retries, is dead-lettered alone as processing_failed.)
MAX_POINTS_PER_POSTING = 1_000_000_000


class InsufficientPoints(LedgerError):
    reason = "insufficient_points"


class InvalidAmount(LedgerError):
    reason = "invalid_amount"


class AdjustmentIdReused(LedgerError):
    """An adjustment_id already applied, sent again with other fields: answering "already
    applied" would hide that the second request was never applied."""

    reason = "adjustment_id_reused"


class AccountUnknown(LedgerError):
    reason = "account_unknown"


class Code(StrEnum):
    """Why a transfer happened."""

    EARN = "earn"
    MATURE = "mature"
    REVERSE = "reverse"
    DEBT = "debt"
    DEBT_PAYOFF = "debt_payoff"
    HOLD = "hold"
    POST = "post"
    VOID = "void"
    REFUND = "refund"
    EXPIRE = "expire"
    ADJUST = "adjust"


class Phase(StrEnum):
    """TigerBeetle's two-phase flags: a pending transfer is later posted or voided."""

    POSTED = "posted"
    PENDING = "pending"
    POST_PENDING = "post_pending"
    VOID_PENDING = "void_pending"


def available_account(customer_id: str) -> str:
    return f"customer:{customer_id}:available"


def pending_account(customer_id: str) -> str:
    return f"customer:{customer_id}:pending"


def debt_account(customer_id: str) -> str:
    return f"customer:{customer_id}:debt"


# ---- accounts and transfers ----------------------------------------------------------------


@dataclass(slots=True)
class Account:
    account_id: str
    kind: str
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    changed: bool = False

    def check(self) -> None:
        """TigerBeetle's balance flags: customer point accounts can never go below zero,
        the debt account never below zero the other way. Program accounts are loaded only
        as increments in a batch (their totals live in the database, with CHECKs)."""
        if self.kind in ("issuance", "redemption", "expiry"):
            return
        if self.kind in ("available", "pending"):
            invariant(self.debits_posted + self.debits_pending <= self.credits_posted, f"{self.account_id} overdrawn")
        elif self.kind == "debt":
            invariant(self.credits_posted <= self.debits_posted, f"{self.account_id} repaid beyond its debt")
        invariant(min(self.debits_pending, self.debits_posted, self.credits_pending, self.credits_posted) >= 0,
                  f"{self.account_id} has a total below zero")


@dataclass(frozen=True, slots=True)
class Transfer:
    transfer_id: uuid.UUID
    debit_account_id: str
    credit_account_id: str
    amount_points: int
    code: Code
    customer_id: str
    ref: str
    phase: Phase = Phase.POSTED
    pending_id: uuid.UUID | None = None
    lot_id: uuid.UUID | None = None
    rule_version: int | None = None
    occurred_at: datetime | None = None


class Journal:
    """Applies transfers to accounts with TigerBeetle's semantics and keeps them, in order,
    for the caller to persist."""

    def __init__(self, accounts: dict[str, Account]) -> None:
        self.accounts = accounts
        self.transfers: list[Transfer] = []

    def post(self, transfer: Transfer) -> Transfer:
        invariant(transfer.amount_points > 0, "a transfer moves a positive amount")
        debit = self.accounts[transfer.debit_account_id]
        credit = self.accounts[transfer.credit_account_id]
        amount = transfer.amount_points
        if transfer.phase is Phase.POSTED:
            debit.debits_posted += amount
            credit.credits_posted += amount
        elif transfer.phase is Phase.PENDING:
            debit.debits_pending += amount
            credit.credits_pending += amount
        elif transfer.phase is Phase.POST_PENDING:
            debit.debits_pending -= amount
            credit.credits_pending -= amount
            debit.debits_posted += amount
            credit.credits_posted += amount
        else:  # VOID_PENDING
            debit.debits_pending -= amount
            credit.credits_pending -= amount
        debit.changed = credit.changed = True
        debit.check()
        credit.check()
        self.transfers.append(transfer)
        return transfer


def new_program_accounts() -> dict[str, Account]:
    return {a: Account(a, a.split(":")[1]) for a in PROGRAM_ACCOUNTS}


# ---- lots, holds, customers -----------------------------------------------------------------


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


# ---- earning --------------------------------------------------------------------------------

_ONE = Decimal(1)
_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Earning:
    """What a purchase earns and why: `breakdown` lists each rule's contribution in the
    stacking order; its points add up to `points`."""

    points: int
    exact_points: Decimal  # after the tier multiplier, before rounding
    lines: list[LineEarning]
    bonus_points: int
    capped_points: int
    tier: str
    tier_multiplier: Decimal
    breakdown: list[dict[str, str | int]]
    rate: Decimal = Decimal(1)  # 1 unit of the purchase's currency in the program currency


def line_net_amount(line: PurchaseLine) -> Decimal:
    return max(line.net_amount, _ZERO)


def calculate_earning(
    program: Program,
    purchase: PurchasePayload,
    *,
    tier: Tier,
    first_purchase: bool,
    earned_today_points: int = 0,
) -> Earning:
    """The points a purchase earns under `program`, rule by rule (see STACKING_ORDER)."""
    rate = program.rate_to_program_currency(purchase.currency)
    if rate is None:
        raise UnknownCurrency(f"no rate from {purchase.currency} to {program.currency}")
    contributions: dict[str, Decimal] = {}

    def add(rule: str, points: Decimal) -> None:
        contributions[rule] = contributions.get(rule, _ZERO) + points

    # The base rule is the same for every line: summed locally, recorded first.
    base_rule = f"base {program.points_per_unit} pt per 1.00 {program.currency}"
    contributions[base_rule] = _ZERO
    base_total = _ZERO
    per_unit = program.points_per_unit
    sku_multipliers, category_multipliers = program.sku_multipliers, program.category_multipliers
    campaigns = program.campaigns
    lines: list[LineEarning] = []
    subtotal = _ZERO
    for line in purchase.lines:
        net = line_net_amount(line) * rate
        points = net * per_unit
        base_total += points
        if sku_multipliers or category_multipliers:
            multiplier = sku_multipliers.get(line.sku)
            if multiplier is not None:
                rule = f"sku {line.sku} x{multiplier}"
            else:
                multiplier = category_multipliers.get(line.category)
                rule = f"category {line.category} x{multiplier}"
            if multiplier is not None and multiplier != _ONE:
                add(rule, points * (multiplier - _ONE))
                points *= multiplier
        for campaign in campaigns:
            if campaign.applies(
                occurred_at=purchase.occurred_at, channel=purchase.source, sku=line.sku, category=line.category
            ):
                add(f"campaign {campaign.name} x{campaign.multiplier}", points * (campaign.multiplier - _ONE))
                points *= campaign.multiplier
        lines.append(LineEarning(line.line_id, line.sku, net, points))
        subtotal += points
    contributions[base_rule] = base_total
    exact = subtotal * tier.multiplier
    if tier.multiplier != _ONE:
        add(f"tier {tier.name} x{tier.multiplier}", exact - subtotal)
    floored = int(exact.to_integral_value(rounding=ROUND_FLOOR))
    if exact != floored:
        add("rounding: floor per purchase", Decimal(floored) - exact)
    bonus = program.first_purchase_bonus_points if first_purchase and floored > 0 else 0
    if bonus:
        add("first purchase bonus", Decimal(bonus))
    points = floored + bonus
    capped = 0
    if program.daily_cap_points is not None:
        room = max(program.daily_cap_points - earned_today_points, 0)
        if points > room:
            capped = points - room
            add(f"daily cap {program.daily_cap_points}", Decimal(-capped))
            points = room
    breakdown: list[dict[str, str | int]] = [{"rule": r, "points": format(p.normalize(), "f")} for r, p in contributions.items()]
    return Earning(points, exact, lines, bonus, capped, tier.name, tier.multiplier, breakdown, rate)


def returned_points_after(lot: Lot) -> int:
    """What the lot's purchase is still entitled to once its lines' returns are applied:
    the same stacking as earning, on the part of each line not returned. Never more than
    was credited (a daily cap may have cut the credit)."""
    # Exact fractions: 3 points on 3.00 with 2.00 returned must keep exactly 1 point, where
    # Decimal's 1 - 2/3 would leave 0.999... and floor it to 0.
    kept = Fraction(0)
    for line in lot.lines:
        if line.net_amount > 0:
            remaining = max(line.net_amount - line.returned_amount, _ZERO)
            kept += Fraction(line.points) * Fraction(remaining) / Fraction(line.net_amount)
    entitled = math.floor(kept * Fraction(lot.tier_multiplier))
    if entitled > 0 or kept > 0:
        entitled += lot.bonus_points  # the bonus goes only when the whole purchase comes back
    return min(entitled, lot.earned_points)


def apply_returned_lines(lot: Lot, returned: Iterable[tuple[str, str, Decimal]]) -> list[str]:
    """Record returned amounts (line_id, sku, amount in program currency) on the lot's lines:
    by line_id, else the first line of the same SKU with something left to return. Returns
    the line ids that matched nothing (reported, not applied)."""
    by_id = {line.line_id: line for line in lot.lines}
    unmatched: list[str] = []
    for line_id, sku, amount in returned:
        line = by_id.get(line_id)
        if line is None:
            line = next((x for x in lot.lines if x.sku == sku and x.returned_amount < x.net_amount), None)
        if line is None:
            unmatched.append(line_id)
            continue
        line.returned_amount = min(line.returned_amount + amount, line.net_amount)
    return unmatched


# ---- operations -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Earned:
    customer_id: str
    lot: Lot
    earning: Earning
    debt_paid_points: int
    balance: Balance


@dataclass(frozen=True, slots=True)
class Reversed:
    customer_id: str
    return_id: str
    lot: Lot
    amount_points: int
    debt_points_added: int
    unmatched_lines: list[str]
    balance: Balance


@dataclass(frozen=True, slots=True)
class TierMoved:
    customer_id: str
    from_tier: str
    to_tier: str
    qualifying_points: int
    balance: Balance


def utc_day(moment: datetime) -> date:
    """The calendar day of a moment in UTC: the unit of the daily cap."""
    return moment.astimezone(timezone.utc).date()


def in_tier_window(program: Program, occurred_at: datetime, now: datetime) -> bool:
    return occurred_at > now - timedelta(days=program.tier_window_days)


def _pay_debt(book: CustomerBook, journal: Journal, *, source: Account, amount: int, cause: str,
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


def _retier(book: CustomerBook, program: Program) -> TierMoved | None:
    new_tier = program.tier_for(book.qualifying_points).name
    if new_tier == book.tier:
        return None
    old, book.tier = book.tier, new_tier
    book.changed = True
    return TierMoved(book.customer_id, old, new_tier, book.qualifying_points, book.balance())


def history_earns(history: bool, import_policy: str | None) -> bool:
    """What a purchase of imported history earns, by the policy it was imported under:
    `analytics` nothing (the purchases are there for the analytics only: no lot, no
    transfer, no event); `as-earned` as if earned at the time (tier, multipliers, maturity
    and expiry from the purchase's own time, what would have expired recorded as expired).
    A history purchase without a policy earns nothing. Live purchases always earn."""
    if not history:
        return True
    return import_policy == "as-earned"


# The reason code of an opening balance: a customer's points brought over from the
# retailer's old system with a history import (services/ledger/opening_balances.py).
OPENING_BALANCE = "opening_balance"


def is_opening_balance(reason_code: str) -> bool:
    return reason_code == OPENING_BALANCE


def opening_balance_id(customer_id: str) -> uuid.UUID:
    """One opening balance per customer: importing the balances again changes nothing."""
    return derived_event_id("ledger", OPENING_BALANCE, customer_id)


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


def earn(
    book: CustomerBook,
    journal: Journal,
    program: Program,
    rule_version: int,
    *,
    purchase: PurchasePayload,
    now: datetime,
    history: bool = False,
) -> list[Earned | TierMoved]:
    """Credit a sale as a new lot: pending inside the return window, then available.
    Tier, multipliers, maturity and expiry come from the purchase's own time; `now` (the
    ledger's clock) only says whether the return window has closed yet and what counts for
    the customer's current tier. Raises UnknownCurrency. The caller makes sure the purchase
    has no lot yet."""
    capped = program.daily_cap_points is not None  # the per-day tally is kept only for a cap
    day = utc_day(purchase.occurred_at) if capped else None
    earning = calculate_earning(
        program, purchase,
        tier=tier_at(book, program, purchase.occurred_at),
        first_purchase=not book.has_purchased,
        earned_today_points=book.earned_by_day.get(day, 0) if capped else 0,
    )
    matures_at = purchase.occurred_at + timedelta(days=program.pending_days)
    pending = matures_at > now
    ref = purchase_ref(purchase.source, purchase.purchase_id, purchase.store_id)
    lot = Lot(
        lot_id=derived_event_id("ledger", "lot", ref),
        customer_id=book.customer_id,
        source="purchase",
        purchase_id=purchase.purchase_id,
        purchase_source=purchase.source,
        purchase_store=purchase.store_id,
        currency_rate=earning.rate,
        history=history,
        occurred_at=purchase.occurred_at,
        amount_points=earning.points,
        remaining_points=earning.points,
        pending=pending,
        matures_at=matures_at,
        expires_at=matures_at + timedelta(days=program.expiry_days),
        rule_version=rule_version,
        qualifying=True,
        earned_points=earning.points,
        bonus_points=earning.bonus_points,
        tier_multiplier=earning.tier_multiplier,
        lines=earning.lines,
        breakdown=earning.breakdown,
        is_new=True,
    )
    book.lots[lot.lot_id] = lot
    book.has_purchased = True
    book.changed = True
    if capped:
        book.earned_by_day[day] = book.earned_by_day.get(day, 0) + earning.points
    target = book.pending if pending else book.available
    paid = 0
    if earning.points > 0:
        journal.post(Transfer(
            derived_event_id("ledger", "earn", ref), ISSUANCE, target.account_id, earning.points,
            Code.EARN, book.customer_id, purchase.purchase_id, lot_id=lot.lot_id, rule_version=rule_version,
            occurred_at=purchase.occurred_at,
        ))
        if book.debt.debits_posted > book.debt.credits_posted:
            paid = _pay_debt(book, journal, source=target, amount=earning.points,
                             cause=f"earn:{ref}", ref=f"earn:{purchase.purchase_id}", lot=lot)
    if in_tier_window(program, purchase.occurred_at, now):
        book.qualifying_points += earning.points
    out: list[Earned | TierMoved] = [Earned(book.customer_id, lot, earning, paid, book.balance())]
    moved = _retier(book, program)
    if moved:
        out.append(moved)
    return out


def reverse_return(
    book: CustomerBook,
    journal: Journal,
    program: Program,
    *,
    return_id: str,
    lot: Lot,
    returned: list[tuple[str, str, Decimal]],
    now: datetime,
    returned_at: datetime | None = None,
) -> list[Reversed | TierMoved]:
    """Take back the points of the returned lines from the purchase's lot. What the lot no
    longer has (spent, held, expired) becomes debt: the reversal is always recorded in
    full, and later earnings pay the debt first. A return made (`returned_at`, its business
    time) before the lot expired, but applied after the expiry ran (imported history, whose
    lots are settled at once; a rebuild), takes back expired points first: had it been
    applied in time, those points would have been reversed rather than expired, and the
    customer owes nothing for them."""
    if return_id in lot.return_ids:
        return []
    entitled_before = lot.earned_points - lot.reversed_points
    unmatched = apply_returned_lines(lot, returned)
    amount = entitled_before - returned_points_after(lot)
    lot.return_ids.append(return_id)
    lot.changed = True
    if amount <= 0:
        return [Reversed(book.customer_id, return_id, lot, 0, 0, unmatched, book.balance())]
    source = book.pending if lot.pending else book.available
    taken = min(amount, lot.remaining_points)
    shortfall = amount - taken
    unexpired = 0
    if shortfall and lot.expired_points and returned_at is not None and returned_at < lot.expires_at:
        unexpired = min(shortfall, lot.expired_points)
        journal.post(Transfer(
            derived_event_id("ledger", "reverse_expired", return_id, str(lot.lot_id)), EXPIRY, ISSUANCE, unexpired,
            Code.REVERSE, book.customer_id, return_id, lot_id=lot.lot_id, rule_version=lot.rule_version,
        ))
        lot.expired_points -= unexpired
        shortfall -= unexpired
    if taken:
        journal.post(Transfer(
            derived_event_id("ledger", "reverse", return_id, str(lot.lot_id)), source.account_id, ISSUANCE, taken,
            Code.REVERSE, book.customer_id, return_id, lot_id=lot.lot_id, rule_version=lot.rule_version,
        ))
        lot.remaining_points -= taken
    if shortfall:
        journal.post(Transfer(
            derived_event_id("ledger", "debt", return_id, str(lot.lot_id)), book.debt.account_id, ISSUANCE, shortfall,
            Code.DEBT, book.customer_id, return_id, lot_id=lot.lot_id, rule_version=lot.rule_version,
        ))
    lot.reversed_points += amount
    if lot.qualifying and in_tier_window(program, lot.occurred_at, now):
        book.qualifying_points -= amount
    book.changed = True
    out: list[Reversed | TierMoved] = [
        Reversed(book.customer_id, return_id, lot, amount, shortfall, unmatched, book.balance())
    ]
    moved = _retier(book, program)
    if moved:
        out.append(moved)
    return out


def requalify(book: CustomerBook, program: Program, qualifying_points: int) -> TierMoved | None:
    """Set the qualifying points recomputed over the window (earnings age out of it) and
    move the tier if they cross a threshold."""
    if qualifying_points != book.qualifying_points:
        book.qualifying_points = qualifying_points
        book.changed = True
    return _retier(book, program)


def qualifying_points_of(lots: Iterable[Lot], program: Program, now: datetime) -> int:
    return sum(
        lot.earned_points - lot.reversed_points
        for lot in lots
        if lot.qualifying and in_tier_window(program, lot.occurred_at, now)
    )


def mature(book: CustomerBook, journal: Journal, lot: Lot, *, now: datetime) -> int:
    """Move a lot whose return window has closed from pending to available. Returns the points moved."""
    if not lot.pending or lot.matures_at > now:
        return 0
    lot.pending = False
    lot.changed = True
    if lot.remaining_points > 0:
        journal.post(Transfer(
            derived_event_id("ledger", "mature", str(lot.lot_id)), book.pending.account_id, book.available.account_id,
            lot.remaining_points, Code.MATURE, book.customer_id, lot.purchase_id or str(lot.lot_id), lot_id=lot.lot_id,
            rule_version=lot.rule_version,
        ))
    return lot.remaining_points


def expire(book: CustomerBook, journal: Journal, lot: Lot, *, now: datetime) -> int:
    """Expire what is left of an available lot past its expiry date. Returns the points expired."""
    if lot.pending or lot.expires_at > now or lot.remaining_points <= 0:
        return 0
    amount = lot.remaining_points
    # The id includes what the lot had expired before: a refund may put points back on an
    # expired lot, and their expiry is a new transfer, while a re-run of the same expiry is not.
    # A return may take expired points back (reverse_return), lowering expired_points; the
    # reversed points (which only grow) then keep the id new.
    expired_before = str(lot.expired_points) if not lot.reversed_points else f"{lot.expired_points}/{lot.reversed_points}"
    journal.post(Transfer(
        derived_event_id("ledger", "expire", str(lot.lot_id), expired_before), book.available.account_id,
        EXPIRY, amount, Code.EXPIRE, book.customer_id, str(lot.lot_id), lot_id=lot.lot_id,
    ))
    lot.remaining_points = 0
    lot.expired_points += amount
    lot.changed = True
    return amount


def spendable_lots(book: CustomerBook) -> list[Lot]:
    """Available lots in the order spending consumes them: the ones that expire first."""
    lots = [lot for lot in book.lots.values() if not lot.pending and lot.remaining_points > 0]
    lots.sort(key=lambda lot: (lot.expires_at, lot.occurred_at, str(lot.lot_id)))
    return lots


def _take_from_lots(book: CustomerBook, amount: int) -> dict[str, int]:
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


def hold(
    book: CustomerBook,
    journal: Journal,
    *,
    redemption_id: uuid.UUID,
    amount_points: int,
    expires_at: datetime,
) -> Hold:
    """Reserve points for a redemption (a pending transfer to the redemption account),
    taking them from the lots that expire first. Raises InvalidAmount, InsufficientPoints.
    The book must hold every available lot of the customer."""
    if amount_points <= 0 or amount_points > MAX_POINTS_PER_POSTING:
        raise InvalidAmount(f"cost {amount_points} is not a positive number of points within range")
    if amount_points > book.available_points:
        raise InsufficientPoints(f"needs {amount_points}, {book.available_points} available")
    allocations = _take_from_lots(book, amount_points)
    for lot_id, taken in allocations.items():
        book.lots[uuid.UUID(lot_id)].held_points += taken
    transfer = journal.post(Transfer(
        derived_event_id("ledger", "hold", str(redemption_id)), book.available.account_id, REDEMPTION, amount_points,
        Code.HOLD, book.customer_id, str(redemption_id), phase=Phase.PENDING,
    ))
    h = Hold(redemption_id, book.customer_id, amount_points, "held", expires_at, transfer.transfer_id, allocations,
             is_new=True)
    book.holds[redemption_id] = h
    return h


def post_hold(book: CustomerBook, journal: Journal, h: Hold) -> bool:
    """Redeem held points (fulfilment). False if the hold is not in the held state."""
    if h.state != "held":
        return False
    journal.post(Transfer(
        derived_event_id("ledger", "post", str(h.redemption_id)), book.available.account_id, REDEMPTION,
        h.amount_points, Code.POST, book.customer_id, str(h.redemption_id), phase=Phase.POST_PENDING,
        pending_id=h.transfer_id,
    ))
    for lot_id, taken in h.allocations.items():
        lot = book.lots[uuid.UUID(lot_id)]
        lot.held_points -= taken
        lot.changed = True
    h.state, h.changed = "posted", True
    return True


def void_hold(book: CustomerBook, journal: Journal, h: Hold) -> bool:
    """Give held points back to the lots they came from. False if not held."""
    if h.state != "held":
        return False
    journal.post(Transfer(
        derived_event_id("ledger", "void", str(h.redemption_id)), book.available.account_id, REDEMPTION,
        h.amount_points, Code.VOID, book.customer_id, str(h.redemption_id), phase=Phase.VOID_PENDING,
        pending_id=h.transfer_id,
    ))
    for lot_id, taken in h.allocations.items():
        lot = book.lots[uuid.UUID(lot_id)]
        lot.held_points -= taken
        lot.remaining_points += taken
        lot.changed = True
    h.state, h.changed = "voided", True
    return True


@dataclass(frozen=True, slots=True)
class LateRedemption:
    """A fulfilment that arrived after its hold was voided, redeemed all the same: `taken`
    points from the available lots, the rest (`debt_points_added`) as debt."""

    hold: Hold
    taken_points: int
    debt_points_added: int
    balance: Balance


def redeem_after_void(book: CustomerBook, journal: Journal, h: Hold) -> LateRedemption | None:
    """The reward was given although the hold had been voided (the fulfilment reached us
    after the timeout): never a reward without points, so the hold's amount is redeemed now,
    from the lots that expire first, like any spending. What the available points no longer
    cover (spent meanwhile; pending points are not spendable) becomes debt, which later
    earnings pay first. The hold becomes posted, so a cancellation refunds it like any
    other. None if the hold is not voided. The book must hold every available lot."""
    if h.state != "voided":
        return None
    rid = str(h.redemption_id)
    taken = min(h.amount_points, book.available_points)
    shortfall = h.amount_points - taken
    allocations = _take_from_lots(book, taken) if taken else {}
    if taken:
        journal.post(Transfer(
            derived_event_id("ledger", "post_after_void", rid), book.available.account_id, REDEMPTION, taken,
            Code.POST, book.customer_id, rid,
        ))
    if shortfall:
        journal.post(Transfer(
            derived_event_id("ledger", "debt", "redemption", rid), book.debt.account_id, REDEMPTION, shortfall,
            Code.DEBT, book.customer_id, rid,
        ))
    # The void gave the first allocations back; these are the lots a refund returns to.
    h.allocations = allocations
    h.state, h.changed = "posted", True
    return LateRedemption(h, taken, shortfall, book.balance())


def refund(book: CustomerBook, journal: Journal, h: Hold, program: Program, *, now: datetime) -> bool:
    """Give redeemed points back (a fulfilled redemption was cancelled): to the lots they
    came from, with those lots' expiry dates, so a refund never extends a point's life.
    Debt is paid first. False if the hold was not posted.

    A late redemption may have left part of the amount as debt instead of lots: that part
    cancels what is still owed, and what the customer already repaid comes back as a new
    lot dated `now` (the cancellation's time) and expiring like an adjustment: the lots that
    repaid the debt are not traced, so these points alone may live longer than they would
    have. Debt still owed is cancelled whatever caused it (a return's debt too): the
    customer's total is right, the program accounts' split between them is not traced."""
    if h.state != "posted":
        return False
    rid = str(h.redemption_id)
    restored = sum(h.allocations.values())
    if restored:
        journal.post(Transfer(
            derived_event_id("ledger", "refund", rid), REDEMPTION, book.available.account_id, restored,
            Code.REFUND, book.customer_id, rid,
        ))
    for lot_id, taken in h.allocations.items():
        lot = book.lots[uuid.UUID(lot_id)]
        lot.remaining_points += taken
        lot.changed = True
    unallocated = h.amount_points - restored
    forgiven = min(unallocated, book.debt_points)
    if forgiven:
        journal.post(Transfer(
            derived_event_id("ledger", "refund", "debt", rid), REDEMPTION, book.debt.account_id, forgiven,
            Code.REFUND, book.customer_id, rid,
        ))
    repaid = unallocated - forgiven
    if repaid:
        lot = Lot(
            lot_id=derived_event_id("ledger", "lot", "refund", rid), customer_id=book.customer_id, source="refund",
            purchase_id=None, occurred_at=now, amount_points=repaid, remaining_points=repaid, pending=False,
            matures_at=now, expires_at=now + timedelta(days=program.expiry_days), rule_version=None, is_new=True,
        )
        book.lots[lot.lot_id] = lot
        journal.post(Transfer(
            derived_event_id("ledger", "refund", "lot", rid), REDEMPTION, book.available.account_id, repaid,
            Code.REFUND, book.customer_id, rid, lot_id=lot.lot_id,
        ))
    left = h.amount_points - forgiven
    for lot in spendable_lots(book):
        if book.debt_points == 0 or left == 0:
            break
        left -= _pay_debt(book, journal, source=book.available, amount=min(lot.remaining_points, left),
                          cause=f"refund:{h.redemption_id}:{lot.lot_id}", lot=lot)
    h.state, h.changed = "refunded", True
    return True


@dataclass(frozen=True, slots=True)
class Adjustment:
    """The audit row of a manual adjustment: who, why, when, and the transfer it caused."""

    adjustment_id: uuid.UUID
    customer_id: str
    amount_points: int
    reason_code: str
    actor: str
    note: str | None
    occurred_at: datetime

    @property
    def transfer_id(self) -> uuid.UUID:
        return adjustment_transfer_id(self.adjustment_id)


def adjustment_transfer_id(adjustment_id: uuid.UUID) -> uuid.UUID:
    """The transfer of an adjustment derives from the admin's id alone, so the adjustment
    replayed from ledger.adjustments posts the very transfer the admin API posted."""
    return derived_event_id("ledger", "adjust", str(adjustment_id))


def adjust(
    book: CustomerBook,
    journal: Journal,
    program: Program,
    *,
    adjustment_id: uuid.UUID,
    amount_points: int,
    now: datetime,
) -> Lot | None:
    """A manual correction. A credit is a new available lot (debt paid first); a debit takes
    points from the lots that expire first and never overdraws. Raises InvalidAmount,
    InsufficientPoints. Returns the new lot of a credit."""
    if amount_points == 0 or abs(amount_points) > MAX_POINTS_PER_POSTING:
        raise InvalidAmount(f"an adjustment must move a non-zero number of points, at most {MAX_POINTS_PER_POSTING}")
    ref = str(adjustment_id)
    transfer_id = adjustment_transfer_id(adjustment_id)
    if amount_points < 0:
        if -amount_points > book.available_points:
            raise InsufficientPoints(f"cannot take {-amount_points}, {book.available_points} available")
        _take_from_lots(book, -amount_points)
        journal.post(Transfer(transfer_id, book.available.account_id, ISSUANCE, -amount_points, Code.ADJUST,
                              book.customer_id, ref))
        return None
    lot = Lot(
        lot_id=derived_event_id("ledger", "lot", "adjustment", ref), customer_id=book.customer_id,
        source="adjustment", purchase_id=None, occurred_at=now, amount_points=amount_points,
        remaining_points=amount_points, pending=False, matures_at=now,
        expires_at=now + timedelta(days=program.expiry_days), rule_version=None, is_new=True,
    )
    book.lots[lot.lot_id] = lot
    journal.post(Transfer(transfer_id, ISSUANCE, book.available.account_id, amount_points, Code.ADJUST,
                          book.customer_id, ref, lot_id=lot.lot_id))
    _pay_debt(book, journal, source=book.available, amount=amount_points, cause=f"adjust:{ref}", lot=lot)
    book.changed = True
    return lot


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


def trial_balance(accounts: Iterable[Account]) -> tuple[int, int]:
    """(posted debits - posted credits, pending debits - pending credits) over all accounts: both 0."""
    posted = pending = 0
    for a in accounts:
        posted += a.debits_posted - a.credits_posted
        pending += a.debits_pending - a.credits_pending
    return posted, pending
