"""Security cases at the purchases service's doors: keys (missing, wrong, another store's),
stale webhooks, injection strings in every string field, oversized bodies and batches. Each
refused, counted in /metrics, and nothing recorded; hostile text that is a legal value is
recorded verbatim and never executed."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from shared.topics import PURCHASES_RECORDED
from tests.support.hostile import (
    CONTROL_STRINGS,
    INJECTION_STRINGS,
    LINE_STRING_FIELDS,
    fetch,
    metric,
    running_purchases,
    shopify_order,
    table_counts,
    woo_order,
)
from tests.support.kafka import consume
from tests.support.purchases import SHOPIFY_SECRET, WOO_SECRET, purchases_settings, sale
from tests.support.webhooks import sign_shopify, sign_woocommerce

pytestmark = pytest.mark.asyncio(loop_scope="session")
KEYS = {"key-store-1": "store-1", "key-store-2": "store-2"}


async def rows(dsn: str):
    return await fetch(dsn, "SELECT * FROM purchases.purchases ORDER BY purchase_id")


async def refusals(client, reason: str, door: str = "http") -> float:
    return await metric(client, "purchases_rejected_total", door=door, reason=reason)


async def test_missing_wrong_and_other_stores_keys_are_refused_counted_and_record_nothing(base_env):
    settings = purchases_settings(base_env)
    anonymous = sale(customer_id=None, store_id="store-1")
    bad_keys = {"missing": None, "empty": "", "wrong": "key-store-3", "injection": "' OR '1'='1",
                "almost": "key-store-1 ", "case": "KEY-STORE-1"}
    async with running_purchases(settings, api_keys=KEYS) as (_, client):
        recorded = await client.post("/v1/purchases", json=anonymous, headers={"X-API-Key": "key-store-1"})
        assert recorded.status_code == 201
        before = {r: await refusals(client, r) for r in ("missing_api_key", "invalid_api_key", "store_mismatch")}
        refused = []
        for name, key in bad_keys.items():
            headers = {} if key is None else {"X-API-Key": key}
            refused += [
                (name, await client.post("/v1/purchases", json=sale(), headers=headers)),
                (name, await client.post("/v1/purchases/batch", json={"purchases": [sale()]}, headers=headers)),
                (name, await client.post(f"/v1/purchases/{anonymous['purchase_id']}/claim",
                                         json={"customer_id": "mallory"}, headers=headers)),
            ]
        other = {"X-API-Key": "key-store-2"}
        single = await client.post("/v1/purchases", json=sale(store_id="store-1"), headers=other)
        batch = await client.post("/v1/purchases/batch", json={"purchases": [sale(store_id="store-1")]}, headers=other)
        claim = await client.post(f"/v1/purchases/{anonymous['purchase_id']}/claim", json={"customer_id": "mallory"},
                                  headers=other)
        after = {r: await refusals(client, r) for r in ("missing_api_key", "invalid_api_key", "store_mismatch")}
    for name, response in refused:
        assert response.status_code == 401, (name, response.request.url, response.text)
        reason = response.json()["detail"]["reason"]
        assert reason == ("missing_api_key" if name in ("missing", "empty") else "invalid_api_key"), (name, reason)
    assert single.status_code == 403 and single.json()["reason"] == "store_mismatch"
    assert batch.json()["results"][0]["reason"] == "store_mismatch"
    assert claim.status_code == 404  # another store's sale is not even acknowledged
    assert after["missing_api_key"] - before["missing_api_key"] == 2 * 3
    assert after["invalid_api_key"] - before["invalid_api_key"] == 4 * 3
    assert after["store_mismatch"] - before["store_mismatch"] == 2
    [row] = await rows(settings.database_url)
    assert row["purchase_id"] == anonymous["purchase_id"] and row["customer_id"] is None  # not claimed by mallory


async def test_stale_signed_webhooks_are_refused_counted_and_record_nothing(base_env):
    settings = purchases_settings(base_env)
    old = datetime.now(timezone.utc) - timedelta(seconds=settings.webhook_max_age_s + 60)
    order = {**shopify_order(), "updated_at": old.isoformat(), "processed_at": old.isoformat()}
    woo = {**woo_order(), "date_modified_gmt": old.replace(tzinfo=None, microsecond=0).isoformat()}
    shop_body, woo_body = json.dumps(order).encode(), json.dumps(woo).encode()
    async with running_purchases(settings) as (_, client):
        before = [await refusals(client, "stale_webhook", door) for door in ("shopify", "woocommerce")]
        shop = await client.post("/v1/webhooks/shopify", content=shop_body, headers={
            "X-Shopify-Hmac-Sha256": sign_shopify(SHOPIFY_SECRET, shop_body), "X-Shopify-Topic": "orders/paid"})
        woo_response = await client.post("/v1/webhooks/woocommerce", content=woo_body, headers={
            "X-WC-Webhook-Signature": sign_woocommerce(WOO_SECRET, woo_body)})
        after = [await refusals(client, "stale_webhook", door) for door in ("shopify", "woocommerce")]
    for response in (shop, woo_response):
        assert response.status_code == 401 and response.json()["reason"] == "stale_webhook", response.text
    assert [a - b for a, b in zip(after, before)] == [1, 1]
    assert await rows(settings.database_url) == []


async def test_injection_strings_in_every_string_field_are_recorded_verbatim(base_env, kafka_bootstrap):
    """Every string field of the contract (ids, sku, category; the store through its key)
    carries each hostile string; all are recorded byte for byte, published unchanged, and
    the schema is intact afterwards."""
    settings = purchases_settings(base_env)
    stores = {f"key-hostile-{i}": s for i, s in enumerate(INJECTION_STRINGS)}
    purchases = []
    for i, s in enumerate(INJECTION_STRINGS):
        p = sale(customer_id=s, store_id=s, purchase_id=s)
        p["lines"] = [{**line, **{f: f"{s}{n}" if f == "line_id" else s for f in LINE_STRING_FIELDS}}
                      for n, line in enumerate(p["lines"])]
        purchases.append((f"key-hostile-{i}", p))
    async with running_purchases(settings, api_keys=stores) as (_, client):
        responses = [await client.post("/v1/purchases", json=p, headers={"X-API-Key": key}) for key, p in purchases]
        claims = [await client.post(f"/v1/purchases/{s}/claim", json={"customer_id": s, "source": "pos"},
                                    headers={"X-API-Key": key}) for (key, _), s in zip(purchases, INJECTION_STRINGS)
                  if "/" not in s]
        events = await consume(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), count=len(purchases), timeout_s=15)
    for (_, p), response in zip(purchases, responses):
        assert response.status_code == 201, (p["purchase_id"], response.text)
    assert all(c.status_code == 200 and c.json()["status"] == "already_claimed" for c in claims), [c.text for c in claims]
    stored = {r["purchase_id"]: r for r in await rows(settings.database_url)}
    assert set(stored) == set(INJECTION_STRINGS)
    for _, p in purchases:
        row = stored[p["purchase_id"]]
        assert (row["store_id"], row["customer_id"]) == (p["store_id"], p["customer_id"])
        assert [(x["line_id"], x["sku"], x["category"]) for x in json.loads(row["lines"])] == [
            (x["line_id"], x["sku"], x["category"]) for x in p["lines"]]
    published = {e["payload"]["purchase_id"]: e for e in events}
    assert {e["customer_id"] for e in published.values()} == set(INJECTION_STRINGS)
    assert all(published[s]["payload"]["store_id"] == s for s in INJECTION_STRINGS)
    counts = await table_counts(settings.database_url, "purchases")
    assert counts["purchases"] == len(INJECTION_STRINGS)
    assert counts["store_api_keys"] == len(stores)


async def test_injection_strings_in_webhook_fields_are_recorded_verbatim(base_env):
    """The same through the Shopify door: the e-shop's customer id, SKUs and product types
    carry the hostile strings; the signed orders are recorded with them unchanged (the
    mapping trims surrounding whitespace, and U+2028 is whitespace)."""
    settings = purchases_settings(base_env)
    async with running_purchases(settings) as (_, client):
        sent = []
        for s in INJECTION_STRINGS:
            order = shopify_order()
            order["customer"] = {**order["customer"], "id": s}
            order["line_items"] = [{**item, "sku": s, "product_type": s} for item in order["line_items"]]
            body = json.dumps(order).encode()
            response = await client.post("/v1/webhooks/shopify", content=body, headers={
                "X-Shopify-Hmac-Sha256": sign_shopify(SHOPIFY_SECRET, body), "X-Shopify-Topic": "orders/paid"})
            sent.append((s, str(order["id"]), response))
    stored = {r["purchase_id"]: r for r in await rows(settings.database_url)}
    for raw, order_id, response in sent:
        assert response.status_code == 201, (raw, response.text)
        row, s = stored[order_id], raw.strip()
        assert row["customer_id"] == s
        lines = json.loads(row["lines"])
        assert {x["sku"] for x in lines} == {s}
        assert {x["category"] for x in lines} <= {s, "gift_card"} and s in {x["category"] for x in lines}
    assert len(stored) == len(INJECTION_STRINGS)


async def test_control_characters_in_string_fields_are_refused_with_the_field_named(base_env):
    settings = purchases_settings(base_env)
    async with running_purchases(settings) as (_, client):
        responses = []
        for s in CONTROL_STRINGS:
            for field in ("purchase_id", "customer_id"):
                responses.append((field, s, await client.post("/v1/purchases", json={**sale(), field: s},
                                                              headers={"X-API-Key": "key-store-1"})))
            line_sale = sale()
            line_sale["lines"][0]["sku"] = s
            responses.append(("sku", s, await client.post("/v1/purchases", json=line_sale,
                                                          headers={"X-API-Key": "key-store-1"})))
    for field, s, response in responses:
        assert response.status_code == 422, (field, s, response.text)
        assert field in json.dumps(response.json()["errors"]), (field, response.text)
    assert await rows(settings.database_url) == []


async def test_a_lone_surrogate_in_a_string_field_is_a_422(base_env):
    """JSON may escape a UTF-16 half ("\\ud800") that no UTF-8 text can hold."""
    settings = purchases_settings(base_env)
    p = sale()
    body = json.dumps(p).encode().replace(p["purchase_id"].encode(), b"p\\ud800x")
    async with running_purchases(settings) as (_, client):
        response = await client.post("/v1/purchases", content=body,
                                     headers={"X-API-Key": "key-store-1", "Content-Type": "application/json"})
    assert response.status_code == 422, (response.status_code, response.text[:200])
    assert await rows(settings.database_url) == []


async def test_oversized_bodies_and_batches_are_refused_with_413_and_counted(base_env):
    settings = purchases_settings(base_env, max_body_bytes=20_000, max_batch_items=5)
    many_lines = sale(lines=[(f"l{i}", 1, "1.00", "0.00") for i in range(400)])
    big = json.dumps(many_lines).encode()
    assert len(big) > settings.max_body_bytes
    shop_body = json.dumps({**shopify_order(), "note": "x" * 30_000}).encode()
    async with running_purchases(settings) as (_, client):
        before = (await refusals(client, "body_too_large"), await refusals(client, "batch_too_large"))
        headers = {"X-API-Key": "key-store-1", "Content-Type": "application/json"}
        too_big = await client.post("/v1/purchases", content=big, headers=headers)
        too_big_batch = await client.post("/v1/purchases/batch", content=json.dumps({"purchases": [many_lines]}),
                                          headers=headers)
        too_many = await client.post("/v1/purchases/batch", json={"purchases": [sale() for _ in range(6)]},
                                     headers=headers)
        webhook = await client.post("/v1/webhooks/shopify", content=shop_body, headers={
            "X-Shopify-Hmac-Sha256": sign_shopify(SHOPIFY_SECRET, shop_body), "X-Shopify-Topic": "orders/paid"})
        limit = await client.post("/v1/purchases/batch", json={"purchases": [sale() for _ in range(5)]},
                                  headers=headers)
        after = (await refusals(client, "body_too_large"), await refusals(client, "batch_too_large"))
    for response in (too_big, too_big_batch, webhook):
        assert response.status_code == 413 and response.json()["reason"] == "body_too_large", response.text
    assert too_many.status_code == 413 and too_many.json()["reason"] == "batch_too_large"
    assert (after[0] - before[0], after[1] - before[1]) == (3, 1)
    assert limit.status_code == 200 and limit.json()["summary"] == {"recorded": 5}
    assert len(await rows(settings.database_url)) == 5  # only the batch within the limits
