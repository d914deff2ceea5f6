"""Each door of the purchases service against the real broker and PostgreSQL."""

import asyncio
import json

import asyncpg
import pytest

from shared.topics import PURCHASES_DLQ, PURCHASES_RAW, PURCHASES_RECORDED
from tests.support.hostile import metric_total
from tests.support.kafka import consume, produce
from tests.support.purchases import purchases_settings, return_of, running_purchases, sale

pytestmark = pytest.mark.asyncio(loop_scope="session")
HEADERS = {"X-API-Key": "key-store-1"}


@pytest.fixture
def settings(base_env):
    return purchases_settings(base_env)


async def recorded_rows(settings) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetch("SELECT * FROM purchases.purchases ORDER BY recorded_at")
    finally:
        await conn.close()


async def test_kafka_door_records_a_purchase_and_publishes_it(settings, kafka_bootstrap):
    async with running_purchases(settings):
        s = sale(customer_id="alice")
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RAW), [s])
        [event] = await consume(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), count=1)
    assert event["type"] == "PurchaseRecorded"
    assert event["customer_id"] == "alice" and event["_key"] == "alice"
    assert event["payload"]["purchase_id"] == s["purchase_id"]
    assert event["payload"]["total"] == "115.00" and event["payload"]["door"] == "kafka"
    assert [r["purchase_id"] for r in await recorded_rows(settings)] == [s["purchase_id"]]


async def test_http_door_records_once_and_refuses_a_changed_resend(settings, kafka_bootstrap):
    async with running_purchases(settings) as (_, client):
        s = sale()
        first = await client.post("/v1/purchases", json=s, headers=HEADERS)
        again = await client.post("/v1/purchases", json=s, headers=HEADERS)
        changed = await client.post("/v1/purchases", json={**s, "customer_id": "mallory"}, headers=HEADERS)
        events = await consume(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), count=2, timeout_s=3)
    assert first.status_code == 201 and first.json()["status"] == "recorded"
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert again.json()["event_id"] == first.json()["event_id"]
    assert changed.status_code == 409 and changed.json()["reason"] == "conflict"
    assert len(events) == 1
    [row] = await recorded_rows(settings)
    assert row["customer_id"] == "c-1"


async def test_the_same_purchase_through_two_doors_is_recorded_once(settings, kafka_bootstrap):
    async with running_purchases(settings) as (_, client):
        s = sale()
        response = await client.post("/v1/purchases", json=s, headers=HEADERS)
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RAW), [s, s])
        probe = sale()  # produced after the duplicates: once it is recorded, they were processed
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RAW), [probe])
        events = await consume(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), count=3, timeout_s=5)
    assert response.status_code == 201
    assert sorted(e["payload"]["purchase_id"] for e in events) == sorted([s["purchase_id"], probe["purchase_id"]])
    assert len(await recorded_rows(settings)) == 2


async def test_bad_kafka_inputs_go_to_the_dead_letter_topic_with_reasons(settings, kafka_bootstrap):
    good = sale()
    bad_total = {**sale(), "total": "1.00"}
    future = sale()
    future["occurred_at"] = "2999-01-01T00:00:00+00:00"
    unknown_currency = sale(currency="XYZ")
    over_return = return_of(good, {"l1": 3})
    naive_time = {**sale(), "occurred_at": "2026-01-01T10:00:00"}
    async with running_purchases(settings):
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RAW), [good])
        await consume(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), count=1)
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RAW),
                      [b"{not json", {"hello": "world"}, bad_total, future, unknown_currency, over_return, naive_time])
        dead = await consume(kafka_bootstrap, settings.topic(PURCHASES_DLQ), count=7)
        recorded = await consume(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), at_least=1, idle_s=0.5,
                                 timeout_s=30)
    reasons = sorted(d["reason"] for d in dead)
    assert reasons == sorted(["malformed_json", "schema", "total_mismatch", "timestamp_future", "unknown_currency",
                              "over_return", "schema"])
    assert all(d["door"] == "kafka" and d["original_topic"] == settings.topic(PURCHASES_RAW) for d in dead)
    assert any(d["original"] == "{not json" for d in dead)
    assert len(recorded) == 1
    assert len(await recorded_rows(settings)) == 1


async def test_partial_returns_add_up_and_cannot_exceed_what_was_bought(settings, kafka_bootstrap):
    async with running_purchases(settings) as (_, client):
        s = sale(customer_id="bob")
        assert (await client.post("/v1/purchases", json=s, headers=HEADERS)).status_code == 201
        first = await client.post("/v1/purchases", json=return_of(s, {"l1": 1}), headers=HEADERS)
        second = await client.post("/v1/purchases", json=return_of(s, {"l1": 1, "l2": 1}), headers=HEADERS)
        third = await client.post("/v1/purchases", json=return_of(s, {"l1": 1}), headers=HEADERS)
        orphan = await client.post("/v1/purchases", json=return_of(sale(), {"l1": 1}), headers=HEADERS)
        events = await consume(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), count=3)
    assert (first.status_code, second.status_code) == (201, 201)
    assert third.status_code == 422 and third.json()["reason"] == "over_return"
    assert "only 0 left" in third.json()["errors"][0]["msg"]
    assert orphan.status_code == 422 and orphan.json()["reason"] == "unknown_original"
    returns = [e for e in events if e["type"] == "ReturnRecorded"]
    assert len(returns) == 2 and all(e["customer_id"] == "bob" for e in returns)


