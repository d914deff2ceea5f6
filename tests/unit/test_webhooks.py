"""E-shop webhooks: signature checks and the mapping of Shopify / WooCommerce payloads onto
the purchase contract (pure functions, no I/O)."""

import copy
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.purchases.webhooks import (
    WebhookPayloadError,
    map_shopify_order_paid,
    map_shopify_refund,
    map_woocommerce_order,
    verify_shopify_hmac,
    verify_woocommerce_signature,
    webhook_timestamp,
)
from services.purchases.domain import PurchaseIn, check_purchase
from shared.events.purchases import PurchasePayload
from tests.support.webhooks import sign_shopify, sign_woocommerce

FIXTURES = Path(__file__).parent.parent / "fixtures" / "webhooks"
SECRET = "shpss_test_secret"
# Computed independently: printf '%s' BODY | openssl dgst -sha256 -hmac SECRET -binary | base64
KNOWN_BODY = b'{"id":1,"status":"paid"}'
KNOWN_SIGNATURE = "7bCE9HyNsQyUzo9VpjdVr1JhW5XGSadglDQfxPZAwPY="


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def assert_valid_contract(purchase: dict) -> PurchaseIn:
    """The mapped dict is the inbound contract: JSON-serialisable, money as strings, the
    total equal to the lines, and accepted by the recorded-purchase model."""
    assert json.loads(json.dumps(purchase)) == purchase
    for line in purchase["lines"]:
        assert isinstance(line["unit_price"], str) and isinstance(line["discount"], str)
        assert isinstance(line["quantity"], int) and line["quantity"] > 0
        assert Decimal(line["discount"]) >= 0
    assert isinstance(purchase["total"], str)
    assert datetime.fromisoformat(purchase["occurred_at"]).utcoffset() is not None
    inbound = PurchaseIn.model_validate(purchase)  # the service's inbound contract (extra fields forbidden)
    assert inbound.total == sum(line.net_amount for line in inbound.lines)
    # ...and passes its business checks (known currency, total equal to the lines) when it
    # arrives a few minutes after the purchase
    assert check_purchase(inbound, now=inbound.occurred_at + timedelta(minutes=5), max_clock_skew_s=300,
                          max_age_days=400) is None
    recorded = PurchasePayload.model_validate({**purchase, "door": "webhook"})
    assert recorded.total == inbound.total
    return inbound


# --- signatures --------------------------------------------------------------------------


@pytest.mark.parametrize("verify", [verify_shopify_hmac, verify_woocommerce_signature])
def test_a_signature_computed_by_openssl_is_accepted(verify):
    assert verify(SECRET, KNOWN_BODY, KNOWN_SIGNATURE)
    assert verify(SECRET, KNOWN_BODY, f" {KNOWN_SIGNATURE}\n")  # header whitespace is not content


@pytest.mark.parametrize("verify", [verify_shopify_hmac, verify_woocommerce_signature])
def test_a_changed_body_or_another_secret_is_refused(verify):
    assert not verify(SECRET, KNOWN_BODY + b" ", KNOWN_SIGNATURE)
    assert not verify("another-secret", KNOWN_BODY, KNOWN_SIGNATURE)
    assert not verify(SECRET, KNOWN_BODY, KNOWN_SIGNATURE[:-2])
    assert not verify(SECRET, KNOWN_BODY, "not base64 at all \u00e9")


@pytest.mark.parametrize("verify", [verify_shopify_hmac, verify_woocommerce_signature])
def test_a_missing_header_or_an_empty_secret_never_verifies(verify):
    assert not verify(SECRET, KNOWN_BODY, None)
    assert not verify(SECRET, KNOWN_BODY, "")
    empty_secret_signature = sign_shopify("", KNOWN_BODY)
    assert not verify("", KNOWN_BODY, empty_secret_signature)


def test_the_test_helpers_sign_like_the_platforms():
    body = (FIXTURES / "shopify_orders_paid.json").read_bytes()
    assert sign_shopify(SECRET, KNOWN_BODY) == KNOWN_SIGNATURE
    assert verify_shopify_hmac(SECRET, body, sign_shopify(SECRET, body))
    assert verify_woocommerce_signature(SECRET, body, sign_woocommerce(SECRET, body.decode()))


# --- Shopify -----------------------------------------------------------------------------


