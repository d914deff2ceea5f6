"""Purchase validation rules and the inbound contract. Pure: no I/O."""

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any, Literal

import pycountry
from pydantic_core import PydanticCustomError
from pydantic import AfterValidator, AwareDatetime, BeforeValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

# Identifiers: printable, no NUL (PostgreSQL text cannot hold it), bounded.
Ident = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
def _no_sequences(value: Any) -> Any:
    """pydantic reads a JSON array as a Decimal tuple ([0, [1, 2, 5], -1] is 12.5): money is a
    string or a number, never an array."""
    if isinstance(value, (list, tuple)):
        raise ValueError("an amount must be a decimal string or a number")
    return value


_FOUR_PLACES = Decimal("0.0001")
_TEN_DIGITS = Decimal(10) ** 10


def _bounded(value: Decimal) -> Decimal:
    """At most 10 digits before the point and 4 after (trailing zeros do not count): what
    Field(max_digits=14, decimal_places=4) checks, at a fraction of its cost (pydantic runs
    those two in Python; they were a tenth of the service's CPU per purchase)."""
    if value >= _TEN_DIGITS:
        raise PydanticCustomError("decimal_whole_digits",
                                  "Decimal input should have no more than 10 digits before the decimal point")
    if value.quantize(_FOUR_PLACES) != value:
        raise PydanticCustomError("decimal_max_places", "Decimal input should have no more than 4 decimal places")
    return value


Amount = Annotated[Decimal, BeforeValidator(_no_sequences), Field(ge=0), AfterValidator(_bounded)]

KNOWN_CURRENCIES = frozenset(c.alpha_3 for c in pycountry.currencies)


class LineIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    line_id: Ident
    sku: Ident
    category: Ident
    quantity: int = Field(ge=1, le=100_000)
    unit_price: Amount
    discount: Amount = Decimal("0")

    @property
    def net_amount(self) -> Decimal:
        return self.quantity * self.unit_price - self.discount


