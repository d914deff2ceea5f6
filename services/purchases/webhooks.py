"""E-shop webhooks: verify Shopify and WooCommerce signatures and map their order payloads
onto the inbound purchase contract. Pure functions: no I/O, no web framework.

Mapping rules (what the service records from each platform):
- purchase_id is the platform's order id as a string; a Shopify refund is
  "<order id>-refund-<refund id>" (an order can have several partial refunds), a refunded
  WooCommerce order "<order id>-refund" (one full refund per order).
- customer_id is the e-shop's own customer id as a string ("207119551", "26"); a guest
  checkout (Shopify customer null, WooCommerce customer_id 0) is an anonymous purchase.
  The loyalty customer id is the e-shop's id: a shop that wants one identity across POS
  and web must use the same id in both.
- Money is Decimal, quantities int. Shipping, tax lines, fees and tips are not purchase
  lines: points are earned on merchandise. Lines with quantity 0 are skipped. Amounts are
  as each platform states them: WooCommerce line subtotal/total exclude tax; a Shopify
  price includes tax when the shop has taxes_included set.
- WooCommerce: unit_price is subtotal / quantity (rounded up to the cent), not the line's
  `price`, which WooCommerce computes as total / quantity, i.e. after the discount.
- category: Shopify's line product_type when present (the REST Order resource does not
  carry it by default), "gift_card" for a gift card line (so earning rules can exclude
  them), else "uncategorized". WooCommerce line items carry no category: "uncategorized".
- sku: the platform's SKU, or a stable stand-in ("shopify-variant-<id>",
  "woo-product-<id>[-<variation id>]") when the shop left it empty.

Limitation: WooCommerce's order webhook carries refunds only as totals (refunds[].total),
not per line, so a partial WooCommerce refund cannot be mapped to returned lines. Only the
status "refunded" (everything refunded) is recorded, as a return of every line.
"""

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any, Literal

Platform = Literal["shopify", "woocommerce"]

# WooCommerce statuses after which the order is paid and counts as a sale. "on-hold",
# "pending", "failed", "cancelled", "checkout-draft" and "trash" are not purchases (yet).
WOOCOMMERCE_SALE_STATUSES = frozenset({"processing", "completed"})
WOOCOMMERCE_REFUNDED_STATUS = "refunded"
UNCATEGORIZED = "uncategorized"
GIFT_CARD_CATEGORY = "gift_card"


class WebhookPayloadError(ValueError):
    """A webhook body that lacks what a purchase needs (or contradicts itself)."""


# --- signatures ------------------------------------------------------------------------


def verify_shopify_hmac(secret: str, body: bytes, header_value: str | None) -> bool:
    """X-Shopify-Hmac-Sha256: base64(HMAC-SHA256(secret, raw body))."""
    return _verify_base64_hmac_sha256(secret, body, header_value)


def verify_woocommerce_signature(secret: str, body: bytes, header_value: str | None) -> bool:
    """X-WC-Webhook-Signature: base64(HMAC-SHA256(secret, raw body)), the same scheme."""
    return _verify_base64_hmac_sha256(secret, body, header_value)


def _verify_base64_hmac_sha256(secret: str, body: bytes, header_value: str | None) -> bool:
    # An empty secret would let anyone sign: treat it as "cannot verify", never as a match.
    if not secret or not header_value:
        return False
    expected = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest())
    # Compare bytes in constant time; a header with non-ASCII junk simply does not match.
    return hmac.compare_digest(expected, header_value.strip().encode("utf-8", "replace"))


# --- Shopify ---------------------------------------------------------------------------


