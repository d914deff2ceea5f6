"""An in-process churn service, its settings for tests, and what a test reads back."""

import asyncio
import contextlib
import time
from typing import Any

import asyncpg
import httpx

from services.churn.main import create_app
from services.churn.settings import ChurnSettings

ADMIN_KEY = "churn-admin-test-key"
ADMIN = {"X-Admin-Key": ADMIN_KEY}


def churn_settings(base_env: dict[str, str], **overrides: Any) -> ChurnSettings:
    """Schedules far apart: a test runs the evaluation and the fits itself, when it wants."""
    values: dict[str, Any] = {k.lower(): v for k, v in base_env.items()}
    values.update(admin_api_key=ADMIN_KEY, evaluation_interval_s=3600, fit_interval_s=3600,
                  rfm_refresh_interval_s=3600, metrics_interval_s=3600, refresh_at_start=False,
                  refresh_on_growth=False, consumer_commit_interval_ms=50)
    values.update(overrides)
    return ChurnSettings(**values)


@contextlib.asynccontextmanager
async def running_churn(settings: ChurnSettings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://churn",
                                     headers=ADMIN, timeout=120) as client:
            yield app, client


async def churn_rows(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "churn"})
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def wait_for_profile(client: httpx.AsyncClient, customer_id: str, check, *, timeout_s: float = 30) -> dict:
    """The profile once `check(profile)` holds (the consumer is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        r = await client.get(f"/v1/customers/{customer_id}/profile")
        if r.status_code == 200:
            last = r.json()
            if check(last):
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"the profile of {customer_id} never matched; last: {last}")