class PurchaseIn(BaseModel):
    """The inbound purchase contract (every door maps onto it). Structural checks only;
    business checks that need a clock or recorded state are below."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    purchase_id: Ident
    type: Literal["sale", "return"]
    original_purchase_id: Ident | None = None
    source: Literal["pos", "eshop"]
    store_id: Ident
    customer_id: Ident | None = None
    occurred_at: AwareDatetime
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
    lines: list[LineIn] = Field(min_length=1, max_length=500)
    total: Amount

    @model_validator(mode="after")
    def _shape(self) -> "PurchaseIn":
        if self.type == "return" and self.original_purchase_id is None:
            raise ValueError("a return must name original_purchase_id")
        if self.type == "sale" and self.original_purchase_id is not None:
            raise ValueError("a sale cannot have original_purchase_id")
        ids = [line.line_id for line in self.lines]
        if len(ids) != len(set(ids)):
            raise ValueError("line_id values must be unique within a purchase")
        for i, line in enumerate(self.lines):
            if line.discount > line.quantity * line.unit_price:
                raise ValueError(f"lines[{i}].discount exceeds quantity x unit_price")
        return self

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.purchase_id)

    def content_hash(self) -> bytes:
        """Same purchase, same hash, whatever the JSON spelling ("12.5" vs "12.50", key
        order, time zone): a resend is recognised as a duplicate, a change as a conflict."""
        parts = [self.purchase_id, self.type, self.original_purchase_id or "", self.source, self.store_id,
                 self.customer_id or "", str((self.occurred_at - _EPOCH) // _MICROSECOND), self.currency,
                 _canonical_decimal(self.total)]
        for line in self.lines:
            parts += (line.line_id, line.sku, line.category, str(line.quantity), _canonical_decimal(line.unit_price),
                      _canonical_decimal(line.discount))
        # \x1f cannot occur inside a field (identifiers refuse control characters).
        return hashlib.sha256("\x1f".join(parts).encode()).digest()


_CENT = Decimal("0.01")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def _canonical_decimal(d: Decimal) -> str:
    return format(d.normalize(), "f") if d else "0"


# ---- rejections ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejection:
    """Why an input was refused: a short machine reason (a metric label) and field errors."""

    reason: str
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def message(self) -> str:
        if not self.errors:
            return self.reason
        return "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in self.errors)


def rejection_from_validation_error(exc: ValidationError) -> Rejection:
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors(include_url=False)]
    return Rejection("schema", errors)


def parse_purchase(raw: bytes | str | dict[str, Any]) -> PurchaseIn | Rejection:
    try:
        if isinstance(raw, dict):
            return PurchaseIn.model_validate(raw)
        return PurchaseIn.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            return Rejection("malformed_json", [{"loc": [], "msg": "body is not valid JSON", "type": "json_invalid"}])
        return rejection_from_validation_error(exc)
    except (ValueError, TypeError, RecursionError) as exc:  # a validator's own error, not pydantic's
        return Rejection("schema", [{"loc": [], "msg": f"{type(exc).__name__}: {exc}", "type": "invalid"}])


def check_purchase(p: PurchaseIn, *, now: datetime, max_clock_skew_s: int, max_age_days: int) -> Rejection | None:
    """Checks that need no recorded state: currency, total, timestamp."""
    if p.currency not in KNOWN_CURRENCIES:
        return Rejection("unknown_currency", [{"loc": ["currency"], "msg": f"{p.currency} is not an ISO 4217 code",
                                               "type": "unknown_currency"}])
    expected = sum((line.net_amount for line in p.lines), Decimal("0"))
    if expected != p.total:
        return Rejection("total_mismatch", [{"loc": ["total"], "msg": f"total {p.total} does not match the lines "
                                             f"(sum of quantity x unit_price - discount = {expected})",
                                             "type": "total_mismatch"}])
    if p.occurred_at > now + timedelta(seconds=max_clock_skew_s):
        return Rejection("timestamp_future", [{"loc": ["occurred_at"], "msg": f"occurred_at is in the future "
                                               f"(more than {max_clock_skew_s}s ahead of {now.isoformat()})",
                                               "type": "timestamp_future"}])
    if p.occurred_at < now - timedelta(days=max_age_days):
        return Rejection("timestamp_too_old", [{"loc": ["occurred_at"], "msg": f"occurred_at is more than "
                                                f"{max_age_days} days old", "type": "timestamp_too_old"}])
    return None


@dataclass(frozen=True)
class RecordedSale:
    """What a return is checked against: the recorded sale and what was returned already."""

    source: str
    purchase_id: str
    type: str
    customer_id: str | None
    currency: str
    occurred_at: datetime
    quantities: dict[str, int]
    returned: dict[str, int]
    # line_id -> (unit_price, discount) as sold: a return cannot claim back more than was paid.
    prices: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)


def check_return(r: PurchaseIn, sale: RecordedSale | None) -> Rejection | None:
    """A return names a recorded sale and returns no more of a line than was bought,
    counting earlier (partial) returns."""
    if sale is None or sale.type != "sale":
        return Rejection("unknown_original", [{"loc": ["original_purchase_id"],
                                               "msg": f"no recorded {r.source} sale {r.original_purchase_id}",
                                               "type": "unknown_original"}])
    if r.currency != sale.currency:
        return Rejection("currency_mismatch", [{"loc": ["currency"], "msg": f"the sale was in {sale.currency}",
                                                "type": "currency_mismatch"}])
    errors = []
    for i, line in enumerate(r.lines):
        bought = sale.quantities.get(line.line_id)
        if bought is None:
            errors.append({"loc": ["lines", i, "line_id"], "msg": f"line {line.line_id} is not in the sale",
                           "type": "unknown_line"})
            continue
        left = bought - sale.returned.get(line.line_id, 0)
        if line.quantity > left:
            errors.append({"loc": ["lines", i, "quantity"],
                           "msg": f"returns {line.quantity} of line {line.line_id}, only {left} left to return "
                                  f"(bought {bought})", "type": "over_return"})
        if line.line_id in sale.prices:
            errors += _price_errors(i, line, bought, *sale.prices[line.line_id])
    if errors:
        types = {e["type"] for e in errors}
        return Rejection(next(t for t in _RETURN_REASONS if t in types), errors)
    return None


# The reason a refused return is filed under when several of its lines are wrong.
_RETURN_REASONS = ("unknown_line", "price_mismatch", "amount_exceeds_sale", "over_return")


def _price_errors(i: int, line: LineIn, bought: int, unit_price: Decimal, discount: Decimal) -> list[dict[str, Any]]:
    """The returned line is priced as sold, and refunds at most its share of what was paid
    (a cent of rounding allowed for pro-rata discounts)."""
    if line.unit_price != unit_price:
        return [{"loc": ["lines", i, "unit_price"], "type": "price_mismatch",
                 "msg": f"line {line.line_id} was sold at {unit_price}, not {line.unit_price}"}]
    paid_share = (unit_price * bought - discount) * line.quantity / bought
    if line.net_amount > paid_share + Decimal("0.01"):
        return [{"loc": ["lines", i, "discount"], "type": "amount_exceeds_sale",
                 "msg": f"returns {line.net_amount} for line {line.line_id}; its share of what was paid is "
                        f"{paid_share.quantize(Decimal('0.01'))}"}]
    return []


def returned_after(sale: RecordedSale, r: PurchaseIn) -> dict[str, int]:
    returned = dict(sale.returned)
    for line in r.lines:
        returned[line.line_id] = returned.get(line.line_id, 0) + line.quantity
    return returned


class ClaimRefused(Exception):
    def __init__(self, reason: str, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


def check_claim(*, sale_customer_id: str | None, claimed_by: str, sale_occurred_at: datetime, now: datetime,
                window_days: int, fully_returned: bool) -> bool:
    """True when the claim is new, False when it repeats an identical earlier claim.
    Raises ClaimRefused otherwise."""
    if sale_customer_id == claimed_by:
        return False
    if sale_customer_id is not None:
        raise ClaimRefused("already_claimed", "the purchase already belongs to a customer")
    if now - sale_occurred_at > timedelta(days=window_days):
        raise ClaimRefused("claim_window_closed", f"purchases can be claimed within {window_days} days", status=422)
    if fully_returned:
        raise ClaimRefused("fully_returned", "every line of the purchase was returned; nothing to claim", status=422)
    return True


def kept_lines(lines: list[dict[str, Any]], returned: dict[str, int]) -> list[dict[str, Any]]:
    """The lines a customer kept after returns: quantities reduced, discounts pro rata
    (rounded to 0.0001; the discount of a fully kept line is untouched)."""
    kept = []
    for line in lines:
        qty = int(line["quantity"])
        left = qty - returned.get(line["line_id"], 0)
        if left <= 0:
            continue
        discount = Decimal(line["discount"])
        if left != qty:  # to the 1/10,000: unit prices may have four decimals
            discount = (discount * left / qty).quantize(Decimal("0.0001"))
            if discount == discount.quantize(_CENT):  # keep "0.50", not "0.5000"
                discount = discount.quantize(_CENT)
        kept.append({**line, "quantity": left, "discount": format(discount, "f")})
    return kept