def map_shopify_order_paid(order: Mapping[str, Any], *, store_id: str) -> dict[str, Any]:
    """An `orders/paid` webhook (REST Order resource) as a sale."""
    _require_mapping(order, "order")
    order_id = _id(_get(order, "id", "order"), "order.id")
    customer = order.get("customer")
    customer_id = None
    if customer is not None:
        _require_mapping(customer, "order.customer")
        customer_id = _id(_get(customer, "id", "order.customer"), "order.customer.id")
    # processed_at is when the sale happened; it does not move when the order is edited.
    stamp = order.get("processed_at") or _get(order, "created_at", "order")
    lines = []
    for i, item in enumerate(_list(order, "line_items", "order")):
        where = f"order.line_items[{i}]"
        _require_mapping(item, where)
        quantity = _quantity(_get(item, "quantity", where), f"{where}.quantity")
        if quantity == 0:
            continue
        unit_price = _money(_get(item, "price", where), f"{where}.price")
        lines.append(
            _line(
                line_id=_id(_get(item, "id", where), f"{where}.id"),
                sku=_shopify_sku(item),
                category=_shopify_category(item),
                quantity=quantity,
                unit_price=unit_price,
                discount=_shopify_line_discount(item, where),
                where=where,
            )
        )
    return _purchase(
        purchase_id=order_id,
        type_="sale",
        original_purchase_id=None,
        store_id=store_id,
        customer_id=customer_id,
        occurred_at=_timestamp(stamp, "order.processed_at"),
        currency=_currency(_get(order, "currency", "order"), "order.currency"),
        lines=lines,
        where="order.line_items",
    )


def map_shopify_refund(refund: Mapping[str, Any], *, store_id: str) -> dict[str, Any] | None:
    """A `refunds/create` webhook as a (possibly partial) return of the order's lines.

    Returns None when the refund gives back no goods (a shipping-only or goodwill refund
    has no refund_line_items): there is nothing to return and no points to take back.
    customer_id is None: the refund does not name the customer; the service takes it from
    the recorded sale.
    """
    _require_mapping(refund, "refund")
    refund_id = _id(_get(refund, "id", "refund"), "refund.id")
    order_id = _id(_get(refund, "order_id", "refund"), "refund.order_id")
    lines = []
    currencies: set[str] = set()
    for i, item in enumerate(refund.get("refund_line_items") or []):
        where = f"refund.refund_line_items[{i}]"
        _require_mapping(item, where)
        quantity = _quantity(_get(item, "quantity", where), f"{where}.quantity")
        if quantity == 0:
            continue
        line_item = _get(item, "line_item", where)
        _require_mapping(line_item, f"{where}.line_item")
        unit_price = _money(_get(line_item, "price", f"{where}.line_item"), f"{where}.line_item.price")
        gross = quantity * unit_price
        if item.get("subtotal") is not None:
            # Shopify's own figure for what this line refunds (after its discounts, before
            # tax): the discount given back is the rest.
            discount = gross - _money(item["subtotal"], f"{where}.subtotal")
        else:
            # Older payloads without subtotal: the line's discount, pro rata.
            bought = _quantity(_get(line_item, "quantity", f"{where}.line_item"), f"{where}.line_item.quantity")
            line_discount = _shopify_line_discount(line_item, f"{where}.line_item")
            discount = (line_discount * quantity / max(bought, 1)).quantize(_cents_or_finer(unit_price))
        currencies.update(_shopify_refund_line_currencies(item))
        line_id = item.get("line_item_id", line_item.get("id"))
        lines.append(
            _line(
                line_id=_id(line_id, f"{where}.line_item_id"),
                sku=_shopify_sku(line_item),
                category=_shopify_category(line_item),
                quantity=quantity,
                unit_price=unit_price,
                discount=discount,
                where=where,
            )
        )
    if not lines:
        return None
    # The refund payload has no top-level currency: take the shop currency of its amounts,
    # else of its transactions.
    if not currencies:
        currencies = {t["currency"] for t in refund.get("transactions") or [] if isinstance(t, Mapping) and t.get("currency")}
    if len(currencies) != 1:
        raise WebhookPayloadError(
            "refund: cannot tell its currency (expected one shop currency in refund_line_items[].subtotal_set "
            f"or transactions[].currency, found {sorted(currencies) or 'none'})"
        )
    return _purchase(
        purchase_id=f"{order_id}-refund-{refund_id}",
        type_="return",
        original_purchase_id=order_id,
        store_id=store_id,
        customer_id=None,
        occurred_at=_timestamp(refund.get("processed_at") or _get(refund, "created_at", "refund"), "refund.created_at"),
        currency=_currency(currencies.pop(), "refund currency"),
        lines=lines,
        where="refund.refund_line_items",
    )