def test_shopify_paid_order_becomes_a_sale_with_discounts_per_line():
    purchase = map_shopify_order_paid(load("shopify_orders_paid.json"), store_id="web-us")

    assert purchase == {
        "purchase_id": "5524789133367",
        "type": "sale",
        "original_purchase_id": None,
        "source": "eshop",
        "store_id": "web-us",
        "customer_id": "7039216378167",
        "occurred_at": "2024-03-04T10:12:03-05:00",
        "currency": "USD",
        "lines": [
            # discount from discount_allocations (the code SPRING10)
            {"line_id": "13862471991351", "sku": "TR2-GRN-42", "category": "uncategorized", "quantity": 2,
             "unit_price": "199.00", "discount": "10.00"},
            # no allocations: the legacy total_discount field
            {"line_id": "13862472024119", "sku": "TR2-RED-40", "category": "uncategorized", "quantity": 1,
             "unit_price": "199.00", "discount": "5.00"},
            # a gift card without SKU: stable stand-in SKU, its own category
            {"line_id": "13862472056887", "sku": "shopify-variant-45126630539319", "category": "gift_card",
             "quantity": 1, "unit_price": "25.00", "discount": "0.00"},
        ],
        # shipping (10.00) is not a purchase line: 398 - 10 + 199 - 5 + 25
        "total": "607.00",
    }
    assert_valid_contract(purchase)


def test_shopify_product_type_is_the_category_and_a_guest_order_has_no_customer():
    order = load("shopify_orders_paid.json")
    order["customer"] = None
    order["line_items"][0]["product_type"] = "Running Shoes"

    purchase = map_shopify_order_paid(order, store_id="web-us")

    assert purchase["customer_id"] is None
    assert purchase["lines"][0]["category"] == "Running Shoes"
    assert_valid_contract(purchase)


def test_shopify_discount_allocations_are_summed_not_added_to_total_discount():
    order = load("shopify_orders_paid.json")
    line = order["line_items"][0]
    line["total_discount"] = "10.00"  # Shopify reports the same discount in both places
    line["discount_allocations"].append({"amount": "2.50", "discount_application_index": 1})

    purchase = map_shopify_order_paid(order, store_id="web-us")

    assert purchase["lines"][0]["discount"] == "12.50"
    assert purchase["total"] == "604.50"


def test_shopify_partial_refund_becomes_a_return_of_the_refunded_quantity():
    purchase = map_shopify_refund(load("shopify_refunds_create.json"), store_id="web-us")

    assert purchase == {
        "purchase_id": "5524789133367-refund-916934901815",
        "type": "return",
        "original_purchase_id": "5524789133367",
        "source": "eshop",
        "store_id": "web-us",
        "customer_id": None,
        "occurred_at": "2024-03-11T15:40:22-04:00",
        "currency": "USD",
        # one of the two pairs, with its half of the 10.00 discount (subtotal 194.0)
        "lines": [{"line_id": "13862471991351", "sku": "TR2-GRN-42", "category": "uncategorized", "quantity": 1,
                   "unit_price": "199.00", "discount": "5.00"}],
        "total": "194.00",
    }
    assert_valid_contract(purchase)


def test_shopify_refund_without_subtotal_takes_the_line_discount_pro_rata():
    refund = load("shopify_refunds_create.json")
    del refund["refund_line_items"][0]["subtotal"]
    refund["refund_line_items"][0]["line_item"]["discount_allocations"][0]["amount"] = "10.01"

    purchase = map_shopify_refund(refund, store_id="web-us")

    assert purchase["lines"][0]["discount"] == "5.00"  # 10.01 / 2, to the cent
    assert purchase["total"] == "194.00"


def test_shopify_refund_without_goods_records_nothing():
    refund = load("shopify_refunds_create.json")
    refund["refund_line_items"] = []  # a shipping-only refund

    assert map_shopify_refund(refund, store_id="web-us") is None


def test_shopify_refund_currency_falls_back_to_the_transactions():
    refund = load("shopify_refunds_create.json")
    item = refund["refund_line_items"][0]
    del item["subtotal_set"], item["line_item"]["price_set"]
    refund["transactions"][0]["currency"] = "CAD"

    assert map_shopify_refund(refund, store_id="web-ca")["currency"] == "CAD"

    refund["transactions"] = []
    with pytest.raises(WebhookPayloadError, match="currency"):
        map_shopify_refund(refund, store_id="web-ca")


# --- WooCommerce -------------------------------------------------------------------------


def test_woocommerce_processing_order_becomes_a_sale():
    purchase = map_woocommerce_order(load("woocommerce_order_processing.json"), store_id="woo-de")

    assert purchase == {
        "purchase_id": "727",
        "type": "sale",
        "original_purchase_id": None,
        "source": "eshop",
        "store_id": "woo-de",
        "customer_id": "26",
        "occurred_at": "2024-03-04T09:12:40+00:00",
        "currency": "EUR",
        "lines": [
            {"line_id": "315", "sku": "woo-product-93", "category": "uncategorized", "quantity": 2,
             "unit_price": "4.50", "discount": "0.00"},
            # unit price from subtotal (Woo's `price` 10.8 is already discounted); coupon 1.20
            {"line_id": "316", "sku": "MUG-BLK-350", "category": "uncategorized", "quantity": 1,
             "unit_price": "12.00", "discount": "1.20"},
        ],
        "total": "19.80",
    }
    assert_valid_contract(purchase)


