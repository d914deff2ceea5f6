"""GET /dashboard on a running churn app (uvicorn on a free port, the real broker and
PostgreSQL, the generated two-year history loaded), opened in Debian's headless chromium
driven by playwright: sign in, the charts are there with the API's numbers, a screenshot in
the test's folder (and docs/dashboard.png with UPDATE_DOCS_SCREENSHOT=1). Without data the
page says so; without a session it sends the visitor to the login form."""

import asyncio
import os
import shutil
from pathlib import Path

import asyncpg
import httpx
import uvicorn
from playwright.async_api import async_playwright

from deploy.local.infra import free_port
from services.churn import reports
from tests.support.churn_reports import HISTORY, KEY, NOW, SETTINGS, build, load_history

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS_SCREENSHOT = Path(__file__).parents[2] / "docs" / "dashboard.png"


async def serve(app) -> tuple[uvicorn.Server, asyncio.Task, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    return server, task, f"http://127.0.0.1:{port}"


async def test_the_dashboard_without_a_session_asks_for_the_key_and_without_data_says_so(base_env):
    runtime, app = build(base_env)
    await runtime.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://churn") as client:
            assert (await client.get("/dashboard")).headers["location"] == "/dashboard/login"
            wrong = await client.post("/dashboard/login", data={"key": "nope"})
            assert wrong.status_code == 401 and "not the admin key" in wrong.text
            assert (await client.get("/v1/matrix")).status_code == 401
            signed_in = await client.post("/dashboard/login", data={"key": KEY})
            assert signed_in.status_code == 303
            cookie = signed_in.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie
            page = await client.get("/dashboard")  # the client keeps the session cookie
            assert page.status_code == 200
            assert (await client.get("/v1/matrix")).status_code == 200  # the session also opens the API
        for empty in ("No data yet", "No survey answers yet", "No customers yet", "No purchases yet",
                      "No departures recorded yet", "No customer is at risk right now"):
            assert empty in page.text, empty
    finally:
        await runtime.stop()


async def test_the_dashboard_shows_the_api_numbers_in_a_real_browser(base_env, kafka_bootstrap, topic_prefix,
                                                                     database_url, tmp_path):
    runtime, app = build(base_env)
    await runtime.start()
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "churn"})
    server = task = None
    try:
        await load_history(HISTORY, base_env, kafka_bootstrap, topic_prefix, conn)
        await reports.refresh_quadrants(runtime.pool, SETTINGS, now=NOW)
        assert await reports.record_departures(runtime.pool, SETTINGS, now=NOW) > 0
        server, task, url = await serve(app)
        async with httpx.AsyncClient(base_url=url, headers={"X-Admin-Key": KEY}) as api:
            matrix = (await api.get("/v1/matrix")).json()
            months = (await api.get("/v1/indicators", params={"from": "2024-12", "to": "2026-12"})).json()
            departures = (await api.get("/v1/departures")).json()
        at_risk = await conn.fetchval("SELECT count(*) FROM risk_states WHERE state = 'at_risk'")
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1360, "height": 900})
                await page.goto(f"{url}/dashboard")
                assert page.url.endswith("/dashboard/login")
                await page.fill("#key", KEY)
                await page.click("button[type=submit]")
                await page.wait_for_selector("svg.matrix")
                assert page.url.endswith("/dashboard")
                # every chart is there
                for selector, count in (("svg.line-chart", 3), ("svg.heat-map.cohorts", 1), ("svg.matrix", 1),
                                        ("svg.bar-chart", 1), ("#segments svg.heat-map", 1)):
                    assert await page.locator(selector).count() == count, selector
                # the matrix shows the API's quadrant counts
                shown = {await q.get_attribute("data-quadrant"): int(await q.get_attribute("data-customers"))
                         for q in await page.locator("svg.matrix rect.quadrant").all()}
                assert shown == {q["quadrant"]: q["customers"] for q in matrix["quadrants"]}
                assert sum(shown.values()) == len(HISTORY.customers)
                # the retention line has the API's monthly rates, in percent
                points = {await c.get_attribute("data-x"): float(await c.get_attribute("data-value"))
                          for c in await page.locator("circle.point[data-series='retention']").all()}
                want = {m["period"]: round(m["retention_rate"] * 100, 1) for m in months["months"][1:]
                        if m["retention_rate"] is not None}
                assert points == want and len(points) >= 20
                card = await page.locator("[data-indicator='churn'] .value").inner_text()
                rolling = months["rolling"]["churn_rate"]
                assert card.replace("\u00a0", " ") == f"{rolling * 100:.1f} %"
                # departure bars: the lost share of each factor seen
                bars = {await b.get_attribute("data-label"): float(await b.get_attribute("data-value"))
                        for b in await page.locator("rect.bar[data-series='lost']").all()}
                assert len(bars) == sum(1 for f in departures["factors"] if f["lost_count"] or f["retained_count"])
                # the at-risk table: ranked by value, with reasons
                rows = page.locator("#at-risk-table tbody tr")
                assert await rows.count() == min(25, at_risk)
                values = [float(v) for v in await rows.locator("td:nth-child(2)").all_inner_texts()]
                assert values == sorted(values, reverse=True)
                assert "days since the last purchase" in await rows.first.inner_text()
                shot = tmp_path / "dashboard.png"
                await page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 20_000
                if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
                    DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
                    shutil.copyfile(shot, DOCS_SCREENSHOT)
            finally:
                await browser.close()
    finally:
        if server is not None:
            server.should_exit = True
            await task
        await conn.close()
        await runtime.stop()
