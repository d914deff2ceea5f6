"""rewards.events: the redemption saga as the rewards service drives it, keyed by customer_id.

The saga: RedemptionRequested -> ledger PointsHeld (or PointsHoldRejected) -> rewards reserves
stock and code -> RedemptionFulfilled -> ledger posts the hold (PointsRedeemed). Any failure
after the hold -> RedemptionFailed -> ledger voids it (PointsReleased, phase=void). A
cancellation of a fulfilled redemption -> RedemptionCancelled -> ledger gives the points back
(PointsReleased, phase=refund). redemption_id is the idempotency key on both sides.

After the saga, a physical reward is shipped (RedemptionShipped) and may be marked delivered
(RedemptionDelivered): news for the customer (engagement), no points move, and the ledger
ignores both.
"""

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from shared.events import Envelope


class _RedemptionPayload(BaseModel):
    model_config = ConfigDict(frozen=True)

    redemption_id: uuid.UUID
    reward_id: str
    cost_points: int


class RedemptionRequestedPayload(_RedemptionPayload):
    # How long the ledger keeps the hold before voiding it on its own.
    hold_timeout_s: int = 300


class RedemptionFulfilledPayload(_RedemptionPayload):
    kind: Literal["coupon", "voucher", "physical"]
    code: str | None = None
    fulfilled_at: datetime


class RedemptionFailedPayload(_RedemptionPayload):
    reason: str


class RedemptionCancelledPayload(_RedemptionPayload):
    reason: str
    # True when the points had been posted (fulfilled): the ledger refunds; else it voids.
    was_fulfilled: bool


class RedemptionShippedPayload(_RedemptionPayload):
    carrier: str
    tracking_number: str | None = None
    tracking_url: str | None = None
    shipped_at: datetime


class RedemptionDeliveredPayload(_RedemptionPayload):
    delivered_at: datetime


class RedemptionRequested(Envelope[RedemptionRequestedPayload]):
    type: Literal["RedemptionRequested"] = "RedemptionRequested"


class RedemptionFulfilled(Envelope[RedemptionFulfilledPayload]):
    type: Literal["RedemptionFulfilled"] = "RedemptionFulfilled"


class RedemptionFailed(Envelope[RedemptionFailedPayload]):
    type: Literal["RedemptionFailed"] = "RedemptionFailed"


class RedemptionCancelled(Envelope[RedemptionCancelledPayload]):
    type: Literal["RedemptionCancelled"] = "RedemptionCancelled"


class RedemptionShipped(Envelope[RedemptionShippedPayload]):
    type: Literal["RedemptionShipped"] = "RedemptionShipped"


class RedemptionDelivered(Envelope[RedemptionDeliveredPayload]):
    type: Literal["RedemptionDelivered"] = "RedemptionDelivered"


REWARDS_EVENT_TYPES = (RedemptionRequested, RedemptionFulfilled, RedemptionFailed, RedemptionCancelled,
                       RedemptionShipped, RedemptionDelivered)
# The types that tell about a redemption after the saga and move no points.
SHIPMENT_EVENT_TYPES = (RedemptionShipped, RedemptionDelivered)
