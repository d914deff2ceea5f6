"""Hostile input at the purchases service's HTTP doors (single, batch, Shopify and
WooCommerce webhooks): no 5xx, every refusal a 4xx whose body says why, counted in
/metrics, dead-lettered where the door has no caller to tell (webhooks), and nothing
recorded for a refused input."""

import json

import pytest

from shared.topics import PURCHASES_DLQ
from tests.support.hostile import (
    collect,
    fetch,
    kafka_mutations,
    metric,
    mutated_documents,
    mutated_purchases,
    running_purchases,
    shopify_order,
    shopify_refund,
    woo_order,
)
from tests.support.kafka import consume
from tests.support.purchases import SHOPIFY_SECRET, WOO_SECRET, purchases_settings, sale
from tests.support.webhooks import sign_shopify, sign_woocommerce

pytestmark = pytest.mark.asyncio(loop_scope="session")
KEY = {"X-API-Key": "key-store-1"}
JSON = {"Content-Type": "application/json"}


async def purchase_ids(dsn: str) -> set[str]:
    return {r["purchase_id"] for r in await fetch(dsn, "SELECT purchase_id FROM purchases.purchases")}


async def rejected_total(client, door: str) -> float:
    """purchases_rejected_total summed over reasons for one door."""
    response = await client.get("/metrics")
    total = 0.0
    for line in response.text.splitlines():
        if line.startswith("purchases_rejected_total{") and f'door="{door}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# Left out here: reported to the owner, added back once fixed (a WooCommerce status that is
# not a string is a 500: skipped in the webhook mutations below). A JSON body nested deeper
# than the parser goes and one that is not UTF-8 are in again: 422 malformed_json, counted.
KNOWN_GAPS: set[str] = set()
# HTTP reads JSON as RFC 8259 allows (a UTF-8 BOM ignored, UTF-16 detected): not refusals there.
HTTP_ACCEPTS = {"utf16", "bom_then_json"}


def explains(response) -> bool:
    body = response.json()
    return bool(body.get("reason") and (body.get("message") or body.get("errors")))


async def test_broken_purchases_over_http_get_a_4xx_with_the_reason_and_nothing_is_recorded(base_env):
    settings = purchases_settings(base_env)
    broken = [(label, body) for label, body in kafka_mutations(sale()) if label not in KNOWN_GAPS | HTTP_ACCEPTS]
    async with running_purchases(settings) as (_, client):
        before = await rejected_total(client, "http")
        singles = {label: await client.post("/v1/purchases", content=body, headers=KEY | JSON)
                   for label, body in broken}
        parsable = []
        for label, body in broken:
            if len(body) > settings.max_body_bytes // 2:
                continue  # a batch carrying it would be refused whole (413), tested on its own
            try:
                value = json.loads(body)
            except (ValueError, RecursionError):  # not JSON, not UTF-8, or too deep to read
                continue
            if isinstance(value, dict):  # the batch schema itself refuses other items (422, tested above)
                parsable.append((label, value))
        batch = await client.post("/v1/purchases/batch", content=json.dumps({"purchases": [p for _, p in parsable]}),
                                  headers=KEY | JSON)
        after = await rejected_total(client, "http")
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    for label, response in singles.items():
        assert 400 <= response.status_code < 500, (label, response.status_code, response.text[:300])
        assert explains(response), (label, response.text[:300])
    assert batch.status_code == 200
    results = batch.json()["results"]
    assert len(results) == len(parsable)
    for (label, _), result in zip(parsable, results):
        assert result["status"] == "rejected" and result["reason"] and result["errors"], (label, result)
    assert await purchase_ids(settings.database_url) == set()
    # Every refusal is counted: each single request and each refused batch item.
    assert after - before == len(singles) + len(parsable)


async def test_property_mutated_purchases_over_http_are_recorded_exactly_when_accepted(base_env):
    settings = purchases_settings(base_env)
    mutated = collect(mutated_purchases(lambda: sale(customer_id="http-property")), 80)
    async with running_purchases(settings) as (_, client):
        responses = [await client.post("/v1/purchases", content=json.dumps(m), headers=KEY | JSON) for m in mutated]
        batch = await client.post("/v1/purchases/batch", content=json.dumps({"purchases": collect(
            mutated_purchases(lambda: sale(customer_id="batch-property")), 60)}), headers=KEY | JSON)
    accepted = set()
    for m, response in zip(mutated, responses):
        assert response.status_code in (201, 400, 403, 409, 422), (m, response.status_code, response.text[:300])
        if response.status_code == 201:
            accepted.add(m["purchase_id"])
        else:
            assert explains(response), (m, response.text[:300])
    assert batch.status_code == 200
    for result in batch.json()["results"]:
        assert result["status"] in ("recorded", "rejected", "conflict"), result
        if result["status"] == "recorded":
            accepted.add(result["purchase_id"])
        else:
            assert result["reason"] and result["errors"], result
    assert accepted, "some mutations are still valid purchases (e.g. another customer id)"
    assert await purchase_ids(settings.database_url) == accepted


