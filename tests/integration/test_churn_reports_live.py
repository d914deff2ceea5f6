"""The reports of the running churn service (its own consumers, evaluation and schedules;
the real broker and PostgreSQL): a generated two-year history is published as its producers
write it (purchases.recorded, engagement.events, points.events, rewards.events), the service
folds it, evaluates the base, and then
- each monthly indicator equals the independent computation from the raw history;
- the matrix's quadrants add up to the customers, each profile carries its quadrant;
- every lost customer's departure is recorded once and compared with the retained;
- /dashboard, served by uvicorn and opened in Debian's headless chromium, shows the API's
  numbers; a screenshot goes to the test's folder (and docs/ with UPDATE_DOCS_SCREENSHOT=1)."""

import asyncio
import os
import shutil
import time
from datetime import UTC, date, datetime
from datetime import time as dtime
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.async_api import async_playwright
from prometheus_client import REGISTRY

from deploy.local.infra import free_port
from services.churn import reports, reports_metrics
from services.churn.reports_settings import ReportsSettings
from shared.events import utcnow
from shared.topics import (
    CHURN_ALERTS,
    ENGAGEMENT_EVENTS,
    POINTS_EVENTS,
    PURCHASES_RECORDED,
    REWARDS_EVENTS,
)
from tests.support.churn import ADMIN, churn_rows, churn_settings, running_churn
from tests.support.churn_history import (
    CATEGORIES,
    expected_month,
    generate,
    month_bounds,
)
from tests.support.churn_inputs import purchase
from tests.support.kafka import consume, produce

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS_SCREENSHOT = Path(__file__).parents[2] / "docs" / "dashboard.png"
WINDOW = ReportsSettings().active_window_days


async def wait_until(check, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.2)


