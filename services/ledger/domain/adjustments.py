"""Manual adjustments (a credit is a new lot, a debit spends like a hold) and opening balances."""

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.ledger.domain.accounts import ISSUANCE, MAX_POINTS_PER_POSTING, Code, Journal, Transfer
from services.ledger.domain.books import CustomerBook, Lot, pay_debt, take_from_lots
from services.ledger.domain.errors import InsufficientPoints, InvalidAmount
from services.ledger.program import Program
from shared.events import derived_event_id


# The reason code of an opening balance: a customer's points brought over from the
# retailer's old system with a history import (services/ledger/opening_balances.py).
OPENING_BALANCE = "opening_balance"


def is_opening_balance(reason_code: str) -> bool:
    return reason_code == OPENING_BALANCE


def opening_balance_id(customer_id: str) -> uuid.UUID:
    """One opening balance per customer: importing the balances again changes nothing."""
    return derived_event_id("ledger", OPENING_BALANCE, customer_id)


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
        take_from_lots(book, -amount_points)
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
    pay_debt(book, journal, source=book.available, amount=amount_points, cause=f"adjust:{ref}", lot=lot)
    book.changed = True
    return lot