async def test_http_refusals_say_why_and_record_nothing(settings):
    async with running_purchases(settings) as (_, client):
        refused_before = await metric_total(client, "purchases_rejected_total", door="http", reason="invalid_api_key")
        no_key = await client.post("/v1/purchases", json=sale())
        wrong_key = await client.post("/v1/purchases", json=sale(), headers={"X-API-Key": "nope"})
        other_store = await client.post("/v1/purchases", json=sale(store_id="store-2"), headers=HEADERS)
        missing_field = await client.post("/v1/purchases", json={**sale(), "lines": []}, headers=HEADERS)
        not_json = await client.post("/v1/purchases", content=b"{oops", headers={**HEADERS, "content-type": "application/json"})
        huge = await client.post("/v1/purchases", content=b"x" * 2_000_000, headers=HEADERS)
        too_many = await client.post("/v1/purchases/batch", json={"purchases": [sale()] * 501}, headers=HEADERS)
        refused = await metric_total(client, "purchases_rejected_total", door="http", reason="invalid_api_key")
    assert no_key.status_code == 401 and no_key.json()["detail"]["reason"] == "missing_api_key"
    assert wrong_key.status_code == 401
    assert other_store.status_code == 403 and other_store.json()["reason"] == "store_mismatch"
    assert missing_field.status_code == 422 and missing_field.json()["errors"][0]["loc"] == ["body", "lines"]
    assert not_json.status_code == 422 and not_json.json()["reason"] == "malformed_json"
    assert huge.status_code == 413
    assert too_many.status_code == 413
    assert await recorded_rows(settings) == []
    assert refused - refused_before == 1


async def test_batch_endpoint_reports_each_item(settings):
    async with running_purchases(settings) as (_, client):
        a, b = sale(), sale()
        response = await client.post("/v1/purchases/batch", headers=HEADERS,
                                     json={"purchases": [a, b, a, {**b, "customer_id": "eve"}, {"junk": 1}]})
    assert response.status_code == 200
    statuses = [r["status"] for r in response.json()["results"]]
    assert statuses == ["recorded", "recorded", "duplicate", "conflict", "rejected"]
    assert len(await recorded_rows(settings)) == 2


async def test_anonymous_sale_is_claimed_once_with_what_was_kept(settings, kafka_bootstrap):
    async with running_purchases(settings) as (_, client):
        s = sale(customer_id=None)
        assert (await client.post("/v1/purchases", json=s, headers=HEADERS)).status_code == 201
        assert (await client.post("/v1/purchases", json=return_of(s, {"l1": 1}), headers=HEADERS)).status_code == 201
        claim = await client.post(f"/v1/purchases/{s['purchase_id']}/claim", json={"customer_id": "carol"}, headers=HEADERS)
        repeat = await client.post(f"/v1/purchases/{s['purchase_id']}/claim", json={"customer_id": "carol"}, headers=HEADERS)
        stolen = await client.post(f"/v1/purchases/{s['purchase_id']}/claim", json={"customer_id": "dave"}, headers=HEADERS)
        unknown = await client.post("/v1/purchases/nope/claim", json={"customer_id": "dave"}, headers=HEADERS)
        events = await consume(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), count=3)
    assert claim.status_code == 201 and repeat.status_code == 200
    assert stolen.status_code == 409 and unknown.status_code == 404
    [claimed] = [e for e in events if e["type"] == "PurchaseClaimed"]
    assert claimed["customer_id"] == "carol" and claimed["_key"] == "carol"
    assert {line["line_id"]: line["quantity"] for line in claimed["payload"]["lines"]} == {"l1": 1, "l2": 1}
    assert claimed["payload"]["total"] == "102.50"


async def test_service_documents_and_health(settings):
    async with running_purchases(settings) as (_, client):
        ready = await client.get("/readyz")
        openapi = (await client.get("/openapi.json")).json()
        asyncapi = (await client.get("/asyncapi.json")).json()
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": True, "broker": True}
    assert "/v1/purchases" in openapi["paths"] and "/v1/webhooks/shopify" in openapi["paths"]
    assert any("purchases.recorded" in name for name in json.dumps(asyncapi["channels"]).split('"'))


async def test_a_return_that_arrives_before_its_sale_waits_for_it(base_env, kafka_bootstrap):
    # Parked long enough that a loaded machine still brings the sale (0.5 s later) in time.
    settings = purchases_settings(base_env, return_park_s=5)
    s = sale(customer_id="erin")
    early_return = return_of(s, {"l2": 1})
    orphan = return_of(sale(), {"l1": 1})  # its sale never comes
    async with running_purchases(settings):
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RAW), [early_return, orphan])
        await asyncio.sleep(0.5)
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RAW), [s])
        events = await consume(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), count=2)
        [dead] = await consume(kafka_bootstrap, settings.topic(PURCHASES_DLQ), count=1, timeout_s=30)
    assert [e["type"] for e in events] == ["PurchaseRecorded", "ReturnRecorded"]
    assert events[1]["customer_id"] == "erin" and events[1]["payload"]["purchase_id"] == early_return["purchase_id"]
    assert dead["reason"] == "unknown_original" and json.loads(dead["original"])["purchase_id"] == orphan["purchase_id"]
    assert len(await recorded_rows(settings)) == 2
