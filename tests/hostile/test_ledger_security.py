"""Security cases at the ledger's HTTP API: the admin key on every admin endpoint, who may
read a customer's points, and injection strings in every free-text field of an adjustment
and in customer ids."""

import base64
import json
import time
import uuid
from urllib.parse import quote

import pytest

from services.ledger.main import create_app
from shared.auth import mint_token
from tests.support.hostile import INJECTION_STRINGS, fetch, metric_total, serving, table_counts
from tests.support.ledger import ADMIN, ledger_settings

pytestmark = pytest.mark.asyncio(loop_scope="session")

BAD_ADMIN_KEYS = {"missing": None, "empty": "", "wrong": "ledger-admin-test-kez", "prefix": "ledger-admin",
                  "padded": " ledger-admin-test-key", "injection": "' OR '1'='1", "other_service": "admin-test-key"}


async def test_every_admin_endpoint_refuses_a_missing_or_wrong_admin_key_and_changes_nothing(base_env):
    settings = ledger_settings(base_env)
    async with serving(create_app(settings), "http://ledger") as client:
        program = (await client.get("/v1/admin/program", headers=ADMIN)).json()
        before = await table_counts(settings.database_url, "ledger")
        calls = [("GET", "/v1/admin/program", None),
                 ("PUT", "/v1/admin/program", {**program["program"], "daily_cap_points": 1}),
                 ("POST", "/v1/admin/adjustments", {"customer_id": "mallory", "amount_points": 1_000_000,
                                                    "reason_code": "goodwill", "actor": "mallory"})]
        responses = []
        for name, key in BAD_ADMIN_KEYS.items():
            headers = {} if key is None else {"X-Admin-Key": key}
            for method, path, body in calls:
                responses.append((name, path, await client.request(method, path, json=body, headers=headers)))
        after = await table_counts(settings.database_url, "ledger")
        program_after = (await client.get("/v1/admin/program", headers=ADMIN)).json()
        mallory = await client.get("/v1/customers/mallory/balance", headers=ADMIN)
    for name, path, response in responses:
        assert response.status_code == 401, (name, path, response.text)
        assert "X-Admin-Key" in response.json()["detail"]
    assert after == before
    assert program_after["version"] == program["version"]
    assert mallory.status_code == 404


async def test_injection_strings_in_adjustments_and_customer_ids_are_stored_verbatim(base_env):
    settings = ledger_settings(base_env)
    readable = [s for s in INJECTION_STRINGS if "/" not in s]  # "/" cannot be named in a URL path
    async with serving(create_app(settings), "http://ledger") as client:
        made = []
        for s in INJECTION_STRINGS:
            made.append(await client.post("/v1/admin/adjustments", headers=ADMIN, json={
                "adjustment_id": str(uuid.uuid4()), "customer_id": s, "amount_points": 7, "reason_code": "other",
                "actor": s, "note": s * 2}))
        balances = {s: await client.get(f"/v1/customers/{quote(s, safe='')}/balance", headers=ADMIN) for s in readable}
        history = {s: await client.get(f"/v1/customers/{quote(s, safe='')}/transactions", headers=ADMIN) for s in readable}
    assert all(r.status_code == 201 for r in made), [r.text for r in made if r.status_code != 201]
    assert [(r.json()["customer_id"], r.json()["actor"], r.json()["note"]) for r in made] == [
        (s, s, s * 2) for s in INJECTION_STRINGS]
    for s in readable:
        assert balances[s].json()["customer_id"] == s and balances[s].json()["available_points"] == 7
        [item] = history[s].json()["items"]
        assert item["actor"] == s and item["amount_points"] == 7
    stored = await fetch(settings.database_url, "SELECT customer_id, actor, note FROM ledger.adjustments")
    assert sorted((r["customer_id"], r["actor"], r["note"]) for r in stored) == sorted(
        (s, s, s * 2) for s in INJECTION_STRINGS)
    counts = await table_counts(settings.database_url, "ledger")
    assert counts["adjustments"] == len(INJECTION_STRINGS) and counts["customers"] == len(INJECTION_STRINGS)


async def test_numbers_beyond_the_ledgers_columns_are_refused_with_422(base_env):
    settings = ledger_settings(base_env)
    async with serving(create_app(settings), "http://ledger") as client:
        history = await client.get("/v1/customers/c-1/transactions", headers=ADMIN, params={"cursor": "70067683306972608740032"})
        adjustment = await client.post("/v1/admin/adjustments", headers=ADMIN, json={
            "customer_id": "c-1", "amount_points": 325844252335367936, "reason_code": "goodwill", "actor": "a"})
    assert history.status_code == 422, history.text
    assert adjustment.status_code == 422, adjustment.text
    assert (await table_counts(settings.database_url, "ledger"))["adjustments"] == 0


