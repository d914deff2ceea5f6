"""Bodies no service should read: larger than its limit (declared by Content-Length or
streamed chunked without one), not UTF-8, or JSON nested deeper than the parser goes. Each
refused with a 4xx in the service's own error shape, counted in /metrics, nothing recorded.
Also the ledger's refused admin keys, counted per reason."""

import asyncio
import contextlib
import json
import socket
import uuid

import httpx
import pytest
import uvicorn

from services.purchases import repository as purchases_repository
from services.purchases.main import create_app as create_purchases
from tests.support.hostile import fetch, metric_total, nested, running_purchases, table_counts
from tests.support.ledger import ADMIN, ledger_settings, running_ledger
from tests.support.purchases import purchases_settings, sale
from tests.support.rewards import ADMIN as REWARDS_ADMIN
from tests.support.rewards import rewards_settings, running_rewards

pytestmark = pytest.mark.asyncio(loop_scope="session")
KEY = {"X-API-Key": "key-store-1"}
JSON = {"Content-Type": "application/json"}


def chunked(body: bytes, size: int = 4096):
    """The body as an async stream: httpx sends it with Transfer-Encoding: chunked and no
    Content-Length, so only counting the bytes as they arrive can stop it."""
    async def stream():
        for i in range(0, len(body), size):
            yield body[i:i + size]
    return stream()


def unreadable_bodies() -> dict[str, bytes]:
    """JSON bodies FastAPI cannot parse (before the fix: its bare 400, uncounted)."""
    text = json.dumps(sale()).encode()
    return {"invalid_utf8": text.replace(b'"sale"', b'"s\xffle"'), "latin1": '{"purchase_id": "caf\xe9"}'.encode("latin-1"),
            "deep_nesting": nested(100_000), "batch_deep_nesting": b'{"purchases": [' + nested(100_000) + b"]}"}


async def purchase_count(dsn: str) -> int:
    return len(await fetch(dsn, "SELECT purchase_id FROM purchases.purchases"))


async def test_a_chunked_body_over_the_purchases_limit_is_refused_with_413_counted_and_not_recorded(base_env):
    settings = purchases_settings(base_env, max_body_bytes=20_000)
    big = json.dumps(sale(lines=[(f"l{i}", 1, "1.00", "0.00") for i in range(400)])).encode()
    small = json.dumps(sale()).encode()
    assert len(big) > settings.max_body_bytes
    async with running_purchases(settings) as (_, client):
        before = (await metric_total(client, "purchases_rejected_total", door="http", reason="body_too_large"),
                  await metric_total(client, "http_requests_refused_total", reason="body_too_large"))
        single = await client.post("/v1/purchases", content=chunked(big), headers=KEY | JSON)
        batch = await client.post("/v1/purchases/batch", content=chunked(b'{"purchases": [' + big + b"]}"),
                                  headers=KEY | JSON)
        within = await client.post("/v1/purchases", content=chunked(small), headers=KEY | JSON)
        after = (await metric_total(client, "purchases_rejected_total", door="http", reason="body_too_large"),
                 await metric_total(client, "http_requests_refused_total", reason="body_too_large"))
    assert "content-length" not in single.request.headers and single.request.headers["transfer-encoding"] == "chunked"
    for response in (single, batch):
        assert response.status_code == 413, response.text[:300]
        assert response.json()["reason"] == "body_too_large" and "20000 bytes" in response.json()["message"]
    assert within.status_code == 201, within.text
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)
    assert await purchase_count(settings.database_url) == 1  # only the small one


async def test_a_chunked_body_over_the_limit_at_a_webhook_is_a_413_not_an_application_error(base_env):
    """The webhook routes read the body themselves: the refused body must end as the 413,
    not as a ClientDisconnect raised out of the app (logged as an error, connection dropped)."""
    settings = purchases_settings(base_env, max_body_bytes=20_000)
    app = create_purchases(settings)
    async with app.router.lifespan_context(app):
        # raise_app_exceptions: an exception escaping the app fails the test instead of a 500.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=True),
                                     base_url="http://purchases") as client:
            for path in ("/v1/webhooks/shopify", "/v1/webhooks/woocommerce"):
                response = await client.post(path, content=chunked(b"x" * 60_000), headers=JSON)
                assert response.status_code == 413, (path, response.text[:300])
                assert response.json()["reason"] == "body_too_large"


