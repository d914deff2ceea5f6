"""Redemptions: holds (pending transfers) posted or voided, a fulfilment redeemed after its
hold was voided, refunds of what was redeemed."""

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.ledger.domain.accounts import MAX_POINTS_PER_POSTING, REDEMPTION, Code, Journal, Phase, Transfer
from services.ledger.domain.books import Balance, CustomerBook, Hold, Lot, pay_debt, spendable_lots, take_from_lots
from services.ledger.domain.errors import InsufficientPoints, InvalidAmount
from services.ledger.program import Program
from shared.events import derived_event_id


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
    allocations = take_from_lots(book, amount_points)
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
    allocations = take_from_lots(book, taken) if taken else {}
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
        left -= pay_debt(book, journal, source=book.available, amount=min(lot.remaining_points, left),
                         cause=f"refund:{h.redemption_id}:{lot.lot_id}", lot=lot)
    h.state, h.changed = "refunded", True
    return True
