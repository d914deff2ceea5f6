"""purchases.recorded: sales, returns and claims as validated and recorded by the purchases service."""

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.events import SCHEMA_VERSION, Envelope, Money, json_opt_str, json_str


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
    # Imported history (the importer, purchases.import): a past purchase brought in from the
    # retailer's old system. Every consumer can tell: the ledger earns by `import_policy`,
    # engagement never starts a journey or sends a message for it, churn counts it.
    history: bool = Field(default=False, description="True for imported past purchases")
    import_policy: Literal["analytics", "as-earned"] | None = Field(
        default=None, description="For history: analytics earns nothing; as-earned earns as if live at the time")


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




def lines_json(lines) -> str:
    """Purchase lines (objects with PurchaseLine's fields) as a JSON array, money as the
    contract writes it: the event template's and the purchases table's serialisation."""
    return "[" + ",".join(
        f'{{"line_id":{json_str(line.line_id)},"sku":{json_str(line.sku)},"category":{json_str(line.category)},'
        f'"quantity":{int(line.quantity)},"unit_price":"{format(line.unit_price, "f")}",'
        f'"discount":"{format(line.discount, "f")}"}}'
        for line in lines) + "]"


def purchase_event_json(*, event_type: str, event_id: str, recorded_at: datetime, producer: str,
                        correlation_id: str, customer_id: str | None, purchase, door: str,
                        history: bool = False, import_policy: str | None = None) -> bytes:
    """PurchaseRecorded or ReturnRecorded as JSON, written from a template: the purchases
    service's hot path (about a sixth of the cost of model_construct + model_dump_json).
    `purchase` is any object with the payload's fields (the service's validated input).
    tests/unit/test_purchase_events.py holds it to the contract models."""
    p = purchase
    occurred = json_str(p.occurred_at.isoformat())
    lines = lines_json(p.lines)
    return (
        f'{{"event_id":"{event_id}","type":"{event_type}","schema_version":{SCHEMA_VERSION},'
        f'"occurred_at":{occurred},"recorded_at":{json_str(recorded_at.isoformat())},"producer":{json_str(producer)},'
        f'"correlation_id":{json_str(correlation_id)},"causation_id":null,"customer_id":{json_opt_str(customer_id)},'
        f'"payload":{{"purchase_id":{json_str(p.purchase_id)},"type":{json_str(p.type)},'
        f'"original_purchase_id":{json_opt_str(p.original_purchase_id)},"source":{json_str(p.source)},'
        f'"store_id":{json_str(p.store_id)},"occurred_at":{occurred},"currency":{json_str(p.currency)},'
        f'"lines":{lines},"total":"{format(p.total, "f")}","door":{json_str(door)},'
        f'"history":{"true" if history else "false"},"import_policy":{json_opt_str(import_policy)}}}}}'
    ).encode()
