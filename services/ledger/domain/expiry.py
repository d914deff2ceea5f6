"""Lots moved by time: matured when their return window closes, expired past their date."""

from datetime import datetime

from services.ledger.domain.accounts import EXPIRY, Code, Journal, Transfer
from services.ledger.domain.books import CustomerBook, Lot
from shared.events import derived_event_id


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
