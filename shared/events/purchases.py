"""purchases.recorded: sales, returns and claims as validated and recorded by the purchases service."""

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.events import Envelope, Money


class PurchaseLine(BaseModel):
    model_config = ConfigDict(frozen=True)

    line_id: str
    sku: str
    category: str
    quantity: int
    unit_price: Money
    discount: Money = Decimal("0")

    @property
    def net_amount(self) -> Decimal:
        """What the customer paid for this line: quantity x unit price, minus the discount."""
        return self.quantity * self.unit_price - self.discount


class PurchasePayload(BaseModel):
    """A validated sale or return as recorded by the purchases service."""

    model_config = ConfigDict(frozen=True)

    purchase_id: str
    type: Literal["sale", "return"]
    original_purchase_id: str | None = None
    source: Literal["pos", "eshop"]
    store_id: str
    occurred_at: datetime
    currency: str
    lines: list[PurchaseLine]
    total: Money
    door: str = Field(description="Where it came in: kafka, http, shopify, woocommerce")


class PurchaseClaimedPayload(PurchasePayload):
    """An anonymous sale claimed by a customer: carries the whole purchase so that
    consumers can act on it as if it had been recorded with the customer."""

    claimed_at: datetime


class PurchaseRecorded(Envelope[PurchasePayload]):
    type: Literal["PurchaseRecorded"] = "PurchaseRecorded"


class ReturnRecorded(Envelope[PurchasePayload]):
    type: Literal["ReturnRecorded"] = "ReturnRecorded"


class PurchaseClaimed(Envelope[PurchaseClaimedPayload]):
    type: Literal["PurchaseClaimed"] = "PurchaseClaimed"