async def _post_signed(client, door: str, document, *, topic: str = "orders/paid"):
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    if door == "shopify":
        headers = {"X-Shopify-Hmac-Sha256": sign_shopify(SHOPIFY_SECRET, body), "X-Shopify-Topic": topic}
    else:
        headers = {"X-WC-Webhook-Signature": sign_woocommerce(WOO_SECRET, body), "X-WC-Webhook-Topic": "order.updated"}
    return body, await client.post(f"/v1/webhooks/{door}", content=body, headers=headers | JSON)


async def test_mutated_but_validly_signed_webhooks_are_recorded_or_dead_lettered_never_crash(base_env, kafka_bootstrap):
    settings = purchases_settings(base_env)
    base_order = shopify_order()
    documents = (
        [("shopify", "orders/paid", d) for d in collect(mutated_documents(shopify_order), 40)]
        + [("shopify", "refunds/create", d) for d in collect(
            mutated_documents(lambda: shopify_refund(base_order["id"])), 30)]
        + [("woocommerce", "", d) for d in collect(mutated_documents(woo_order), 40)]
        + [("woocommerce", "", b"\xff\xfe not json"), ("woocommerce", "", b"[]"), ("shopify", "orders/paid", b"null"),
           ("shopify", "orders/paid", b'{"id": ' + b"[" * 500 + b"]" * 500 + b"}")]
    )
    async with running_purchases(settings) as (_, client):
        counted_before = sum([await rejected_total(client, door) for door in ("shopify", "woocommerce")])
        _, first = await _post_signed(client, "shopify", base_order)
        assert first.status_code == 201
        outcomes = [(door, *await _post_signed(client, door, d, topic=topic)) for door, topic, d in documents]
        ready = await client.get("/readyz")
        counted = sum([await rejected_total(client, door) for door in ("shopify", "woocommerce")]) - counted_before
        refused = [(door, body, r) for door, body, r in outcomes if r.status_code in (409, 422)]
        dead = await consume(kafka_bootstrap, settings.topic(PURCHASES_DLQ), count=len(refused), timeout_s=20)
    assert ready.status_code == 200
    recorded = 0
    for door, body, response in outcomes:
        assert response.status_code in (200, 201, 202, 401, 409, 422), (door, body[:300], response.status_code,
                                                                      response.text[:300])
        if response.status_code >= 400:
            assert explains(response), response.text[:300]
        if response.status_code == 401:
            assert response.json()["reason"] == "stale_webhook"  # a mutated timestamp: signed, but old
        recorded += response.status_code == 201
    assert len(dead) == len(refused)
    assert counted == sum(1 for _, _, r in outcomes if r.status_code in (401, 409, 422)), "every refusal counted"
    by_original = {(d["door"], d["original"]): d for d in dead}
    for door, body, response in refused:
        letter = by_original[(door, body.decode("utf-8", errors="replace"))]
        assert letter["reason"] == response.json()["reason"] and letter["errors"]
    rows = await purchase_ids(settings.database_url)
    assert len(rows) == recorded + 1


SIGNATURES = {
    "missing": None,
    "empty": "",
    "other_secret": lambda body: sign_shopify("guessed-secret", body),
    "other_body": lambda body: sign_shopify(SHOPIFY_SECRET, body + b" "),
    "truncated": lambda body: sign_shopify(SHOPIFY_SECRET, body)[:-4],
    "hex_instead_of_base64": lambda body: sign_shopify(SHOPIFY_SECRET, body).encode().hex(),
    "flipped_bit": lambda body: ("B" if sign_shopify(SHOPIFY_SECRET, body)[0] == "A" else "A")
    + sign_shopify(SHOPIFY_SECRET, body)[1:],
    "sha1_scheme": lambda body: "sha1=" + sign_shopify(SHOPIFY_SECRET, body),
    "non_ascii": "é" * 44,
    "injection": "' OR '1'='1",
}


async def test_forged_signatures_are_refused_counted_and_not_dead_lettered(base_env, kafka_bootstrap):
    settings = purchases_settings(base_env)
    async with running_purchases(settings) as (_, client):
        before = {door: await metric(client, "purchases_rejected_total", door=door, reason="bad_signature")
                  for door in ("shopify", "woocommerce")}
        responses = []
        for name, signature in SIGNATURES.items():
            for door, document, header in (("shopify", shopify_order(), "X-Shopify-Hmac-Sha256"),
                                           ("woocommerce", woo_order(), "X-WC-Webhook-Signature")):
                body = json.dumps(document).encode()
                headers = {"X-Shopify-Topic": "orders/paid"} | JSON
                if signature is not None:
                    value = signature(body) if callable(signature) else signature
                    headers[header] = value.encode("utf-8")
                responses.append((name, door, await client.post(f"/v1/webhooks/{door}", content=body, headers=headers)))
        after = {door: await metric(client, "purchases_rejected_total", door=door, reason="bad_signature")
                 for door in ("shopify", "woocommerce")}
        dead = await consume(kafka_bootstrap, settings.topic(PURCHASES_DLQ), idle_s=1.0, timeout_s=3)
    for name, door, response in responses:
        assert response.status_code == 401, (name, door, response.text)
        assert response.json()["reason"] == "bad_signature"
    assert after["shopify"] - before["shopify"] == len(SIGNATURES)
    assert after["woocommerce"] - before["woocommerce"] == len(SIGNATURES)
    # Unauthenticated bodies are not evidence of anything: they are not kept on the DLQ.
    assert dead == []
    assert await purchase_ids(settings.database_url) == set()
