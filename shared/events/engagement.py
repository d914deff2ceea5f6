"""engagement.events: what the engagement service did and heard, keyed by customer_id.
No contact data travels here (no e-mail address, no phone number): only what consumers
(churn's satisfaction index and departing-customer study) need."""

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.events import Envelope

Channel = Literal["email", "webhook", "sms"]


class _EngagementPayload(BaseModel):
    model_config = ConfigDict(frozen=True)


class TouchpointSentPayload(_EngagementPayload):
    touchpoint_id: uuid.UUID
    journey: str
    journey_version: int
    step: str
    channel: Channel
    trigger_event_id: uuid.UUID
    purchase_id: str | None = None
    sent_at: datetime


class TouchpointSkippedPayload(_EngagementPayload):
    touchpoint_id: uuid.UUID
    journey: str
    journey_version: int
    step: str
    channel: Channel | None = None
    trigger_event_id: uuid.UUID
    reason: str = Field(description="e.g. no_consent, unsubscribed, condition_false, stale, exited, failed")


class SurveyAnsweredPayload(_EngagementPayload):
    survey_id: uuid.UUID
    nps: int | None = Field(default=None, ge=0, le=10)
    csat: int | None = Field(default=None, ge=1, le=5)
    has_remark: bool = False
    purchase_id: str | None = None
    store_id: str | None = None
    category: str | None = None
    answered_at: datetime


class ComplaintOpenedPayload(_EngagementPayload):
    complaint_id: uuid.UUID
    followup_id: uuid.UUID | None = None
    purchase_id: str | None = None
    store_id: str | None = None
    category: str | None = None
    source: Literal["survey", "complaint_form", "api"] = "api"
    due_at: datetime
    opened_at: datetime


class ComplaintResolvedPayload(_EngagementPayload):
    complaint_id: uuid.UUID
    followup_id: uuid.UUID | None = None
    resolved_at: datetime
    within_deadline: bool


class ConsentChangedPayload(_EngagementPayload):
    channel: Channel
    granted: bool
    source: str = Field(description="e.g. contact_api, unsubscribe_link, shopify_order")
    changed_at: datetime





class TouchpointSent(Envelope[TouchpointSentPayload]):
    type: Literal["TouchpointSent"] = "TouchpointSent"


class TouchpointSkipped(Envelope[TouchpointSkippedPayload]):
    type: Literal["TouchpointSkipped"] = "TouchpointSkipped"


class SurveyAnswered(Envelope[SurveyAnsweredPayload]):
    type: Literal["SurveyAnswered"] = "SurveyAnswered"


class ComplaintOpened(Envelope[ComplaintOpenedPayload]):
    type: Literal["ComplaintOpened"] = "ComplaintOpened"


class ComplaintResolved(Envelope[ComplaintResolvedPayload]):
    type: Literal["ComplaintResolved"] = "ComplaintResolved"


class ConsentChanged(Envelope[ConsentChangedPayload]):
    type: Literal["ConsentChanged"] = "ConsentChanged"


ENGAGEMENT_EVENT_TYPES = (TouchpointSent, TouchpointSkipped, SurveyAnswered, ComplaintOpened, ComplaintResolved,
                          ConsentChanged)
