"""ledger.adjustments: the manual adjustments the ledger accepted through its admin API, keyed
by customer_id. Produced by the ledger (through its outbox, in the transaction that applied
the adjustment) and consumed by the ledger itself: a rebuild from offset 0 replays them with
purchases.recorded and rewards.events, so the back office's corrections are not lost.

event_id derives from adjustment_id (the admin's idempotency key): a re-sent request names
the same event. A refused adjustment (an overdraft, 0 points) is never written.
"""

import uuid
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, model_validator

from shared.events import Envelope


class AdjustmentRecordedPayload(BaseModel):
    model_config = ConfigDict(frozen=True)

    adjustment_id: uuid.UUID
    customer_id: str
    # Positive credits, negative debits; never 0.
    amount_points: int
    reason_code: str
    actor: str
    note: str | None = None
    # When the ledger accepted it: a credit's lot is available from then and expires the
    # program's expiry_days later, in the original and in a rebuild alike.
    occurred_at: AwareDatetime


class AdjustmentRecorded(Envelope[AdjustmentRecordedPayload]):
    type: Literal["AdjustmentRecorded"] = "AdjustmentRecorded"

    @model_validator(mode="after")
    def _one_customer(self) -> "AdjustmentRecorded":
        # The key (envelope customer_id) orders the customer's events; it must be the one adjusted.
        if self.customer_id != self.payload.customer_id:
            raise ValueError("customer_id of the envelope and of the payload differ")
        return self


ADJUSTMENT_EVENT_TYPES = (AdjustmentRecorded,)