def _shopify_sku(item: Mapping[str, Any]) -> str:
    sku = item.get("sku")
    if isinstance(sku, str) and sku.strip():
        return sku.strip()
    # Shops often leave SKUs empty; the variant (else product, else line) id is stable.
    for key, label in (("variant_id", "variant"), ("product_id", "product"), ("id", "line")):
        if item.get(key) is not None:
            return f"shopify-{label}-{item[key]}"
    raise WebhookPayloadError("line item has neither sku, variant_id, product_id nor id")


def _shopify_category(item: Mapping[str, Any]) -> str:
    if item.get("gift_card") is True:
        return GIFT_CARD_CATEGORY
    product_type = item.get("product_type")
    if isinstance(product_type, str) and product_type.strip():
        return product_type.strip()
    return UNCATEGORIZED


def _shopify_line_discount(item: Mapping[str, Any], where: str) -> Decimal:
    """discount_allocations (every discount application allocated to this line, order-level
    ones included) when present; else the legacy total_discount field. Never both: Shopify
    reports the same discount in each."""
    allocations = item.get("discount_allocations") or []
    if allocations:
        if not isinstance(allocations, Sequence) or isinstance(allocations, str):
            raise WebhookPayloadError(f"{where}.discount_allocations: expected a list")
        total = Decimal("0")
        for j, allocation in enumerate(allocations):
            _require_mapping(allocation, f"{where}.discount_allocations[{j}]")
            total += _money(
                _get(allocation, "amount", f"{where}.discount_allocations[{j}]"),
                f"{where}.discount_allocations[{j}].amount",
            )
        return total
    if item.get("total_discount") is not None:
        return _money(item["total_discount"], f"{where}.total_discount")
    return Decimal("0")


def _shopify_refund_line_currencies(item: Mapping[str, Any]) -> set[str]:
    found = set()
    for holder in (item.get("subtotal_set"), (item.get("line_item") or {}).get("price_set")):
        if isinstance(holder, Mapping):
            shop_money = holder.get("shop_money")
            if isinstance(shop_money, Mapping) and shop_money.get("currency_code"):
                found.add(shop_money["currency_code"])
    return found


# --- WooCommerce -----------------------------------------------------------------------


