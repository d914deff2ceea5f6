"""GET /dashboard's door and empty state: without a session it sends the visitor to the login
form, a wrong key is refused, the session cookie is HttpOnly and opens the JSON reports too;
without data every chart says so. (The page with data, in a real browser, is in
test_churn_reports_live.py.)"""

import asyncio
from pathlib import Path

import httpx
import uvicorn

from deploy.local.infra import free_port
from tests.support.churn_reports import KEY, build

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
