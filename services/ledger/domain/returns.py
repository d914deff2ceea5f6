"""Returns: the points of the returned lines taken back from the sale's lot; what the lot no
longer has becomes debt."""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from fractions import Fraction

from services.ledger.domain.accounts import EXPIRY, ISSUANCE, Code, Journal, Transfer
from services.ledger.domain.books import Balance, CustomerBook, Lot
from services.ledger.domain.tiers import TierMoved, in_tier_window, retier
from services.ledger.program import Program
from shared.events import derived_event_id

_ZERO = Decimal(0)


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


@dataclass(frozen=True, slots=True)
class Reversed:
    customer_id: str
    return_id: str
    lot: Lot
    amount_points: int
    debt_points_added: int
    unmatched_lines: list[str]
    balance: Balance


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
    moved = retier(book, program)
    if moved:
        out.append(moved)
    return out
