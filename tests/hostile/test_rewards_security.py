"""Security cases at the rewards service: forged and misused tokens on every customer
endpoint, customer A acting on customer B everywhere, the admin key on every admin
endpoint, and injection strings in every free-text field. Each refusal leaves nothing
recorded; hostile text that is a legal value comes back verbatim."""

import base64
import hashlib
import hmac
import json
import uuid

import jwt
import pytest

from shared.events import utcnow
from tests.support.hostile import INJECTION_STRINGS, fetch, table_counts
from tests.support.kafka import unique
from tests.support.rewards import (
    ADMIN,
    JWT_SECRET,
    bearer,
    eventually,
    fake_ledger,
    rewards_settings,
    running_rewards,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: dict, claims: dict, key: str = JWT_SECRET) -> str:
    """A token HMAC-SHA256-signed with `key` whatever its header claims (for alg confusion)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def bad_authorizations(victim: str, settings) -> dict[str, str | None]:
    """Authorization header values that must never let anyone act as `victim`."""
    now = int(utcnow().timestamp())
    claims = {"sub": victim, "iss": settings.jwt_issuer, "aud": settings.jwt_audience, "iat": now, "exp": now + 600}
    good = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    header, payload, signature = good.split(".")
    tokens = {
        "expired": jwt.encode(claims | {"iat": now - 7200, "exp": now - 3600}, JWT_SECRET, algorithm="HS256"),
        "expired_beyond_leeway": jwt.encode(claims | {"exp": now - settings.jwt_leeway_s - 5}, JWT_SECRET),
        "tampered_payload": f"{header}.{_b64(json.dumps(claims | {'sub': victim + 'x'}).encode())}.{signature}",
        "tampered_signature": f"{header}.{payload}.{signature[:-2]}AA",
        "alg_none": f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{payload}.",
        "alg_none_upper": f"{_b64(json.dumps({'alg': 'NONE'}).encode())}.{payload}.",
        "hs512_same_secret": jwt.encode(claims, JWT_SECRET, algorithm="HS512"),
        "rs256_header_hmac_signature": _signed({"alg": "RS256", "typ": "JWT"}, claims),
        "wrong_issuer": jwt.encode(claims | {"iss": "evil-idp"}, JWT_SECRET),
        "wrong_audience": jwt.encode(claims | {"aud": "another-service"}, JWT_SECRET),
        "wrong_key": jwt.encode(claims, "another-secret-" + "x" * 32),
        "no_exp": jwt.encode({k: v for k, v in claims.items() if k != "exp"}, JWT_SECRET),
        "no_sub": jwt.encode({k: v for k, v in claims.items() if k != "sub"}, JWT_SECRET),
        "empty_sub": jwt.encode(claims | {"sub": " "}, JWT_SECRET),
        "sub_not_a_string": _signed({"alg": "HS256", "typ": "JWT"}, claims | {"sub": {"$ne": None}}),
        "garbage": "not.a.token",
        "injection": "' OR '1'='1",
        "huge": "a" * 20_000,
    }
    headers: dict[str, str | None] = {name: f"Bearer {t}" for name, t in tokens.items()}
    headers |= {"missing": None, "basic_scheme": "Basic " + base64.b64encode(b"user:pass").decode(),
                "token_without_scheme": good, "empty_bearer": "Bearer "}
    return headers


def customer_endpoints(redemption_id: str, reward_id: str) -> list[tuple[str, str, dict | None]]:
    return [("GET", "/v1/rewards", None), ("POST", "/v1/redemptions", {"reward_id": reward_id}),
            ("GET", "/v1/redemptions", None), ("GET", f"/v1/redemptions/{redemption_id}", None),
            ("POST", f"/v1/redemptions/{redemption_id}/cancel", None)]


async def redemptions(settings) -> list:
    return await fetch(settings.database_url, "SELECT * FROM rewards.redemptions ORDER BY requested_at")


@pytest.mark.filterwarnings("ignore:The HMAC key is")  # the HS512 forgery uses the HS256-sized secret on purpose
async def test_forged_tokens_and_other_customers_get_nothing_on_any_customer_endpoint(base_env, kafka_bootstrap):
    settings = rewards_settings(base_env, saga_wait_ms=3000)
    victim, attacker = unique("b-"), unique("a-")
    async with running_rewards(settings) as (_, client), fake_ledger(kafka_bootstrap, settings) as ledger:
        reward = {"reward_id": unique("r-"), "name": "Mug", "cost_points": 100, "kind": "physical", "stock": 5}
        assert (await client.post("/v1/admin/rewards", json=reward, headers=ADMIN)).status_code == 201
        await ledger.credit(victim, 500)
        b = bearer(victim, settings)

        async def funded():
            return (await client.get("/v1/rewards", headers=b)).json()["available_points"] == 500

        await eventually(funded)
        mine = await client.post("/v1/redemptions", json={"reward_id": reward["reward_id"],
                                                          "delivery_address": VICTIM_ADDRESS},
                                 headers=b | {"Idempotency-Key": "victim-key"})
        assert mine.status_code == 200 and mine.json()["status"] == "fulfilled", mine.text
        rid = mine.json()["redemption_id"]
        shipped = await client.post(f"/v1/admin/redemptions/{rid}/ship", headers=ADMIN,
                                    json={"carrier": "DHL", "tracking_number": "VICTIM-1", "actor": "test"})
        assert shipped.status_code == 200, shipped.text

        refused = []
        for name, authorization in bad_authorizations(victim, settings).items():
            headers = {"Idempotency-Key": f"forged-{name}"} | ({"Authorization": authorization} if authorization else {})
            for method, path, body in customer_endpoints(rid, reward["reward_id"]):
                refused.append((name, path, await client.request(method, path, json=body, headers=headers)))

        a = bearer(attacker, settings)
        a_read = await client.get(f"/v1/redemptions/{rid}", headers=a)
        a_cancel = await client.post(f"/v1/redemptions/{rid}/cancel", headers=a)
        a_list = await client.get("/v1/redemptions", headers=a)
        # a customer's token is no admin key: the support and fulfilment routes stay shut
        a_admin = [await client.request(method, path, json=body, headers=a)
                   for method, path, body in admin_calls(rid, victim)]
        a_catalog = await client.get("/v1/rewards", headers=a)
        a_replay = await client.post("/v1/redemptions", json={"reward_id": reward["reward_id"]},
                                     headers=a | {"Idempotency-Key": "victim-key"})
        b_after = await client.get(f"/v1/redemptions/{rid}", headers=b)
    for name, path, response in refused:
        assert response.status_code == 401, (name, path, response.status_code, response.text[:200])
        assert response.json()["error"] in ("missing_token", "invalid_token"), (name, path, response.text[:200])
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # existence is not revealed either: a shipped redemption is 404 to another customer, not already_shipped
    assert a_read.status_code == 404 and a_cancel.status_code == 404
    assert all(r.status_code == 401 and r.json()["error"] == "invalid_admin_key" for r in a_admin), [
        (r.request.url.path, r.status_code) for r in a_admin if r.status_code != 401]
    assert not any(VICTIM_ADDRESS["line1"] in r.text or "VICTIM-1" in r.text
                   for r in [a_read, a_cancel, a_list, a_catalog, a_replay, *a_admin])
    assert a_list.json()["redemptions"] == []
    assert a_catalog.json()["customer_id"] == attacker and a_catalog.json()["available_points"] == 0
    # The victim's idempotency key is scoped to the victim: the attacker gets a redemption of
    # their own (failed: no points), never a replay of the victim's.
    assert a_replay.json()["redemption_id"] != rid and "Idempotent-Replayed" not in a_replay.headers
    assert a_replay.json()["status"] in ("failed", "requested")
    assert b_after.json()["status"] == "fulfilled" and b_after.json()["code"] == mine.json()["code"]
    assert b_after.json()["shipment"]["tracking_number"] == "VICTIM-1"
    assert b_after.json()["delivery_address"]["line1"] == VICTIM_ADDRESS["line1"]
    rows = await redemptions(settings)
    assert [(r["customer_id"], str(r["redemption_id"])) for r in rows][0] == (victim, rid)
    assert {r["customer_id"] for r in rows} == {victim, attacker} and len(rows) == 2


VICTIM_ADDRESS = {"recipient": "Victim", "line1": "Secret street 7", "city": "Gdansk", "postal_code": "80-001",
                  "country": "PL"}


def admin_calls(redemption_id: str, customer_id: str) -> list[tuple[str, str, dict | None]]:
    """Every admin endpoint, with a well-formed request."""
    return [("POST", "/v1/admin/rewards", {"reward_id": "r-evil", "name": "Free", "cost_points": 1,
                                           "kind": "physical"}),
            ("GET", "/v1/admin/rewards", None), ("GET", "/v1/admin/rewards/r-1", None),
            ("PATCH", "/v1/admin/rewards/r-1", {"cost_points": 1}),
            ("POST", "/v1/admin/rewards/r-1/coupons", {"codes": ["STOLEN-1"]}),
            ("GET", "/v1/admin/fulfilments?state=awaiting_shipment", None),
            ("GET", f"/v1/admin/redemptions?customer_id={customer_id}", None),
            ("GET", f"/v1/admin/redemptions/{redemption_id}", None),
            ("POST", f"/v1/admin/redemptions/{redemption_id}/ship", {"carrier": "Evil", "actor": "attacker"}),
            ("POST", f"/v1/admin/redemptions/{redemption_id}/deliver", {"actor": "attacker"})]


AWAITING_ID = "00000000-0000-4000-8000-000000000001"
ADMIN_CALLS = admin_calls(AWAITING_ID, "c-1")
BAD_ADMIN_KEYS = {"missing": None, "empty": "", "wrong": "admin-test-kez", "prefix": "admin-test",
                  "padded": "admin-test-key ", "injection": "' OR '1'='1", "other_service": "ledger-admin-test-key"}


async def test_every_admin_endpoint_refuses_a_missing_or_wrong_admin_key_and_changes_nothing(base_env):
    settings = rewards_settings(base_env)
    async with running_rewards(settings) as (_, client):
        created = await client.post("/v1/admin/rewards", headers=ADMIN, json={
            "reward_id": "r-1", "name": "Voucher", "cost_points": 500, "kind": "coupon"})
        assert created.status_code == 201
        item = await client.post("/v1/admin/rewards", headers=ADMIN, json={
            "reward_id": "r-2", "name": "Mug", "cost_points": 500, "kind": "physical"})
        assert item.status_code == 201
        # a physical item awaiting shipment, as the saga leaves it (no ledger in this test)
        await fetch(settings.database_url, """
            INSERT INTO rewards.redemptions (redemption_id, customer_id, reward_id, idempotency_key, cost_points,
                kind, status, ledger_status, correlation_id, fulfilled_at, finished_at)
            VALUES ($1, 'c-1', 'r-2', 'k-1', 500, 'physical', 'fulfilled', 'redeemed', 'corr', now(), now())
            RETURNING redemption_id""", uuid.UUID(AWAITING_ID))
        before = await table_counts(settings.database_url, "rewards")
        responses = []
        for name, key in BAD_ADMIN_KEYS.items():
            headers = {} if key is None else {"X-Admin-Key": key}
            for method, path, body in ADMIN_CALLS:
                responses.append((name, path, await client.request(method, path, json=body, headers=headers)))
        after = await table_counts(settings.database_url, "rewards")
        reward = (await client.get("/v1/admin/rewards/r-1", headers=ADMIN)).json()
    for name, path, response in responses:
        assert response.status_code == 401, (name, path, response.text)
        assert response.json()["error"] == "invalid_admin_key"
    assert after == before
    assert reward["cost_points"] == 500 and reward["coupons_available"] == 0
    [awaiting] = await fetch(settings.database_url, "SELECT * FROM rewards.redemptions")
    assert awaiting["shipment_state"] is None and awaiting["carrier"] is None


async def test_refused_authentication_is_counted_per_reason_in_the_metrics(base_env):
    settings = rewards_settings(base_env)
    bad = bad_authorizations(unique("c-"), settings)
    async with running_rewards(settings) as (_, client):
        before = auth_refusals((await client.get("/metrics")).text)
        for authorization in (bad["expired_beyond_leeway"], bad["tampered_signature"], bad["tampered_payload"],
                              bad["alg_none"], bad["garbage"], bad["no_sub"], None):
            headers = {"Authorization": authorization} if authorization else {}
            assert (await client.get("/v1/rewards", headers=headers)).status_code == 401
        for key in ("admin-test-kez", None):
            headers = {"X-Admin-Key": key} if key else {}
            assert (await client.get("/v1/admin/rewards", headers=headers)).status_code == 401
        assert (await client.get("/v1/rewards", headers=bearer(unique("c-"), settings))).status_code == 200
        after = auth_refusals((await client.get("/metrics")).text)
    counted = {reason: after[reason] - before.get(reason, 0.0) for reason in after}
    expected = {"token_expired": 1, "token_signature_invalid": 2, "token_algorithm_not_accepted": 1,
                "token_malformed": 1, "token_missing_claim": 1, "missing_token": 1, "invalid_admin_key": 1,
                "missing_admin_key": 1}
    assert {reason: n for reason, n in counted.items() if n} == expected, counted


def auth_refusals(metrics_text: str) -> dict[str, float]:
    prefix = 'rewards_http_auth_refusals_total{reason="'
    return {line[len(prefix):].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics_text.splitlines() if line.startswith(prefix)}


async def test_injection_strings_in_free_text_are_stored_and_returned_verbatim(base_env):
    settings = rewards_settings(base_env)
    async with running_rewards(settings) as (_, client):
        created = []
        for i, s in enumerate(INJECTION_STRINGS):
            response = await client.post("/v1/admin/rewards", headers=ADMIN, json={
                "reward_id": f"r-{i}", "name": s, "description": s * 3, "cost_points": 10, "kind": "coupon"})
            assert response.status_code == 201, (s, response.text)
            created.append(response.json())
        bad_ids = [await client.post("/v1/admin/rewards", headers=ADMIN, json={
            "reward_id": s, "name": "x", "cost_points": 10, "kind": "physical"}) for s in INJECTION_STRINGS]
        codes = [s for s in INJECTION_STRINGS if s.strip() and not any(c.isspace() for c in s)]
        upload = await client.post("/v1/admin/rewards/r-0/coupons", headers=ADMIN, json={"codes": codes})
        spaced = await client.post("/v1/admin/rewards/r-0/coupons", headers=ADMIN, json={"codes": ["a b"]})
        subject = INJECTION_STRINGS[0]
        catalog = await client.get("/v1/rewards", headers=bearer(subject, settings))
    assert [c["name"] for c in created] == INJECTION_STRINGS
    assert [c["description"] for c in created] == [s * 3 for s in INJECTION_STRINGS]
    assert all(r.status_code == 422 for r in bad_ids), [r.text for r in bad_ids if r.status_code != 422]
    assert upload.status_code == 200 and upload.json()["added"] == len(codes)
    assert spaced.status_code == 422
    stored_codes = {r["code"] for r in await fetch(settings.database_url, "SELECT code FROM rewards.coupon_codes")}
    assert stored_codes == set(codes)
    assert catalog.status_code == 200 and catalog.json()["customer_id"] == subject
    assert {r["name"] for r in catalog.json()["rewards"]} == set(INJECTION_STRINGS)
    counts = await table_counts(settings.database_url, "rewards")
    assert counts["rewards"] == len(INJECTION_STRINGS) and counts["coupon_codes"] == len(codes)


async def test_numbers_beyond_the_catalogs_columns_are_refused_with_422(base_env):
    settings = rewards_settings(base_env)
    async with running_rewards(settings) as (_, client):
        created = await client.post("/v1/admin/rewards", headers=ADMIN, json={
            "reward_id": "r-1", "name": "x", "cost_points": 90411218715113516951404544, "kind": "physical"})
        ok = await client.post("/v1/admin/rewards", headers=ADMIN, json={
            "reward_id": "r-2", "name": "x", "cost_points": 10, "kind": "physical"})
        patched = await client.patch("/v1/admin/rewards/r-2", headers=ADMIN, json={"stock": 10**20})
        after = (await client.get("/v1/admin/rewards/r-2", headers=ADMIN)).json()
    assert created.status_code == 422, created.text
    assert ok.status_code == 201
    assert patched.status_code == 422, patched.text
    assert after["stock"] is None
    assert (await table_counts(settings.database_url, "rewards"))["rewards"] == 1


async def test_a_voucher_value_given_as_a_json_array_is_a_422(base_env):
    """pydantic reads a 3-element array as a Decimal (sign, digits, exponent) tuple; the
    catalog must refuse it rather than crash on it."""
    settings = rewards_settings(base_env)
    async with running_rewards(settings) as (_, client):
        response = await client.post("/v1/admin/rewards", headers=ADMIN, json={
            "reward_id": "r-1", "name": "x", "cost_points": 1, "kind": "voucher", "voucher_value": [1, 2, 3],
            "voucher_currency": "EUR"})
    assert response.status_code == 422, response.text
    assert (await table_counts(settings.database_url, "rewards"))["rewards"] == 0
