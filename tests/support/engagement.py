"""Helpers for engagement tests: the service in this process behind a real HTTP port (so a
real browser can open its pages), a clock the test moves, the mail catcher, and events."""

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn

from deploy.local.infra import free_port
from deploy.local.mailcatcher import MailCatcher
from services.engagement.main import create_app
from services.engagement.settings import EngagementSettings

ADMIN_KEY = "engagement-admin-test-key"
BACKEND_KEY = "engagement-backend-test-key"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


class TestClock:
    """`now` as the test says; moved forward by hand (never a real sleep for a delay)."""

    __test__ = False

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def engagement_settings(base_env: dict[str, str], *, smtp_port: int, http_port: int, **overrides: Any):
    values: dict[str, Any] = {k.lower(): v for k, v in base_env.items()}
    values.update(admin_api_key=ADMIN_KEY, backend_api_key=BACKEND_KEY, smtp_port=smtp_port, http_port=http_port,
                  public_base_url=f"http://127.0.0.1:{http_port}", dispatch_interval_s=0.1, metrics_interval_s=3600,
                  link_secret="test-link-secret")
    values.update(overrides)
    return EngagementSettings(**values)


@contextlib.asynccontextmanager
async def served(app, port: int):
    """An ASGI app (lifespan included) served by uvicorn on a real port, and a client for it."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                if (await client.get("/readyz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if task.done() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError("the app did not become ready")
            await asyncio.sleep(0.1)
        try:
            yield client
        finally:
            server.should_exit = True
            await task


@contextlib.asynccontextmanager
async def running_engagement(settings: EngagementSettings, clock: TestClock):
    """The service (consumers, dispatcher, relay, HTTP) served by uvicorn on its port."""
    app = create_app(settings, clock=clock)
    async with served(app, settings.http_port) as client:
        yield app, client


@contextlib.contextmanager
def mail_catcher(folder: Path):
    catcher = MailCatcher(folder, port=free_port()).start()
    try:
        yield catcher
    finally:
        catcher.stop()


async def wait_for(predicate, *, timeout_s: float = 30, what: str = "condition"):
    """Poll an (async or plain) predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def mails_to(catcher: MailCatcher, address: str) -> list:
    return [m for m in catcher.messages() if m["To"] == address]


async def rows(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "engagement"})
    try:
        return await conn.fetch(sql, *args)
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()


def _envelope(event_type: str, customer_id: str, payload: dict, *, occurred_at: datetime, producer: str,
              event_id: str | None = None) -> dict:
    return {"event_id": event_id or str(uuid.uuid4()), "type": event_type, "schema_version": 1,
            "occurred_at": occurred_at.isoformat(), "recorded_at": occurred_at.isoformat(), "producer": producer,
            "correlation_id": str(uuid.uuid4()), "causation_id": None, "customer_id": customer_id, "payload": payload}


def sale(customer_id: str, *, at: datetime, total: str = "120.00", category: str = "shoes", store: str = "s1",
         purchase_id: str | None = None, history: bool = False) -> dict:
    pid = purchase_id or f"p-{uuid.uuid4().hex[:10]}"
    payload = {"purchase_id": pid, "type": "sale", "original_purchase_id": None, "source": "pos", "store_id": store,
               "occurred_at": at.isoformat(), "currency": "PLN",
               "lines": [{"line_id": "l1", "sku": "sku1", "category": category, "quantity": 1, "unit_price": total,
                          "discount": "0"}], "total": total, "door": "kafka", "history": history,
               "import_policy": "analytics" if history else None}
    return _envelope("PurchaseRecorded", customer_id, payload, occurred_at=at, producer="purchases")


def return_of(sold: dict, *, at: datetime) -> dict:
    p = sold["payload"]
    payload = {**p, "purchase_id": f"r-{uuid.uuid4().hex[:10]}", "type": "return",
               "original_purchase_id": p["purchase_id"], "occurred_at": at.isoformat()}
    return _envelope("ReturnRecorded", sold["customer_id"], payload, occurred_at=at, producer="purchases")


def balance(available: int = 0, tier: str = "Bronze") -> dict:
    return {"available_points": available, "pending_points": 0, "held_points": 0, "debt_points": 0, "tier": tier,
            "qualifying_points": 0}


def points_earned(sold: dict, amount: int, *, at: datetime | None = None, history: bool = False) -> dict:
    p = sold["payload"]
    at = at or datetime.fromisoformat(p["occurred_at"])
    payload = {"amount_points": amount, "balance": balance(amount), "history": history,
               "purchase_id": p["purchase_id"], "source": p["source"], "rule_version": 1, "pending": False,
               "matures_at": None, "expires_at": (at + timedelta(days=365)).isoformat(), "tier_multiplier": "1.0",
               "breakdown": []}
    return _envelope("PointsEarned", sold["customer_id"], payload, occurred_at=at, producer="ledger")


def contact(email: str, *, consent_email: bool = True, locale: str = "pl-PL",
            time_zone: str = "Europe/Warsaw") -> dict:
    return {"email": email, "phone": None, "locale": locale, "time_zone": time_zone,
            "consent": {"email": consent_email, "sms": False}}


NOON_UTC = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def alert(event_type: str, customer_id: str, *, at: datetime, quadrant: str | None = None, ltv: str | None = None,
          episode: int = 1) -> dict:
    payload = {"episode": episode, "reasons": [], "segment": None, "quadrant": quadrant, "ltv": ltv,
               "currency": "PLN", "priority": "high", "p_alive": 0.3, "days_since_last_purchase": 90,
               "fit_version": 1}
    return _envelope(event_type, customer_id, payload, occurred_at=at, producer="churn",
                     event_id=str(uuid.uuid4()))