def test_woocommerce_completed_resend_is_the_same_purchase():
    order = load("woocommerce_order_processing.json")
    processing = map_woocommerce_order(order, store_id="woo-de")
    order.update(status="completed", date_completed_gmt="2024-03-05T07:02:11", date_modified_gmt="2024-03-05T07:02:11")

    assert map_woocommerce_order(order, store_id="woo-de") == processing


def test_woocommerce_guest_order_and_uneven_unit_price():
    order = load("woocommerce_order_processing.json")
    order["customer_id"] = 0
    order["line_items"][0].update(quantity=3, subtotal="10.00", total="9.00", price=3.0)

    purchase = map_woocommerce_order(order, store_id="woo-de")

    assert purchase["customer_id"] is None
    # 10.00 / 3 rounded up to 3.34: the discount absorbs the cent, the line nets Woo's total
    assert purchase["lines"][0] == {"line_id": "315", "sku": "woo-product-93", "category": "uncategorized",
                                  "quantity": 3, "unit_price": "3.34", "discount": "1.02"}
    assert purchase["total"] == "19.80"
    assert_valid_contract(purchase)


def test_woocommerce_variation_without_sku_gets_a_stable_sku():
    order = load("woocommerce_order_processing.json")
    order["line_items"][1]["sku"] = ""

    assert map_woocommerce_order(order, store_id="woo-de")["lines"][1]["sku"] == "woo-product-22-23"


def test_woocommerce_refunded_order_becomes_a_full_return():
    purchase = map_woocommerce_order(load("woocommerce_order_refunded.json"), store_id="woo-de")
    sale = map_woocommerce_order(load("woocommerce_order_processing.json"), store_id="woo-de")

    assert purchase["purchase_id"] == "727-refund"
    assert purchase["type"] == "return"
    assert purchase["original_purchase_id"] == "727"
    assert purchase["customer_id"] == "26"
    assert purchase["occurred_at"] == "2024-03-09T16:45:02+00:00"  # when it was refunded
    assert purchase["lines"] == sale["lines"]  # every line, every unit
    assert purchase["total"] == sale["total"] == "19.80"
    assert_valid_contract(purchase)


@pytest.mark.parametrize("status", ["pending", "on-hold", "cancelled", "failed", "trash", "checkout-draft"])
def test_woocommerce_unpaid_statuses_record_nothing(status):
    order = load("woocommerce_order_processing.json")
    order["status"] = status

    assert map_woocommerce_order(order, store_id="woo-de") is None


# --- replay protection -------------------------------------------------------------------


def test_webhook_timestamp_is_the_signed_bodys_own_time():
    assert webhook_timestamp(load("shopify_orders_paid.json"), "shopify") == datetime(
        2024, 3, 4, 15, 12, 7, tzinfo=timezone.utc
    )
    assert webhook_timestamp(load("shopify_refunds_create.json"), "shopify") == datetime(
        2024, 3, 11, 19, 40, 22, tzinfo=timezone.utc
    )
    assert webhook_timestamp(load("woocommerce_order_refunded.json"), "woocommerce") == datetime(
        2024, 3, 9, 16, 45, 2, tzinfo=timezone.utc
    )
    order = load("shopify_orders_paid.json")
    del order["updated_at"]
    assert webhook_timestamp(order, "shopify") == datetime(2024, 3, 4, 15, 12, 3, tzinfo=timezone.utc)


def test_webhook_timestamp_needs_a_timestamp():
    with pytest.raises(WebhookPayloadError, match="date_modified_gmt"):
        webhook_timestamp({"id": 727}, "woocommerce")
    with pytest.raises(WebhookPayloadError, match="updated_at"):
        webhook_timestamp({"id": 1, "line_items": []}, "shopify")


# --- bad payloads ------------------------------------------------------------------------


def _shopify(mutate):
    order = load("shopify_orders_paid.json")
    mutate(order)
    return order


def _woo(mutate):
    order = load("woocommerce_order_processing.json")
    mutate(order)
    return order


