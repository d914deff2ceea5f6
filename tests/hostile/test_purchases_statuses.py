"""Every status the purchases doors produce, reached on purpose with a real request, is
declared for that operation in the service's OpenAPI document (the fuzz in
test_openapi_fuzz.py finds the ones it stumbles on; this one does not rely on chance: a
signed webhook, a parked refund, a store mismatch, a closed door)."""

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from services.purchases.main import create_app
from tests.integration.test_purchases_webhooks import (
    fresh_shopify_order,
    fresh_woo_order,
    post_shopify,
    post_woo,
    shopify_refund_of,
)
from tests.support.hostile import serving
from tests.support.purchases import (
    purchases_settings,
    return_of,
    running_purchases,
    sale,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEY = {"X-API-Key": "key-store-1"}
OTHER_STORE_KEY = {"X-API-Key": "key-store-2"}


def documented(app) -> dict[str, set[int]]:
    return {f"{method.upper()} {path}": {int(s) for s in op["responses"]}
            for path, ops in app.openapi()["paths"].items() for method, op in ops.items()}


async def reach_every_status(client) -> list[tuple[str, int, int, str]]:
    """(operation, expected, answered, body) for every outcome the doors have."""
    seen = []

    async def check(operation: str, expected: int, response) -> None:
        seen.append((operation, expected, response.status_code, response.text[:300]))

    purchase, batch, claim = "POST /v1/purchases", "POST /v1/purchases/batch", "POST /v1/purchases/{purchase_id}/claim"
    shopify, woo = "POST /v1/webhooks/shopify", "POST /v1/webhooks/woocommerce"
    post = client.post

    one = sale(store_id="store-1")
    await check(purchase, 201, await post("/v1/purchases", json=one, headers=KEY))
    await check(purchase, 200, await post("/v1/purchases", json=one, headers=KEY))
    await check(purchase, 409, await post("/v1/purchases", json={**one, "customer_id": "c-other"}, headers=KEY))
    # a return needs its sale at this door (422 unknown_original); only webhook refunds are parked
    await check(purchase, 422, await post("/v1/purchases", json=return_of(sale(store_id="store-1"), {"l1": 1}),
                                          headers=KEY))
    await check(purchase, 401, await post("/v1/purchases", json=sale(store_id="store-1")))
    await check(purchase, 401, await post("/v1/purchases", json=sale(store_id="store-1"), headers={"X-API-Key": "no"}))
    await check(purchase, 403, await post("/v1/purchases", json=sale(store_id="store-1"), headers=OTHER_STORE_KEY))
    await check(purchase, 413, await post("/v1/purchases", content=b" " * 70_000, headers={
        **KEY, "Content-Type": "application/json"}))
    await check(purchase, 422, await post("/v1/purchases", json={**sale(store_id="store-1"), "total": "0.01"},
                                          headers=KEY))

    await check(batch, 200, await post("/v1/purchases/batch", json={"purchases": [sale(store_id="store-1")]},
                                       headers=KEY))
    await check(batch, 401, await post("/v1/purchases/batch", json={"purchases": [sale(store_id="store-1")]}))
    await check(batch, 413, await post("/v1/purchases/batch", json={"purchases": [sale(store_id="store-1")] * 6},
                                       headers=KEY))
    await check(batch, 422, await post("/v1/purchases/batch", json={"purchases": []}, headers=KEY))

    anonymous = sale(store_id="store-1", customer_id=None)
    await post("/v1/purchases", json=anonymous, headers=KEY)
    url = f"/v1/purchases/{anonymous['purchase_id']}/claim"
    await check(claim, 201, await post(url, json={"customer_id": "c-claims"}, headers=KEY))
    await check(claim, 200, await post(url, json={"customer_id": "c-claims"}, headers=KEY))
    await check(claim, 409, await post(url, json={"customer_id": "c-someone-else"}, headers=KEY))
    await check(claim, 404, await post("/v1/purchases/p-none/claim", json={"customer_id": "c-1"}, headers=KEY))
    await check(claim, 401, await post(url, json={"customer_id": "c-claims"}))
    await check(claim, 422, await post(url, json={"customer_id": ""}, headers=KEY))
    old = sale(store_id="store-1", customer_id=None, occurred_at=datetime.now(timezone.utc) - timedelta(days=40))
    await post("/v1/purchases", json=old, headers=KEY)
    await check(claim, 422, await post(f"/v1/purchases/{old['purchase_id']}/claim", json={"customer_id": "c-1"},
                                       headers=KEY))

    order = fresh_shopify_order(uuid.uuid4().int % 10**12)
    await check(shopify, 202, await post_shopify(client, "refunds/create", shopify_refund_of(order, 1_000_001)))
    await check(shopify, 201, await post_shopify(client, "orders/paid", order))
    await check(shopify, 200, await post_shopify(client, "orders/paid", order))
    changed = {**order, "line_items": order["line_items"][:1]}
    await check(shopify, 409, await post_shopify(client, "orders/paid", changed))
    await check(shopify, 200, await post_shopify(client, "customers/create", order))  # ignored
    await check(shopify, 401, await post_shopify(client, "orders/paid", order, signature="forged"))
    stale = fresh_shopify_order(uuid.uuid4().int % 10**12)
    stale["processed_at"] = stale["created_at"] = stale["updated_at"] = "2020-01-01T00:00:00+00:00"
    await check(shopify, 401, await post_shopify(client, "orders/paid", stale))
    await check(shopify, 422, await post_shopify(client, "orders/paid", {**order, "line_items": "none"}))
    await check(shopify, 413, await client.post("/v1/webhooks/shopify", content=b" " * 70_000))

    woo_order = fresh_woo_order(uuid.uuid4().int % 10**9)
    await check(woo, 201, await post_woo(client, woo_order))
    await check(woo, 200, await post_woo(client, woo_order))
    await check(woo, 200, await post_woo(client, b"webhook_id=12"))  # ping
    await check(woo, 401, await client.post("/v1/webhooks/woocommerce", content=json.dumps(woo_order).encode()))
    await check(woo, 422, await post_woo(client, b"[1, 2"))
    return seen


async def test_every_status_the_doors_produce_is_in_the_openapi_document(base_env):
    settings = purchases_settings(base_env, max_batch_items=5, max_body_bytes=65_536)
    async with running_purchases(settings, api_keys={"key-store-1": "store-1", "key-store-2": "store-2"}) as (app, client):
        seen = await reach_every_status(client)
    declared = documented(app)
    unexpected = [s for s in seen if s[1] != s[2]]
    assert not unexpected, unexpected  # each request reached the outcome it was built for
    undocumented = sorted({(op, status) for op, _, status, _ in seen if status not in declared[op]})
    assert not undocumented, undocumented


async def test_webhooks_without_a_secret_answer_the_documented_503(base_env):
    settings = purchases_settings(base_env, shopify_webhook_secret=None, woocommerce_webhook_secret=None)
    app = create_app(settings)
    async with serving(app, "http://purchases") as client:
        answers = {path: (await client.post(path, content=b"{}")).status_code
                   for path in ("/v1/webhooks/shopify", "/v1/webhooks/woocommerce")}
    declared = documented(app)
    assert answers == {"/v1/webhooks/shopify": 503, "/v1/webhooks/woocommerce": 503}
    assert all(503 in declared[f"POST {path}"] for path in answers)
