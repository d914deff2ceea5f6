"""Shopify and WooCommerce webhooks through the running purchases service, against the real
broker and PostgreSQL: signed ones are recorded (once), forged, unsigned and stale ones are
refused with nothing recorded."""

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from shared.topics import PURCHASES_DLQ, PURCHASES_RECORDED
from tests.support.hostile import metric_total
from tests.support.kafka import consume
from tests.support.purchases import SHOPIFY_SECRET, WOO_SECRET, purchases_settings, running_purchases
from tests.support.webhooks import sign_shopify, sign_woocommerce

pytestmark = pytest.mark.asyncio(loop_scope="session")
FIXTURES = Path(__file__).parents[1] / "fixtures" / "webhooks"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def fresh_shopify_order(order_id: int) -> dict:
    order = fixture("shopify_orders_paid.json")
    now = datetime.now(timezone.utc)
    order.update(id=order_id, processed_at=(now - timedelta(minutes=5)).isoformat(), created_at=now.isoformat(),
                 updated_at=now.isoformat())
    return order


def shopify_refund_of(order: dict, refund_id: int) -> dict:
    refund = fixture("shopify_refunds_create.json")
    refund.update(id=refund_id, order_id=order["id"], created_at=datetime.now(timezone.utc).isoformat(),
                  processed_at=datetime.now(timezone.utc).isoformat())
    line_ids = [item["id"] for item in order["line_items"]]
    for item in refund["refund_line_items"]:
        assert item["line_item_id"] in line_ids  # the fixtures belong together
    return refund


def fresh_woo_order(order_id: int, status: str = "processing") -> dict:
    order = fixture("woocommerce_order_processing.json")
    now = datetime.now(timezone.utc).replace(microsecond=0, tzinfo=None)
    order.update(id=order_id, status=status, date_created_gmt=(now - timedelta(minutes=5)).isoformat(),
                 date_modified_gmt=now.isoformat(), date_paid_gmt=now.isoformat())
    return order


async def post_shopify(client, topic: str, payload: dict, *, secret: str = SHOPIFY_SECRET, signature: str | None = "sign"):
    body = json.dumps(payload).encode()
    headers = {"X-Shopify-Topic": topic, "Content-Type": "application/json"}
    if signature == "sign":
        headers["X-Shopify-Hmac-Sha256"] = sign_shopify(secret, body)
    elif signature is not None:
        headers["X-Shopify-Hmac-Sha256"] = signature
    return await client.post("/v1/webhooks/shopify", content=body, headers=headers)


async def post_woo(client, payload: dict | bytes, *, secret: str = WOO_SECRET):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return await client.post("/v1/webhooks/woocommerce", content=body, headers={
        "X-WC-Webhook-Signature": sign_woocommerce(secret, body), "X-WC-Webhook-Topic": "order.updated",
        "Content-Type": "application/json"})


async def rows(dsn: str):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT purchase_id, type, customer_id, door FROM purchases.purchases ORDER BY recorded_at")
    finally:
        await conn.close()


async def test_shopify_paid_order_and_partial_refund_are_recorded_once(base_env, kafka_bootstrap):
    settings = purchases_settings(base_env)
    order = fresh_shopify_order(9_000_001)
    refund = shopify_refund_of(order, 7_000_001)
    async with running_purchases(settings) as (_, client):
        paid = await post_shopify(client, "orders/paid", order)
        retried = await post_shopify(client, "orders/paid", order)  # Shopify retries deliveries
        refunded = await post_shopify(client, "refunds/create", refund)
        ignored = await post_shopify(client, "orders/create", order)
        events = await consume(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), count=2)
    assert (paid.status_code, retried.status_code, refunded.status_code) == (201, 200, 201)
    assert retried.json()["status"] == "duplicate"
    assert ignored.json()["status"] == "ignored"
    sale, ret = sorted(events, key=lambda e: e["type"])
    assert sale["type"] == "PurchaseRecorded" and sale["payload"]["door"] == "shopify"
    assert sale["customer_id"] == str(order["customer"]["id"])
    assert ret["type"] == "ReturnRecorded" and ret["customer_id"] == sale["customer_id"]
    assert ret["payload"]["original_purchase_id"] == str(order["id"])
    assert len(await rows(settings.database_url)) == 2