BAD_SHOPIFY_ORDERS = {
    "no id": (lambda o: o.pop("id"), "order.id"),
    "no currency": (lambda o: o.pop("currency"), "order.currency"),
    "currency not a code": (lambda o: o.update(currency="dollars"), "ISO 4217"),
    "no line items": (lambda o: o.update(line_items=[]), "no line"),
    "line items not a list": (lambda o: o.update(line_items={"id": 1}), "expected a list"),
    "price missing": (lambda o: o["line_items"][0].pop("price"), r"line_items\[0\].price"),
    "price not a number": (lambda o: o["line_items"][0].update(price="12,50"), "not a decimal"),
    "negative price": (lambda o: o["line_items"][0].update(price="-1.00"), ">= 0"),
    "quantity not an int": (lambda o: o["line_items"][1].update(quantity="2"), r"line_items\[1\].quantity"),
    "discount above the price": (lambda o: o["line_items"][1].update(total_discount="500.00"), "exceeds"),
    "timestamp without offset": (lambda o: o.update(processed_at="2024-03-04T10:12:03"), "offset"),
    "timestamp garbage": (lambda o: o.update(processed_at="yesterday"), "timestamp"),
    "customer without id": (lambda o: o.update(customer={"email": "x@example.com"}), "customer.id"),
}


@pytest.mark.parametrize("mutate, message", BAD_SHOPIFY_ORDERS.values(), ids=BAD_SHOPIFY_ORDERS.keys())
def test_bad_shopify_orders_raise_a_named_error(mutate, message):
    with pytest.raises(WebhookPayloadError, match=message):
        map_shopify_order_paid(_shopify(mutate), store_id="web-us")


BAD_WOO_ORDERS = {
    "no status": (lambda o: o.pop("status"), "order.status"),
    "status not a string": (lambda o: o.update(status=["processing"]), "order.status: expected a string"),
    "status an object": (lambda o: o.update(status={"a": 1}), "order.status: expected a string"),
    "no line items": (lambda o: o.update(line_items=[]), "no line"),
    "subtotal missing": (lambda o: o["line_items"][0].pop("subtotal"), r"line_items\[0\].subtotal"),
    "total above subtotal": (lambda o: o["line_items"][1].update(total="13.00"), "exceeds subtotal"),
    "no sku nor product": (lambda o: o["line_items"][0].update(product_id=0), "neither sku nor product_id"),
    "no creation time": (lambda o: o.pop("date_created_gmt"), "date_created_gmt"),
    "customer id a float": (lambda o: o.update(customer_id=26.0), "customer_id"),
}


@pytest.mark.parametrize("mutate, message", BAD_WOO_ORDERS.values(), ids=BAD_WOO_ORDERS.keys())
def test_bad_woocommerce_orders_raise_a_named_error(mutate, message):
    with pytest.raises(WebhookPayloadError, match=message):
        map_woocommerce_order(_woo(mutate), store_id="woo-de")


def test_bad_shopify_refunds_raise_a_named_error():
    refund = load("shopify_refunds_create.json")
    no_order = copy.deepcopy(refund)
    del no_order["order_id"]
    with pytest.raises(WebhookPayloadError, match="refund.order_id"):
        map_shopify_refund(no_order, store_id="web-us")

    no_line_item = copy.deepcopy(refund)
    del no_line_item["refund_line_items"][0]["line_item"]
    with pytest.raises(WebhookPayloadError, match=r"refund_line_items\[0\].line_item"):
        map_shopify_refund(no_line_item, store_id="web-us")

    over_refunded = copy.deepcopy(refund)
    over_refunded["refund_line_items"][0]["subtotal"] = "250.00"
    with pytest.raises(WebhookPayloadError, match="negative discount"):
        map_shopify_refund(over_refunded, store_id="web-us")


@pytest.mark.parametrize("body", [[], "order", None, 42])
def test_a_body_that_is_not_an_object_is_a_payload_error(body):
    for mapper in (map_shopify_order_paid, map_shopify_refund, map_woocommerce_order):
        with pytest.raises(WebhookPayloadError, match="expected an object"):
            mapper(body, store_id="s")
    assert issubclass(WebhookPayloadError, ValueError)


@given(
    quantity=st.integers(min_value=1, max_value=1000),
    subtotal_cents=st.integers(min_value=0, max_value=10_000_000),
    discount_share=st.fractions(min_value=0, max_value=1),
)
def test_woocommerce_lines_always_net_to_woos_own_total(quantity, subtotal_cents, discount_share):
    subtotal = Decimal(subtotal_cents) / 100
    total = (subtotal * Decimal(discount_share.numerator) / Decimal(discount_share.denominator)).quantize(Decimal("0.01"))
    order = load("woocommerce_order_processing.json")
    order["line_items"] = [order["line_items"][0] | {"quantity": quantity, "subtotal": str(subtotal), "total": str(total)}]

    purchase = map_woocommerce_order(order, store_id="woo-de")

    [line] = purchase["lines"]
    assert Decimal(line["discount"]) >= 0
    assert quantity * Decimal(line["unit_price"]) - Decimal(line["discount"]) == total
    assert Decimal(purchase["total"]) == total
    # rounding the unit price up moves at most one cent per unit into the discount
    assert Decimal(line["discount"]) - (subtotal - total) < Decimal("0.01") * quantity
    PurchaseIn.model_validate(purchase)