def map_woocommerce_order(order: Mapping[str, Any], *, store_id: str) -> dict[str, Any] | None:
    """A WooCommerce order webhook (order.created / order.updated; REST v3 order) as a sale,
    a full return, or None for a status that records nothing (pending, on-hold, ...)."""
    _require_mapping(order, "order")
    status = _get(order, "status", "order")
    if not isinstance(status, str):
        raise WebhookPayloadError("order.status: expected a string")
    if status not in WOOCOMMERCE_SALE_STATUSES and status != WOOCOMMERCE_REFUNDED_STATUS:
        return None
    order_id = _id(_get(order, "id", "order"), "order.id")
    raw_customer = _get(order, "customer_id", "order")
    customer_id = None if raw_customer in (0, "0") else _id(raw_customer, "order.customer_id")
    lines = []
    for i, item in enumerate(_list(order, "line_items", "order")):
        where = f"order.line_items[{i}]"
        _require_mapping(item, where)
        quantity = _quantity(_get(item, "quantity", where), f"{where}.quantity")
        if quantity == 0:
            continue
        subtotal = _money(_get(item, "subtotal", where), f"{where}.subtotal")
        total = _money(_get(item, "total", where), f"{where}.total")
        if total > subtotal:
            raise WebhookPayloadError(f"{where}: total {total} exceeds subtotal {subtotal}")
        # Woo's `price` is total / quantity, i.e. already after the discount (and a float):
        # using it as unit price would count the discount twice. The list price per unit is
        # subtotal / quantity, rounded up to the amounts' precision so that the discount
        # (whatever makes the line come to Woo's exact total) is never negative.
        precision = min(_cents_or_finer(subtotal), _cents_or_finer(total))
        unit_price = (subtotal / quantity).quantize(precision, rounding=ROUND_CEILING)
        lines.append(
            _line(
                line_id=_id(_get(item, "id", where), f"{where}.id"),
                sku=_woocommerce_sku(item, where),
                category=UNCATEGORIZED,
                quantity=quantity,
                unit_price=unit_price,
                discount=quantity * unit_price - total,
                where=where,
            )
        )
    currency = _currency(_get(order, "currency", "order"), "order.currency")
    if status == WOOCOMMERCE_REFUNDED_STATUS:
        # The order itself carries no refund time: its last modification is the refund.
        stamp = order.get("date_modified_gmt") or _get(order, "date_created_gmt", "order")
        return _purchase(
            purchase_id=f"{order_id}-refund",
            type_="return",
            original_purchase_id=order_id,
            store_id=store_id,
            customer_id=customer_id,
            occurred_at=_timestamp(stamp, "order.date_modified_gmt", naive_is_utc=True),
            currency=currency,
            lines=lines,
            where="order.line_items",
        )
    # date_created_gmt, not date_paid_gmt: the same order arrives again when it moves from
    # processing to completed, and a cash-on-delivery order is only marked paid then. A
    # stable timestamp keeps both webhooks the same purchase (a changed one is a conflict).
    return _purchase(
        purchase_id=order_id,
        type_="sale",
        original_purchase_id=None,
        store_id=store_id,
        customer_id=customer_id,
        occurred_at=_timestamp(_get(order, "date_created_gmt", "order"), "order.date_created_gmt", naive_is_utc=True),
        currency=currency,
        lines=lines,
        where="order.line_items",
    )


def _woocommerce_sku(item: Mapping[str, Any], where: str) -> str:
    sku = item.get("sku")
    if isinstance(sku, str) and sku.strip():
        return sku.strip()
    product_id = item.get("product_id")
    if not product_id:
        raise WebhookPayloadError(f"{where}: neither sku nor product_id")
    variation_id = item.get("variation_id")
    return f"woo-product-{product_id}-{variation_id}" if variation_id else f"woo-product-{product_id}"


# --- replay protection -----------------------------------------------------------------


def webhook_timestamp(payload: Mapping[str, Any], platform: Platform) -> datetime:
    """The signed body's own time, for refusing stale (replayed) webhooks: a Shopify
    refund's created_at, a Shopify order's updated_at (else processed_at), a WooCommerce
    order's date_modified_gmt."""
    _require_mapping(payload, "webhook body")
    if platform == "shopify":
        if "refund_line_items" in payload or "order_id" in payload:
            return _timestamp(_get(payload, "created_at", "refund"), "refund.created_at")
        stamp = payload.get("updated_at") or payload.get("processed_at")
        if not stamp:
            raise WebhookPayloadError("order: missing updated_at and processed_at")
        return _timestamp(stamp, "order.updated_at")
    if platform == "woocommerce":
        return _timestamp(_get(payload, "date_modified_gmt", "order"), "order.date_modified_gmt", naive_is_utc=True)
    raise ValueError(f"unknown platform {platform!r}")


# --- building the contract -------------------------------------------------------------


