"""A base imported with its past purchases (history) gives sensible rhythms, segments and
model fits straight after the import, without anyone asking; the import itself is never
news (no SegmentChanged or CustomerRecovered from it), while customers overdue now are
alerted by the evaluation that follows, like any other."""

import asyncio
import time

import pytest

from shared.topics import CHURN_ALERTS, PURCHASES_RECORDED
from tests.support.churn import churn_rows, churn_settings, running_churn
from tests.support.churn_inputs import synthetic_base
from tests.support.kafka import consume, produce

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_an_imported_base_is_segmented_fitted_and_evaluated_straight_after_the_import(
        base_env, kafka_bootstrap, database_url):
    settings = churn_settings(base_env, refresh_on_growth=True, cache_refresh_interval_s=0.5)
    events = synthetic_base("h-", 300)
    async with running_churn(settings) as (_, churn):
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), events, key_field="customer_id")
        deadline = time.monotonic() + 90
        while True:
            fits = (await churn.get("/v1/admin/models")).json()["items"]
            applied = await churn_rows(database_url, "SELECT sum(purchases) AS n FROM customer_state")
            # the base rescored (an evaluation) after the latest fit, once every event is in
            rescored = fits and await churn_rows(
                database_url, "SELECT 1 FROM evaluations WHERE finished_at IS NOT NULL AND started_at > $1",
                (await churn_rows(database_url, "SELECT max(fitted_at) AS t FROM model_fits"))[0]["t"])
            if rescored and applied[0]["n"] == len(events):
                break
            assert time.monotonic() < deadline, f"no refresh after the import: {fits}"
            await asyncio.sleep(0.2)
        fit = fits[0]
        segments = (await churn.get("/v1/segments")).json()["segments"]
        profiles = [(await churn.get(f"/v1/customers/h-{n:05d}/profile")).json() for n in range(0, 300, 7)]
        alerts = await consume(kafka_bootstrap, settings.topic(CHURN_ALERTS), idle_s=2, timeout_s=30,
                               distinct="event_id")
    assert fit["trigger"] == "growth" and fit["frequency_converged"] is True and fit["error"] is None
    assert fit["frequency_params"]["r"] > 0 and fit["customers"] > 200 and fit["spend_customers"] > 150
    buyers = len({e["customer_id"] for e in events})
    assert fit["customers"] == buyers
    assert sum(s["customers"] for s in segments) == buyers and "none" not in {s["segment"] for s in segments}
    assert len({s["segment"] for s in segments}) >= 5
    for p in profiles:
        if p.get("error") == "customer_not_found":  # stopped buying before they started: no purchase
            continue
        assert p["segment"] is not None and p["fit_version"] == fit["version"]
        assert 0 <= p["p_alive"] <= 1 and p["expected_purchases"] >= 0 and p["ltv"] is not None
        if p["purchase_days"] >= 4:
            assert p["rhythm"]["source"] == "own" and p["rhythm"]["median_interval_days"] >= 2
    kinds = {a["type"] for a in alerts}
    assert "CustomerRecovered" not in kinds
    # SegmentChanged only from the evaluation (as of now), never from the imported events
    assert all(a["correlation_id"].startswith("churn-evaluation-") for a in alerts)
    overdue = [a for a in alerts if a["type"] in ("CustomerAtRisk", "CustomerLost")]
    assert overdue and len({a["customer_id"] for a in overdue}) == len(overdue)