async def test_the_ledger_counts_body_refusals_in_the_shared_metric_too(base_env):
    settings = ledger_settings(base_env, max_body_bytes=10_000)
    big = json.dumps({"customer_id": "c", "amount_points": 1, "reason_code": "other", "actor": "a",
                      "note": "x" * 50_000}).encode()
    async with running_ledger(settings) as (_, client):
        before = (await metric_total(client, "ledger_http_refusals_total", reason="body_too_large"),
                  await metric_total(client, "http_requests_refused_total", reason="body_too_large"))
        declared = await client.post("/v1/admin/adjustments", content=big, headers=ADMIN | JSON)
        streamed = await client.post("/v1/admin/adjustments", content=chunked(big), headers=ADMIN | JSON)
        after = (await metric_total(client, "ledger_http_refusals_total", reason="body_too_large"),
                 await metric_total(client, "http_requests_refused_total", reason="body_too_large"))
    for response in (declared, streamed):
        assert response.status_code == 413 and "larger than 10000 bytes" in response.json()["detail"], response.text
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)
    assert (await table_counts(settings.database_url, "ledger"))["adjustments"] == 0


async def test_rewards_gets_the_shared_body_limit_without_a_setting_of_its_own(base_env):
    # No REWARDS_MAX_BODY_BYTES: the skeleton's default (8 MiB) applies; the largest coupon
    # upload the contract allows (50,000 codes of 128 characters, ~6.6 MB) still fits.
    settings = rewards_settings(base_env)
    largest = json.dumps({"codes": [f"{i:0128d}" for i in range(50_000)]}).encode()
    oversized = json.dumps({"codes": [f"{i:0128d}" for i in range(70_000)]}).encode()
    path = f"/v1/admin/rewards/missing-{uuid.uuid4().hex[:8]}/coupons"
    async with running_rewards(settings) as (_, client):
        before = await metric_total(client, "http_requests_refused_total", reason="body_too_large")
        refused = await client.post(path, content=chunked(oversized, 65_536), headers=REWARDS_ADMIN | JSON)
        declared = await client.post(path, content=oversized, headers=REWARDS_ADMIN | JSON)
        fits = await client.post(path, content=chunked(largest, 65_536), headers=REWARDS_ADMIN | JSON)
        after = await metric_total(client, "http_requests_refused_total", reason="body_too_large")
    assert (refused.status_code, declared.status_code) == (413, 413), (refused.text[:300], declared.text[:300])
    assert "body_too_large" in refused.text
    assert fits.status_code != 413, fits.text[:300]  # read and handled (the reward does not exist)
    assert after - before == 2


async def test_unreadable_json_at_the_purchases_doors_gets_422_in_the_purchases_shape_counted(base_env):
    settings = purchases_settings(base_env, max_body_bytes=2_000_000)
    bodies = unreadable_bodies()
    async with running_purchases(settings) as (_, client):
        before = await metric_total(client, "purchases_rejected_total", door="http", reason="malformed_json")
        responses = []
        for label, body in bodies.items():
            for path in ("/v1/purchases", "/v1/purchases/batch", "/v1/purchases/p-1/claim"):
                responses.append((label, path, await client.post(path, content=body, headers=KEY | JSON)))
        after = await metric_total(client, "purchases_rejected_total", door="http", reason="malformed_json")
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    for label, path, response in responses:
        assert response.status_code == 422, (label, path, response.status_code, response.text[:300])
        body = response.json()
        assert body["status"] == "rejected" and body["reason"] == "malformed_json", (label, path, body)
        assert body["errors"] and body["errors"][0]["type"] in ("json_invalid_utf8", "json_too_deep"), (label, body)
        assert body["message"], (label, body)
    assert after - before == len(responses)
    assert await purchase_count(settings.database_url) == 0


