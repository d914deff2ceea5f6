"""churn.alerts: what the churn service learned about a customer's relationship, keyed by
customer_id. Alerts are state transitions, each emitted once per episode (its event_id
derives from the customer and the episode), with the reasons and the customer's value."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.events import Envelope, Money

Segment = Literal["Champions", "Loyal", "Potential loyalist", "New", "Promising", "Need attention",
                  "About to sleep", "At risk", "Can't lose them", "Hibernating", "Lost"]
Quadrant = Literal["true_friend", "butterfly", "barnacle", "stranger"]
RiskState = Literal["active", "at_risk", "lost"]


class AlertReason(BaseModel):
    """One signal behind an alert, with its values (e.g. overdue: days since the last
    purchase against k x the customer's median interval)."""

    model_config = ConfigDict(frozen=True)

    signal: Literal["overdue", "low_p_alive", "lost_threshold", "purchased_again"]
    detail: str
    value: float | None = None
    threshold: float | None = None


class _AlertPayload(BaseModel):
    model_config = ConfigDict(frozen=True)

    episode: int = Field(description="The customer's at-risk episode number (1, 2, ...)")
    reasons: list[AlertReason] = []
    segment: Segment | None = None
    quadrant: Quadrant | None = None
    ltv: Money | None = Field(default=None, description="Expected lifetime value over the configured horizon")
    currency: str | None = None
    priority: Literal["high", "medium", "low"] = "medium"
    p_alive: float | None = None
    days_since_last_purchase: int | None = None
    fit_version: int | None = Field(default=None, description="The model fit the scores came from")


class CustomerAtRiskPayload(_AlertPayload):
    pass


class CustomerRecoveredPayload(_AlertPayload):
    pass


class CustomerLostPayload(_AlertPayload):
    pass


class SegmentChangedPayload(BaseModel):
    model_config = ConfigDict(frozen=True)

    from_segment: Segment | None
    to_segment: Segment
    recency_score: int
    frequency_score: int
    monetary_score: int
    as_of: datetime


class CustomerAtRisk(Envelope[CustomerAtRiskPayload]):
    type: Literal["CustomerAtRisk"] = "CustomerAtRisk"


class CustomerRecovered(Envelope[CustomerRecoveredPayload]):
    type: Literal["CustomerRecovered"] = "CustomerRecovered"


class CustomerLost(Envelope[CustomerLostPayload]):
    type: Literal["CustomerLost"] = "CustomerLost"


class SegmentChanged(Envelope[SegmentChangedPayload]):
    type: Literal["SegmentChanged"] = "SegmentChanged"


CHURN_EVENT_TYPES = (CustomerAtRisk, CustomerRecovered, CustomerLost, SegmentChanged)
