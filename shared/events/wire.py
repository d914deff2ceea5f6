"""Fast decoders for the hottest wire contracts (purchases.recorded: read by the ledger, churn
and engagement for every sale).

The pydantic models in shared/events stay the contract: they are documented (AsyncAPI,
OpenAPI), they give the refusal reasons, and they decide. The msgspec structs here read the
same JSON about four times faster, with no per-field Python callback, and their objects are
not tracked by the garbage collector. They accept only a strict subset of what the contract
accepts (ASCII documents, aware ISO 8601 times of at most microsecond precision, money as a
plain decimal string): anything else, valid or not, goes to the pydantic decoder, which accepts it or
refuses it with its reasons. tests/unit/test_wire_decoders.py holds the two equal on valid
and hostile inputs: whatever msgspec accepts, pydantic accepts with the same values.

Attribute names are the contract's, so consumers read either kind of object alike."""

import re
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec

from shared.events import SCHEMA_VERSION

# Money as our producers write it (format(d, "f")): digits, one optional point, a sign. A
# JSON number, an exponent, "NaN", whitespace or other digits take the contract's path.
_Money = Annotated[str, msgspec.Meta(pattern=r"^-?[0-9]+(\.[0-9]+)?$")]
_Aware = Annotated[datetime, msgspec.Meta(tz=True)]
# msgspec rounds a fraction of more than six digits, pydantic truncates it: such a time (or
# anything that looks like one) takes the contract's path.
_LONG_FRACTION = re.compile(rb"\.[0-9]{7}")  # (a comma fraction msgspec refuses anyway)


class WireLine(msgspec.Struct, frozen=True, gc=False):
    line_id: str
    sku: str
    category: str
    quantity: int
    unit_price_text: _Money = msgspec.field(name="unit_price")
    discount_text: _Money = msgspec.field(default="0", name="discount")

    @property
    def unit_price(self) -> Decimal:
        return Decimal(self.unit_price_text)

    @property
    def discount(self) -> Decimal:
        return Decimal(self.discount_text)

    @property
    def net_amount(self) -> Decimal:
        """What the customer paid for this line: quantity x unit price, minus the discount."""
        return self.quantity * Decimal(self.unit_price_text) - Decimal(self.discount_text)


class WirePurchase(msgspec.Struct, frozen=True, kw_only=True):
    purchase_id: str
    type: Literal["sale", "return"]
    source: Literal["pos", "eshop"]
    store_id: str
    occurred_at: _Aware
    currency: str
    lines: list[WireLine]
    total_text: _Money = msgspec.field(name="total")
    door: str
    original_purchase_id: str | None = None
    history: bool = False
    import_policy: Literal["analytics", "as-earned"] | None = None

    @property
    def total(self) -> Decimal:
        return Decimal(self.total_text)


class WireClaimedPurchase(WirePurchase, frozen=True, kw_only=True):
    claimed_at: _Aware


class _WireEnvelope(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    event_id: uuid.UUID
    occurred_at: _Aware
    recorded_at: _Aware
    producer: str
    correlation_id: str
    customer_id: str | None
    schema_version: int = SCHEMA_VERSION
    causation_id: str | None = None

    @property
    def type(self) -> str:
        return type(self).__struct_config__.tag  # type: ignore[return-value]


class WirePurchaseRecorded(_WireEnvelope, frozen=True, kw_only=True, tag="PurchaseRecorded"):
    payload: WirePurchase


class WireReturnRecorded(_WireEnvelope, frozen=True, kw_only=True, tag="ReturnRecorded"):
    payload: WirePurchase


class WirePurchaseClaimed(_WireEnvelope, frozen=True, kw_only=True, tag="PurchaseClaimed"):
    payload: WireClaimedPurchase


WirePurchaseEvent = WirePurchaseRecorded | WireReturnRecorded | WirePurchaseClaimed
_PURCHASE_EVENTS = msgspec.json.Decoder(WirePurchaseEvent)


def fast_or(fallback: Callable[[Any], Any], decoder: msgspec.json.Decoder = _PURCHASE_EVENTS,
            ) -> Callable[[Any], Any]:
    """A pipeline decoder: the msgspec decoder where it accepts, the contract's (`fallback`,
    e.g. shared.pipeline.pydantic_decoder) for everything else, refusals included."""

    def decode(record: Any) -> Any:
        value = record.value
        # ASCII only (what our producers write): msgspec does not check the UTF-8 of fields
        # it skips, pydantic refuses a document with any invalid byte.
        if value.isascii() and _LONG_FRACTION.search(value) is None:
            try:
                return decoder.decode(value)
            except (msgspec.MsgspecError, RecursionError):  # deep nesting too: the contract says why
                pass
        return fallback(record)

    return decode