async def test_forged_unsigned_and_stale_shopify_webhooks_are_refused(base_env):
    settings = purchases_settings(base_env)
    stale = fresh_shopify_order(9_000_003)
    old = (datetime.now(timezone.utc) - timedelta(days=2)).isoformat()
    stale.update(updated_at=old, processed_at=old, created_at=old)
    async with running_purchases(settings) as (_, client):
        refused_before = await metric_total(client, "purchases_rejected_total", door="shopify", reason="bad_signature")
        unsigned = await post_shopify(client, "orders/paid", fresh_shopify_order(9_000_002), signature=None)
        forged = await post_shopify(client, "orders/paid", fresh_shopify_order(9_000_002), secret="guessed")
        garbage = await post_shopify(client, "orders/paid", fresh_shopify_order(9_000_002), signature="bm90IGEgbWFj")
        replayed = await post_shopify(client, "orders/paid", stale)
        refused = await metric_total(client, "purchases_rejected_total", door="shopify", reason="bad_signature")
    assert [r.status_code for r in (unsigned, forged, garbage, replayed)] == [401, 401, 401, 401]
    assert unsigned.json()["reason"] == "bad_signature" and replayed.json()["reason"] == "stale_webhook"
    assert await rows(settings.database_url) == []
    assert refused - refused_before == 3


async def test_signed_but_unusable_webhook_is_dead_lettered(base_env, kafka_bootstrap):
    settings = purchases_settings(base_env)
    order = fresh_shopify_order(9_000_004)
    del order["line_items"]
    async with running_purchases(settings) as (_, client):
        response = await post_shopify(client, "orders/paid", order)
        [dead] = await consume(kafka_bootstrap, settings.topic(PURCHASES_DLQ), count=1)
    assert response.status_code == 422 and response.json()["reason"] == "unmappable_webhook"
    assert dead["door"] == "shopify" and dead["reason"] == "unmappable_webhook"
    assert json.loads(dead["original"])["id"] == 9_000_004
    assert await rows(settings.database_url) == []


async def test_woocommerce_order_is_recorded_and_refund_reverses_it(base_env, kafka_bootstrap):
    settings = purchases_settings(base_env)
    order = fresh_woo_order(4242)
    async with running_purchases(settings) as (_, client):
        ping = await post_woo(client, b"webhook_id=15")
        recorded = await post_woo(client, order)
        completed = await post_woo(client, {**order, "status": "completed"})
        on_hold = await post_woo(client, fresh_woo_order(4243, status="on-hold"))
        refunded = await post_woo(client, {**order, "status": "refunded"})
        forged = await post_woo(client, fresh_woo_order(4244), secret="nope")
        events = await consume(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), count=2)
    assert ping.json()["status"] == "ping"
    assert recorded.status_code == 201 and completed.json()["status"] == "duplicate"
    assert on_hold.json()["status"] == "ignored"
    assert refunded.status_code == 201 and forged.status_code == 401
    assert sorted(e["type"] for e in events) == ["PurchaseRecorded", "ReturnRecorded"]
    assert [r["door"] for r in await rows(settings.database_url)] == ["woocommerce", "woocommerce"]


async def test_an_eshop_order_sent_by_webhook_and_by_http_is_recorded_once(base_env, kafka_bootstrap):
    """The e-shop back-end may also post its orders over HTTP: same source and purchase id,
    same content, so the second door sees a duplicate."""
    from services.purchases.webhooks import map_shopify_order_paid

    settings = purchases_settings(base_env)
    order = fresh_shopify_order(9_000_005)
    as_contract = map_shopify_order_paid(order, store_id=settings.shopify_store_id)
    async with running_purchases(settings, api_keys={"shop-key": settings.shopify_store_id}) as (_, client):
        by_webhook = await post_shopify(client, "orders/paid", order)
        by_http = await client.post("/v1/purchases", json=as_contract, headers={"X-API-Key": "shop-key"})
    assert by_webhook.status_code == 201
    assert by_http.status_code == 200 and by_http.json()["status"] == "duplicate"
    assert len(await rows(settings.database_url)) == 1


async def test_a_shopify_test_notification_is_acknowledged_counted_and_not_recorded(base_env):
    settings = purchases_settings(base_env)
    sample = {**fresh_shopify_order(9_000_099), "test": True}
    async with running_purchases(settings) as (_, client):
        before = await metric_total(client, "purchases_webhook_test_notifications_total", door="shopify")
        answer = await post_shopify(client, "orders/paid", sample)
        real = await post_shopify(client, "orders/paid", {**fresh_shopify_order(9_000_098), "test": False})
        after = await metric_total(client, "purchases_webhook_test_notifications_total", door="shopify")
    assert answer.status_code == 200 and answer.json()["status"] == "test_notification"
    assert real.status_code == 201
    assert after - before == 1
    assert [r["purchase_id"] for r in await rows(settings.database_url)] == ["9000098"]