async def test_unreadable_json_at_the_ledgers_doors_gets_422_in_the_ledgers_shape_counted(base_env):
    settings = ledger_settings(base_env, max_body_bytes=2_000_000)
    bodies = unreadable_bodies()
    calls = [("POST", "/v1/admin/adjustments"), ("PUT", "/v1/admin/program"), ("POST", "/v1/rules/simulate")]
    async with running_ledger(settings) as (_, client):
        program = (await client.get("/v1/admin/program", headers=ADMIN)).json()
        tables = await table_counts(settings.database_url, "ledger")
        before = await metric_total(client, "ledger_http_refusals_total", reason="malformed_body")
        responses = []
        for label, body in bodies.items():
            for method, path in calls:
                responses.append((label, path, await client.request(method, path, content=body, headers=ADMIN | JSON)))
        after = await metric_total(client, "ledger_http_refusals_total", reason="malformed_body")
        program_after = (await client.get("/v1/admin/program", headers=ADMIN)).json()
        tables_after = await table_counts(settings.database_url, "ledger")
    for label, path, response in responses:
        assert response.status_code == 422, (label, path, response.status_code, response.text[:300])
        [error] = response.json()["detail"]
        assert error["type"] in ("json_invalid_utf8", "json_too_deep") and error["loc"] == ["body"], (label, error)
        assert error["msg"], (label, error)
    assert after - before == len(responses)
    assert program_after["version"] == program["version"] and tables_after == tables


async def test_the_ledger_counts_refused_admin_keys_per_reason(base_env):
    settings = ledger_settings(base_env)
    keys = {"missing_admin_key": [None], "invalid_admin_key": ["", "wrong", " ledger-admin-test-key", "' OR '1'='1"]}
    calls = [("GET", "/v1/admin/program", None),
             ("POST", "/v1/admin/adjustments", {"customer_id": "mallory", "amount_points": 5,
                                                "reason_code": "goodwill", "actor": "mallory"})]
    async with running_ledger(settings) as (_, client):
        before = {r: await metric_total(client, "ledger_http_refusals_total", reason=r) for r in keys}
        statuses = []
        for values in keys.values():
            for key in values:
                headers = {} if key is None else {"X-Admin-Key": key}
                for method, path, body in calls:
                    statuses.append((await client.request(method, path, json=body, headers=headers)).status_code)
        ok = await client.get("/v1/admin/program", headers=ADMIN)
        after = {r: await metric_total(client, "ledger_http_refusals_total", reason=r) for r in keys}
    assert set(statuses) == {401} and ok.status_code == 200
    assert {r: after[r] - before[r] for r in keys} == {"missing_admin_key": 2, "invalid_admin_key": 8}
    assert (await table_counts(settings.database_url, "ledger"))["adjustments"] == 0


async def test_a_program_nested_hundreds_of_levels_deep_is_refused_with_422_not_a_500(base_env):
    # Valid JSON the parser reads, deeper than the ledger's NUL check could recurse.
    settings = ledger_settings(base_env)
    body = '{"tiers": ' + "[" * 800 + "]" * 800 + "}"
    async with running_ledger(settings) as (_, client):
        response = await client.put("/v1/admin/program", content=body, headers=ADMIN | JSON)
    assert response.status_code == 422, response.text[:300]


@contextlib.asynccontextmanager
async def over_http(app):
    """The app behind a real uvicorn server (httptools, as `serve` runs it) on a free port,
    in this event loop, and a client speaking real HTTP to it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http="httptools", lifespan="off",
                                           log_config=None))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        await task


async def test_over_real_http_a_client_still_sending_gets_the_413_not_a_connection_reset(base_env):
    settings = purchases_settings(base_env, max_body_bytes=20_000)
    app = create_purchases(settings)
    big = json.dumps(sale(lines=[(f"l{i}", 1, "1.00", "0.00") for i in range(2_000)])).encode()
    async with app.router.lifespan_context(app):
        await purchases_repository.add_api_key(app.state.runtime.pool, key="key-store-1", store_id="store-1")
        async with over_http(app) as client:
            declared = await client.post("/v1/purchases", content=big, headers=KEY | JSON)
            streamed = await client.post("/v1/purchases", content=chunked(big), headers=KEY | JSON)
            after = await client.post("/v1/purchases", json=sale(), headers=KEY)  # the connection is still usable
    for response in (declared, streamed):
        assert response.status_code == 413 and response.json()["reason"] == "body_too_large", response.text[:300]
    assert after.status_code == 201, after.text
    assert await purchase_count(settings.database_url) == 1
