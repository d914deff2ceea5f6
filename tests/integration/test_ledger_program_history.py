"""A ledger that cannot read its program history (ledger.programs) at its first load does not
know which program is in force: the endpoints that need it answer 503 with a reason and
Retry-After (not a bare 500), /readyz says not ready, and all of it recovers as soon as the
topic can be read. Against the real broker and PostgreSQL: only the ledger's read of
ledger.programs goes to a broker address where nothing listens."""

import uuid

import pytest

from deploy.local.infra import free_port
from services.ledger import main as ledger_main
from services.ledger import metrics
from tests.support.kafka import unique
from tests.support.ledger import ADMIN, ledger_settings, running_ledger

pytestmark = pytest.mark.asyncio(loop_scope="session")

SIMULATED = {"purchase": {"currency": "PLN", "lines": [
    {"line_id": "1", "sku": "s", "category": "c", "quantity": 1, "unit_price": "12.50", "discount": "0"}]}}


def refusals() -> float:
    return metrics.HTTP_REFUSALS.labels("program_history_unavailable")._value.get()


async def test_without_its_program_history_the_ledger_answers_503_with_retry_after_until_it_can_read_it(
        base_env, monkeypatch):
    settings = ledger_settings(base_env)
    unreachable = settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    read_topic, broken = ledger_main.read_topic, {"on": True}

    async def programs_read(s, topic, **kw):
        # Only this read (the program history) goes to a broker that is not there.
        return await read_topic(unreachable if broken["on"] else s, topic, **kw)

    monkeypatch.setattr(ledger_main, "read_topic", programs_read)
    customer = unique("c-")

    async def requests(client, program=None):
        return {
            "GET /v1/admin/program": await client.get("/v1/admin/program", headers=ADMIN),
            "PUT /v1/admin/program": await client.put("/v1/admin/program", headers=ADMIN, json=program or {}),
            "POST /v1/rules/simulate": await client.post("/v1/rules/simulate", json=SIMULATED),
            "POST /v1/rules/simulate (tier)": await client.post("/v1/rules/simulate", json={**SIMULATED, "tier": "Gold"}),
            "POST /v1/admin/adjustments": await client.post("/v1/admin/adjustments", headers=ADMIN, json={
                "adjustment_id": str(uuid.uuid4()), "customer_id": customer, "amount_points": 30,
                "reason_code": "goodwill", "actor": "ops@test"}),
        }

    before = refusals()
    async with running_ledger(settings) as (app, client):
        assert not app.state.ledger.programs.loaded
        unready = await client.get("/readyz")
        refused = await requests(client)
        # What does not need the program still answers.
        balance = await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)
        transactions = await client.get(f"/v1/customers/{customer}/transactions", headers=ADMIN)

        broken["on"] = False
        current = await client.get("/v1/admin/program", headers=ADMIN)
        answered = await requests(client, current.json()["program"])
        ready_after = await client.get("/readyz")

    assert unready.status_code == 503 and unready.json()["checks"] == {
        "database": True, "broker": True, "program": False}, unready.json()
    for name, r in refused.items():
        assert r.status_code == 503, (name, r.status_code, r.text)
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) > 0, name
        detail = r.json()["detail"]
        assert detail["reason"] == "program_history_unavailable", name
        assert "ledger.programs" in detail["msg"] and "retry later" in detail["msg"], name
    assert refusals() - before == len(refused)
    assert (balance.status_code, transactions.status_code) == (404, 200) and transactions.json()["items"] == []

    assert current.status_code == 200 and current.json()["version"] == 1
    assert {name: r.status_code for name, r in answered.items()} == {
        "GET /v1/admin/program": 200, "PUT /v1/admin/program": 200, "POST /v1/rules/simulate": 200,
        "POST /v1/rules/simulate (tier)": 200, "POST /v1/admin/adjustments": 201}
    assert answered["PUT /v1/admin/program"].json()["version"] == 2
    assert answered["POST /v1/rules/simulate (tier)"].json()["tier"] == "Gold"
    assert ready_after.status_code == 200 and ready_after.json()["checks"]["program"] is True
    assert refusals() - before == len(refused)