async def serve(app) -> tuple[uvicorn.Server, asyncio.Task, str]:
    """The app (already started by its lifespan) on a real port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    return server, task, f"http://127.0.0.1:{port}"


async def test_the_running_churn_service_reports_its_consumed_history(base_env, kafka_bootstrap, database_url,
                                                                     tmp_path):
    now = utcnow()
    history = generate(customers=300, now=now)
    sales = [purchase(c.customer_id, datetime.combine(day, dtime(11, 30), tzinfo=UTC), format(amount, "f"),
                      category=category)
             for c in history.customers.values() for day, category, amount in c.lines]
    settings = churn_settings(base_env, category_margin_rates={k: str(v) for k, v in CATEGORIES.items()})
    async with running_churn(settings) as (app, churn):
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), sales, key_field="customer_id")
        by_producer = {"engagement": ENGAGEMENT_EVENTS, "ledger": POINTS_EVENTS, "rewards": REWARDS_EVENTS}
        for producer, topic in by_producer.items():
            await produce(kafka_bootstrap, settings.topic(topic),
                          [e for e in history.answers + history.events if e["producer"] == producer],
                          key_field="customer_id")

        async def folded() -> bool:
            applied = (await churn_rows(database_url, "SELECT coalesce(sum(purchases), 0) AS n FROM customer_state"))
            answers = await churn_rows(database_url, "SELECT count(*) AS n FROM survey_answers")
            signals = await churn_rows(database_url, "SELECT count(*) AS n FROM relationship_signals")
            return (applied[0]["n"] == len(sales) and answers[0]["n"] == len(history.answers)
                    and signals[0]["n"] == len({e["customer_id"] for e in history.events}))

        await wait_until(folded, "every input folded by the churn consumers")
        runtime = app.state.runtime
        # quadrants first: the evaluation's alerts then carry each customer's quadrant
        await reports.refresh_quadrants(runtime.pool, ReportsSettings(), now=utcnow())
        stored = {r["customer_id"]: r["quadrant"] for r in await churn_rows(
            database_url, "SELECT customer_id, quadrant FROM customer_quadrants")}
        for path in ("/v1/admin/rfm/refresh", "/v1/admin/evaluations"):  # the refresh rescores and evaluates
            response = await churn.post(path)
            assert response.status_code < 300, (path, response.text)
        alerts = [a for a in await consume(kafka_bootstrap, settings.topic(CHURN_ALERTS), idle_s=2, timeout_s=30,
                                           distinct="event_id") if a["type"] in ("CustomerAtRisk", "CustomerLost")]
        wrong = [(a["customer_id"], a["payload"]["quadrant"], stored.get(a["customer_id"])) for a in alerts
                 if a["payload"]["quadrant"] != stored[a["customer_id"]]]
        assert alerts and not wrong, wrong[:5]

        # the indicators, month by month, against the raw history
        body = (await churn.get("/v1/indicators", params={"from": "2025-01", "to": "2026-11"})).json()
        for row in body["months"]:
            first, last = month_bounds(*map(int, row["period"].split("-")))
            want = expected_month(history, WINDOW, first, last)
            got = {k: row[k] for k in ("customers_at_start", "customers_at_end", "new_customers", "lost_customers",
                                       "retention_rate", "churn_rate", "loyalty_index")}
            got.update({k: row["satisfaction"][k] for k in ("csat", "csat_answers", "nps", "nps_answers")})
            assert got == want, row["period"]

        # the matrix: quadrants add up; after the refresh every profile names its quadrant
        matrix = (await churn.get("/v1/matrix")).json()
        assert sum(q["customers"] for q in matrix["quadrants"]) == matrix["customers"] == len(history.customers)
        some = sorted(history.customers)[::37]
        quadrants = {(await churn.get(f"/v1/customers/{cid}/profile")).json()["quadrant"] for cid in some}
        assert quadrants <= {"true_friend", "butterfly", "barnacle", "stranger"} and len(quadrants) >= 2

        # departures: one per lost customer, compared with the retained
        lost = (await churn_rows(database_url, "SELECT count(*) AS n FROM risk_states WHERE state = 'lost'"))[0]["n"]
        assert lost > 0 and await reports.record_departures(runtime.pool, ReportsSettings(), now=utcnow()) == lost
        departures = (await churn.get("/v1/departures")).json()
        assert departures["lost_customers"] == lost and departures["retained_customers"] > 0
        quadrant_rows = [f for f in departures["factors"] if f["factor"].startswith("quadrant_")]
        assert sum(f["lost_count"] for f in quadrant_rows) == lost  # each lost customer had a quadrant

        # the gauges: aggregates of the same figures, no customer id in any label
        await reports_metrics.sample(runtime.pool, ReportsSettings(), now=utcnow())
        for q in matrix["quadrants"]:
            assert REGISTRY.get_sample_value("churn_relationship_quadrant_customers",
                                             {"quadrant": q["quadrant"]}) == q["customers"]
        rolling = (await churn.get("/v1/indicators")).json()["rolling"]
        assert REGISTRY.get_sample_value("churn_relationship_indicator", {
            "indicator": "churn_rate", "window": "rolling"}) == pytest.approx(rolling["churn_rate"], abs=1e-6)
        assert REGISTRY.get_sample_value("churn_relationship_departures_recorded") == lost
        exposition = (await churn.get("/metrics")).text
        assert not any(cid in exposition for cid in history.customers)

        # the page, in a real browser, on a real port
        server, task, url = await serve(app)
        try:
            async with httpx.AsyncClient(base_url=url, headers=ADMIN) as api:
                matrix = (await api.get("/v1/matrix")).json()
                to_month = date(now.year, now.month, 1)
                months = (await api.get("/v1/indicators", params={
                    "from": f"{to_month.year - 2}-{to_month.month:02d}", "to": f"{to_month:%Y-%m}"})).json()
                at_risk = [i for i in (await api.get("/v1/at-risk", params={"limit": 500})).json()["items"]
                           if i["state"] == "at_risk"]
            await check_dashboard_in_chromium(url, settings.admin_api_key.get_secret_value(), matrix, months,
                                              len(at_risk), len(history.customers), tmp_path)
        finally:
            server.should_exit = True
            await task


async def check_dashboard_in_chromium(url: str, key: str, matrix: dict, months: dict, at_risk: int,
                                      customers: int, tmp_path: Path) -> None:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1360, "height": 900})
            await page.goto(f"{url}/dashboard")
            assert page.url.endswith("/dashboard/login")
            await page.fill("#key", key)
            await page.click("button[type=submit]")
            await page.wait_for_selector("svg.matrix")
            for selector, count in (("svg.line-chart", 3), ("svg.heat-map.cohorts", 1), ("svg.matrix", 1),
                                    ("svg.bar-chart", 1), ("#segments svg.heat-map", 1)):
                assert await page.locator(selector).count() == count, selector
            assert await page.locator("svg .empty").count() == 0  # every chart has data
            shown = {await q.get_attribute("data-quadrant"): int(await q.get_attribute("data-customers"))
                     for q in await page.locator("svg.matrix rect.quadrant").all()}
            assert shown == {q["quadrant"]: q["customers"] for q in matrix["quadrants"]}
            assert sum(shown.values()) == customers
            points = {await c.get_attribute("data-x"): float(await c.get_attribute("data-value"))
                      for c in await page.locator("circle.point[data-series='retention']").all()}
            assert points == {m["period"]: round(m["retention_rate"] * 100, 1) for m in months["months"][1:]
                              if m["retention_rate"] is not None}
            assert len(points) >= 20
            card = (await page.locator("[data-indicator='churn'] .value").inner_text()).replace("\u00a0", " ")
            assert card == f"{months['rolling']['churn_rate'] * 100:.1f} %"
            rfm = sum([int(await c.get_attribute("data-value"))
                       for c in await page.locator("#segments svg.heat-map rect.cell").all()])
            assert rfm == customers  # every scored customer is in one RFM cell
            rows = page.locator("#at-risk-table tbody tr")
            assert await rows.count() == min(25, at_risk) and at_risk > 0
            values = [float(v) for v in await rows.locator("td:nth-child(2)").all_inner_texts()]
            assert values == sorted(values, reverse=True)
            shot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
                DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
                shutil.copyfile(shot, DOCS_SCREENSHOT)
        finally:
            await browser.close()