def _line(
    *, line_id: str, sku: str, category: str, quantity: int, unit_price: Decimal, discount: Decimal, where: str
) -> dict[str, Any]:
    if discount < 0:
        raise WebhookPayloadError(f"{where}: negative discount {discount}")
    if discount > quantity * unit_price:
        raise WebhookPayloadError(f"{where}: discount {discount} exceeds quantity x price {quantity * unit_price}")
    return {
        "line_id": line_id,
        "sku": sku,
        "category": category,
        "quantity": quantity,
        "unit_price": unit_price,
        "discount": discount,
    }


def _purchase(
    *,
    purchase_id: str,
    type_: Literal["sale", "return"],
    original_purchase_id: str | None,
    store_id: str,
    customer_id: str | None,
    occurred_at: datetime,
    currency: str,
    lines: list[dict[str, Any]],
    where: str,
) -> dict[str, Any]:
    if not lines:
        raise WebhookPayloadError(f"{where}: no line with a quantity")
    total = sum((line["quantity"] * line["unit_price"] - line["discount"] for line in lines), Decimal("0"))
    return {
        "purchase_id": purchase_id,
        "type": type_,
        "original_purchase_id": original_purchase_id,
        "source": "eshop",
        "store_id": store_id,
        "customer_id": customer_id,
        "occurred_at": occurred_at.isoformat(),
        "currency": currency,
        "lines": [
            {**line, "unit_price": _decimal_str(line["unit_price"]), "discount": _decimal_str(line["discount"])}
            for line in lines
        ],
        "total": _decimal_str(total),
    }


def _cents_or_finer(amount: Decimal) -> Decimal:
    """The unit to round to: the amount's own precision, at least hundredths."""
    return Decimal(1).scaleb(min(amount.as_tuple().exponent, -2))


def _decimal_str(value: Decimal) -> str:
    return format(value, "f")


# --- reading the platforms' JSON -------------------------------------------------------


def _require_mapping(value: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        raise WebhookPayloadError(f"{where}: expected an object, got {type(value).__name__}")


def _get(obj: Mapping[str, Any], key: str, where: str) -> Any:
    value = obj.get(key)
    if value is None or value == "":
        raise WebhookPayloadError(f"{where}.{key}: missing")
    return value


def _list(obj: Mapping[str, Any], key: str, where: str) -> Sequence[Any]:
    value = _get(obj, key, where)
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise WebhookPayloadError(f"{where}.{key}: expected a list")
    return value


def _id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or str(value).strip() == "":
        raise WebhookPayloadError(f"{where}: expected an id (integer or non-empty string), got {value!r}")
    return str(value).strip()


def _quantity(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WebhookPayloadError(f"{where}: expected a whole number >= 0, got {value!r}")
    return value


def _money(value: Any, where: str) -> Decimal:
    # Both platforms send amounts as decimal strings; a JSON number is read via its text
    # form so that 0.1 stays 0.1 (never through binary floating point arithmetic).
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise WebhookPayloadError(f"{where}: expected a decimal amount, got {value!r}")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise WebhookPayloadError(f"{where}: not a decimal amount: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise WebhookPayloadError(f"{where}: expected a finite amount >= 0, got {value!r}")
    return amount


def _currency(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value.strip()) != 3 or not value.strip().isalpha():
        raise WebhookPayloadError(f"{where}: expected an ISO 4217 code, got {value!r}")
    return value.strip().upper()


def _timestamp(value: Any, where: str, *, naive_is_utc: bool = False) -> datetime:
    """RFC 3339 with an offset (Shopify); WooCommerce's *_gmt fields have none and are UTC."""
    if not isinstance(value, str):
        raise WebhookPayloadError(f"{where}: expected a timestamp string, got {value!r}")
    try:
        stamp = datetime.fromisoformat(value.strip())
    except ValueError:
        raise WebhookPayloadError(f"{where}: not an ISO 8601 timestamp: {value!r}") from None
    if stamp.tzinfo is None:
        if not naive_is_utc:
            raise WebhookPayloadError(f"{where}: timestamp without a UTC offset: {value!r}")
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp
