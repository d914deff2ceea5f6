"""points.events: everything the ledger did to a customer's points, each with the balance
after it. Produced by the ledger (through its outbox), keyed by customer_id."""

import uuid
from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from shared.events import Envelope


class BalanceAfter(BaseModel):
    """The customer's balance right after the posting the event reports."""

    model_config = ConfigDict(frozen=True)

    available_points: int
    pending_points: int
    held_points: int
    debt_points: int
    tier: str
    qualifying_points: int


class _PointsPayload(BaseModel):
    model_config = ConfigDict(frozen=True)

    amount_points: int
    balance: BalanceAfter
    # Caused by imported history (a past purchase earning as-earned, its maturity or expiry):
    # a fact for the books and the analytics, never news for the customer.
    history: bool = False


class PointsEarnedPayload(_PointsPayload):
    purchase_id: str
    source: str
    rule_version: int
    pending: bool
    matures_at: datetime | None
    expires_at: datetime
    tier_multiplier: str
    # Rule by rule, what produced the points (name -> points); informative, not for sums.
    breakdown: list[dict[str, str | int]] = []


class PointsMaturedPayload(_PointsPayload):
    purchase_id: str
    # The purchase's channel (a POS sale and an e-shop order may share an id); None for
    # points that are not from a purchase, or lots recorded before channels were kept.
    source: Literal["pos", "eshop"] | None = None


class PointsReversedPayload(_PointsPayload):
    return_id: str
    original_purchase_id: str
    # The channel of the sale and its return; None for lots recorded before channels were kept.
    source: Literal["pos", "eshop"] | None = None
    # Part of the reversal that could not be taken from the purchase's lots (already spent):
    # it became debt that later earnings pay off first.
    debt_points_added: int


class PointsHeldPayload(_PointsPayload):
    redemption_id: uuid.UUID
    hold_expires_at: datetime


class PointsHoldRejectedPayload(_PointsPayload):
    redemption_id: uuid.UUID
    reason: Literal["insufficient_points", "account_unknown", "invalid_amount", "duplicate_redemption"] | str


class PointsRedeemedPayload(_PointsPayload):
    redemption_id: uuid.UUID
    # True when the fulfilment arrived after the ledger had voided the hold (timed out): the
    # points were taken then, from the balance, and what it no longer covered became debt.
    after_hold_voided: bool = False
    debt_points_added: int = 0


class PointsReleasedPayload(_PointsPayload):
    redemption_id: uuid.UUID
    # void: the hold was cancelled before posting; refund: posted points given back
    phase: Literal["void", "refund"]
    reason: str


class PointsExpiredPayload(_PointsPayload):
    lot_ids: list[str]


class PointsWillExpirePayload(_PointsPayload):
    expires_on: date


class PointsAdjustedPayload(_PointsPayload):
    reason_code: str
    actor: str
    note: str | None = None


class TierChangedPayload(BaseModel):
    model_config = ConfigDict(frozen=True)

    from_tier: str
    to_tier: str
    qualifying_points: int
    balance: BalanceAfter
    history: bool = False


class PointsEarned(Envelope[PointsEarnedPayload]):
    type: Literal["PointsEarned"] = "PointsEarned"


class PointsMatured(Envelope[PointsMaturedPayload]):
    type: Literal["PointsMatured"] = "PointsMatured"


class PointsReversed(Envelope[PointsReversedPayload]):
    type: Literal["PointsReversed"] = "PointsReversed"


class PointsHeld(Envelope[PointsHeldPayload]):
    type: Literal["PointsHeld"] = "PointsHeld"


class PointsHoldRejected(Envelope[PointsHoldRejectedPayload]):
    type: Literal["PointsHoldRejected"] = "PointsHoldRejected"


class PointsRedeemed(Envelope[PointsRedeemedPayload]):
    type: Literal["PointsRedeemed"] = "PointsRedeemed"


class PointsReleased(Envelope[PointsReleasedPayload]):
    type: Literal["PointsReleased"] = "PointsReleased"


class PointsExpired(Envelope[PointsExpiredPayload]):
    type: Literal["PointsExpired"] = "PointsExpired"


class PointsWillExpire(Envelope[PointsWillExpirePayload]):
    type: Literal["PointsWillExpire"] = "PointsWillExpire"


class PointsAdjusted(Envelope[PointsAdjustedPayload]):
    type: Literal["PointsAdjusted"] = "PointsAdjusted"


class TierChanged(Envelope[TierChangedPayload]):
    type: Literal["TierChanged"] = "TierChanged"


POINTS_EVENT_TYPES = (
    PointsEarned, PointsMatured, PointsReversed, PointsHeld, PointsHoldRejected, PointsRedeemed,
    PointsReleased, PointsExpired, PointsWillExpire, PointsAdjusted, TierChanged,
)
