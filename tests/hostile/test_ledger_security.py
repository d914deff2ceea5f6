"""Security cases at the ledger's HTTP API: the admin key on every admin endpoint, and
injection strings in every free-text field of an adjustment and in customer ids."""

import uuid
from urllib.parse import quote

import pytest

from services.ledger.main import create_app
from tests.support.hostile import INJECTION_STRINGS, fetch, serving, table_counts
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
        mallory = await client.get("/v1/customers/mallory/balance")
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
        balances = {s: await client.get(f"/v1/customers/{quote(s, safe='')}/balance") for s in readable}
        history = {s: await client.get(f"/v1/customers/{quote(s, safe='')}/transactions") for s in readable}
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
        history = await client.get("/v1/customers/c-1/transactions", params={"cursor": "70067683306972608740032"})
        adjustment = await client.post("/v1/admin/adjustments", headers=ADMIN, json={
            "customer_id": "c-1", "amount_points": 325844252335367936, "reason_code": "goodwill", "actor": "a"})
    assert history.status_code == 422, history.text
    assert adjustment.status_code == 422, adjustment.text
    assert (await table_counts(settings.database_url, "ledger"))["adjustments"] == 0
