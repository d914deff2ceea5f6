"""Operations of the churn service against the real broker and PostgreSQL: one instance
evaluates at a time (the advisory lock), /metrics holds aggregates only (never a customer id),
the OpenAPI and AsyncAPI documents describe the API and the topics."""

import asyncio
import re
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from services.churn.base import EVALUATION_LOCK
from shared.topics import PURCHASES_RECORDED
from tests.support.churn import churn_settings, running_churn, wait_for_profile
from tests.support.churn_inputs import purchase
from tests.support.kafka import produce, unique

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_an_evaluation_waits_for_no_one_while_another_instance_holds_the_lock(base_env, database_url):
    async with running_churn(churn_settings(base_env)) as (_, churn):
        other = await asyncpg.connect(database_url)
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", EVALUATION_LOCK)
            busy = await churn.post("/v1/admin/evaluations")
            await other.execute("SELECT pg_advisory_unlock($1)", EVALUATION_LOCK)
        finally:
            await other.close()
        done = await churn.post("/v1/admin/evaluations")
    assert busy.status_code == 409 and busy.json()["error"] == "busy"
    assert done.status_code == 201 and done.json()["resumed"] is False


async def test_metrics_are_aggregates_without_customer_ids(base_env, kafka_bootstrap):
    settings = churn_settings(base_env, metrics_interval_s=0.2)
    customers = [unique("m-") for _ in range(6)]
    now = datetime.now(timezone.utc)
    events = [purchase(c, now - timedelta(days=d + 10 * k), "25.00") for n, c in enumerate(customers)
              for d in (n * 5,) for k in range(3)]
    async with running_churn(settings) as (app, churn):
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), events, key_field="customer_id")
        for c in customers:
            await wait_for_profile(churn, c, lambda p: p["purchases"] == 3)
        assert (await churn.post("/v1/admin/rfm/refresh")).status_code == 201
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            text = (await churn.get("/metrics")).text
            scored = [line for line in text.splitlines() if line.startswith("churn_customers{")
                      and 'segment="none"' not in line and not line.endswith(" 0.0")]
            if scored or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        openapi = (await churn.get("/openapi.json")).json()
        asyncapi = (await churn.get("/asyncapi.json")).text
    assert sum(float(line.rsplit(" ", 1)[1]) for line in scored) == 6
    assert "churn_events_applied_total 18.0" in text and "churn_customers_by_risk_state" in text
    labels = " ".join(re.findall(r"\{[^}]*\}", text))
    assert not any(c in labels for c in customers)
    assert {"/v1/customers/{customer_id}/profile", "/v1/segments", "/v1/at-risk", "/v1/admin/models/fit",
            "/v1/admin/models"} <= set(openapi["paths"])
    assert "churn.alerts" in asyncapi and "CustomerAtRisk" in asyncapi and "purchases.recorded" in asyncapi