JWT_SECRET = "ledger-test-jwt-secret-0123456789abcdef"


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_a_customer_reads_only_their_own_points_and_every_refusal_is_counted(base_env):
    """The customer reads take the customer's own bearer token (the rewards API's tokens) or
    the back office's admin key; nothing else, and never another customer's points."""
    settings = ledger_settings(base_env, jwt_secret=JWT_SECRET)
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"

    def token(subject: str, **kw) -> str:
        return mint_token(subject, key=kw.pop("key", JWT_SECRET), issuer=kw.pop("issuer", settings.jwt_issuer),
                          audience=kw.pop("audience", settings.jwt_audience), **kw)

    good = token(alice)
    header, _, signature = good.split(".")
    now = int(time.time())
    claims = {"sub": alice, "iss": settings.jwt_issuer, "aud": settings.jwt_audience, "iat": now, "exp": now + 600}
    refused_tokens = {
        "expired": token(alice, now_s=now - 7200, ttl_s=60),
        "tampered": f"{header}.{_b64(claims | {'sub': bob})}.{signature}",
        "alg_none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
        "wrong_audience": token(alice, audience="someone-else"),
        "wrong_key": token(alice, key="another-secret-" + "x" * 32),
        "garbage": "not.a.token",
    }
    async with serving(create_app(settings), "http://ledger") as client:
        for customer in (alice, bob):
            credited = await client.post("/v1/admin/adjustments", headers=ADMIN, json={
                "customer_id": customer, "amount_points": 25, "reason_code": "goodwill", "actor": "test"})
            assert credited.status_code == 201, credited.text
        before = {r: await metric_total(client, "ledger_http_refusals_total", reason=r)
                  for r in ("missing_credentials", "invalid_token", "other_customer", "invalid_admin_key")}
        answers = {}
        for path in ("balance", "transactions"):
            answers[("own", path)] = await client.get(f"/v1/customers/{alice}/{path}",
                                                      headers={"Authorization": f"Bearer {good}"})
            answers[("admin", path)] = await client.get(f"/v1/customers/{bob}/{path}", headers=ADMIN)
            answers[("other", path)] = await client.get(f"/v1/customers/{bob}/{path}",
                                                        headers={"Authorization": f"Bearer {good}"})
            answers[("none", path)] = await client.get(f"/v1/customers/{alice}/{path}")
            answers[("bad_admin", path)] = await client.get(f"/v1/customers/{alice}/{path}",
                                                            headers={"X-Admin-Key": "ledger-admin-test-kez"})
            for name, bad in refused_tokens.items():
                answers[(name, path)] = await client.get(f"/v1/customers/{alice}/{path}",
                                                         headers={"Authorization": f"Bearer {bad}"})
        after = {r: await metric_total(client, "ledger_http_refusals_total", reason=r) for r in before}
    for path in ("balance", "transactions"):
        assert answers[("own", path)].status_code == 200 and answers[("admin", path)].status_code == 200
        assert answers[("other", path)].status_code == 403, answers[("other", path)].text
        assert bob not in answers[("other", path)].text
        for name in ("none", "bad_admin", *refused_tokens):
            assert answers[(name, path)].status_code == 401, (name, path, answers[(name, path)].text)
            assert "available_points" not in answers[(name, path)].text
    assert answers[("own", "balance")].json()["available_points"] == 25
    assert [i["amount_points"] for i in answers[("own", "transactions")].json()["items"]] == [25]
    assert after["missing_credentials"] - before["missing_credentials"] == 2
    assert after["invalid_admin_key"] - before["invalid_admin_key"] == 2
    assert after["other_customer"] - before["other_customer"] == 2
    assert after["invalid_token"] - before["invalid_token"] == 2 * len(refused_tokens)


async def test_without_a_token_key_only_the_admin_key_reads(base_env):
    settings = ledger_settings(base_env)
    assert not settings.jwt_configured()
    async with serving(create_app(settings), "http://ledger") as client:
        token = mint_token("c-1", key=JWT_SECRET, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
        refused = await client.get("/v1/customers/c-1/balance", headers={"Authorization": f"Bearer {token}"})
        admin = await client.get("/v1/customers/c-1/balance", headers=ADMIN)
    assert refused.status_code == 401 and "not accepted" in refused.json()["detail"]
    assert admin.status_code == 404  # no account yet: the admin key got through


async def test_simulate_needs_the_admin_key_or_the_customers_own_token(base_env):
    """The simulation reveals a customer's tier, first-purchase state and earnings of the day:
    nobody else may ask for it."""
    settings = ledger_settings(base_env, jwt_secret=JWT_SECRET)
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"

    def bearer(subject: str) -> dict[str, str]:
        token = mint_token(subject, key=JWT_SECRET, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
        return {"Authorization": f"Bearer {token}"}

    purchase = {"currency": "PLN", "lines": [{"line_id": "1", "sku": "x", "category": "grocery", "quantity": 1,
                                              "unit_price": "10.00", "discount": "0"}]}
    async with serving(create_app(settings), "http://ledger") as client:
        answers = {
            "nobody": await client.post("/v1/rules/simulate", json={"purchase": purchase, "customer_id": alice}),
            "wrong key": await client.post("/v1/rules/simulate", headers={"X-Admin-Key": "nope"},
                                           json={"purchase": purchase, "customer_id": alice}),
            "bob for alice": await client.post("/v1/rules/simulate", headers=bearer(bob),
                                               json={"purchase": purchase, "customer_id": alice}),
            "alice for alice": await client.post("/v1/rules/simulate", headers=bearer(alice),
                                                 json={"purchase": purchase, "customer_id": alice}),
            "alice, no customer": await client.post("/v1/rules/simulate", headers=bearer(alice),
                                                    json={"purchase": purchase}),
            "admin": await client.post("/v1/rules/simulate", headers=ADMIN,
                                       json={"purchase": purchase, "customer_id": alice}),
        }
    assert {k: r.status_code for k, r in answers.items()} == {
        "nobody": 401, "wrong key": 401, "bob for alice": 403, "alice for alice": 200, "alice, no customer": 200,
        "admin": 200}
