"""A ledger that cannot read its program history (ledger.programs) at its first load does not
know which program is in force: the endpoints that need it answer 503 with a reason and
Retry-After (not a bare 500), /readyz says not ready, and all of it recovers as soon as the
topic can be read. Against the real broker and PostgreSQL: only the ledger's read of
ledger.programs goes to a broker address where nothing listens."""

import asyncio
import time
import uuid

import pytest

from deploy.local.infra import free_port
from services.ledger import main as ledger_main
from services.ledger import metrics
from services.ledger.versions import ProgramStore
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
    monkeypatch.setattr(ProgramStore, "RETRY_AFTER_S", 0.3)  # the start-up loader's retries, sped up
    customer = unique("c-")

    async def requests(client, program=None):
        return {
            "GET /v1/admin/program": await client.get("/v1/admin/program", headers=ADMIN),
            "PUT /v1/admin/program": await client.put("/v1/admin/program", headers=ADMIN, json=program or {}),
            "POST /v1/rules/simulate": await client.post("/v1/rules/simulate", headers=ADMIN, json=SIMULATED),
            "POST /v1/rules/simulate (tier)": await client.post("/v1/rules/simulate", headers=ADMIN, json={**SIMULATED, "tier": "Gold"}),
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
        for _ in range(100):  # ready again on its own: the start-up loader keeps trying
            ready_after = await client.get("/readyz")
            if ready_after.status_code == 200:
                break
            await asyncio.sleep(0.1)
        current = await client.get("/v1/admin/program", headers=ADMIN)
        answered = await requests(client, current.json()["program"])

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


async def test_while_the_history_is_being_read_the_requests_that_need_it_answer_503_at_once(base_env, monkeypatch):
    """A broker that does not answer holds the read up to its timeout: requests do not queue
    behind it holding database connections (the pool would run dry and stop the customer reads)."""
    settings = ledger_settings(base_env, database_pool_max=3)
    unreachable = settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    read_topic, reading, release = ledger_main.read_topic, asyncio.Event(), asyncio.Event()
    attempts = {"n": 0}

    async def programs_read(s, topic, **kw):
        attempts["n"] += 1
        if attempts["n"] == 1:  # at start: refused at once
            return await read_topic(unreachable, topic, **kw)
        reading.set()  # then a read that hangs until released
        await release.wait()
        return await read_topic(s, topic, **kw)

    monkeypatch.setattr(ledger_main, "read_topic", programs_read)
    monkeypatch.setattr(ProgramStore, "RETRY_AFTER_S", 0.2)
    customer = unique("c-")
    async with running_ledger(settings) as (app, client):
        await asyncio.wait_for(reading.wait(), timeout=10)  # the start-up loader is reading now
        started = time.monotonic()
        try:
            answers = await asyncio.wait_for(asyncio.gather(
                *(client.post("/v1/rules/simulate", headers=ADMIN, json=SIMULATED) for _ in range(8))), timeout=5)
            balance = await asyncio.wait_for(client.get(f"/v1/customers/{customer}/balance", headers=ADMIN), timeout=5)
        except asyncio.TimeoutError:
            answers = balance = None
        took = time.monotonic() - started
        release.set()
        for _ in range(100):
            if app.state.ledger.programs.loaded:
                break
            await asyncio.sleep(0.1)
        after = await client.post("/v1/rules/simulate", headers=ADMIN, json=SIMULATED)
    assert answers is not None, f"the requests waited for the read ({took:.1f} s)"
    assert [r.status_code for r in answers] == [503] * 8
    assert balance.status_code == 404  # a customer read still had a connection
    assert after.status_code == 200
