"""Builders for the ledger's inputs (purchases.recorded and rewards.events envelopes, as the
purchases and rewards services publish them) and an in-process ledger service."""

import contextlib
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import httpx

from services.ledger.main import create_app
from services.ledger.settings import LedgerSettings

ADMIN_KEY = "ledger-admin-test-key"
ADMIN = {"X-Admin-Key": ADMIN_KEY}


def _envelope(type_: str, customer_id: str | None, payload: dict[str, Any], *, event_id: str | None = None,
              occurred_at: datetime | None = None, producer: str = "purchases") -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    return {
        "event_id": event_id or str(uuid.uuid4()), "type": type_, "schema_version": 1,
        "occurred_at": (occurred_at or now).isoformat(), "recorded_at": now.isoformat(), "producer": producer,
        "correlation_id": f"corr-{uuid.uuid4().hex[:8]}", "causation_id": None, "customer_id": customer_id,
        "payload": payload,
    }


def sale_payload(*, purchase_id: str | None = None, amounts: tuple[str, ...] = ("100.00",), currency: str = "PLN",
                 occurred_at: datetime | None = None, source: str = "pos") -> dict[str, Any]:
    """One line per amount (quantity 1, no discount), line ids l1, l2, ..."""
    occurred_at = occurred_at or datetime.now(timezone.utc) - timedelta(minutes=1)
    lines = [{"line_id": f"l{i + 1}", "sku": f"sku-{i + 1}", "category": "grocery", "quantity": 1,
              "unit_price": a, "discount": "0"} for i, a in enumerate(amounts)]
    return {
        "purchase_id": purchase_id or f"p-{uuid.uuid4().hex[:12]}", "type": "sale", "original_purchase_id": None,
        "source": source, "store_id": "store-1", "occurred_at": occurred_at.isoformat(), "currency": currency,
        "lines": lines, "total": format(sum(Decimal(a) for a in amounts), "f"), "door": "kafka",
    }


def purchase_recorded(customer_id: str | None, **kw: Any) -> dict[str, Any]:
    payload = sale_payload(**kw)
    return _envelope("PurchaseRecorded", customer_id, payload, occurred_at=datetime.fromisoformat(payload["occurred_at"]))


def return_recorded(customer_id: str | None, sale: dict[str, Any], line_ids: list[str]) -> dict[str, Any]:
    original = sale["payload"]
    lines = [line for line in original["lines"] if line["line_id"] in line_ids]
    payload = {**original, "purchase_id": f"r-{uuid.uuid4().hex[:12]}", "type": "return",
               "original_purchase_id": original["purchase_id"], "lines": lines,
               "total": format(sum(Decimal(x["unit_price"]) for x in lines), "f"),
               "occurred_at": datetime.now(timezone.utc).isoformat()}
    return _envelope("ReturnRecorded", customer_id, payload)


def purchase_claimed(customer_id: str, sale: dict[str, Any]) -> dict[str, Any]:
    payload = {**sale["payload"], "claimed_at": datetime.now(timezone.utc).isoformat()}
    return _envelope("PurchaseClaimed", customer_id, payload)


def redemption(type_: str, customer_id: str, redemption_id: uuid.UUID, cost_points: int, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"redemption_id": str(redemption_id), "reward_id": "reward-1", "cost_points": cost_points}
    if type_ == "RedemptionRequested":
        payload["hold_timeout_s"] = extra.pop("hold_timeout_s", 300)
    elif type_ == "RedemptionFulfilled":
        payload.update(kind="coupon", code="C-1", fulfilled_at=datetime.now(timezone.utc).isoformat())
    elif type_ == "RedemptionFailed":
        payload["reason"] = extra.pop("reason", "out_of_stock")
    elif type_ == "RedemptionCancelled":
        payload.update(reason=extra.pop("reason", "customer_request"), was_fulfilled=extra.pop("was_fulfilled", True))
    return _envelope(type_, customer_id, payload, producer="rewards")


def ledger_settings(base_env: dict[str, str], **overrides: Any) -> LedgerSettings:
    values: dict[str, Any] = {k.lower(): v for k, v in base_env.items()}
    # One purchases consumer: each group join costs a second at start (the e2e test runs the default two).
    values.update(admin_api_key=ADMIN_KEY, scheduler_interval_s=3600, metrics_interval_s=3600, purchases_consumers=1)
    values.update(overrides)
    return LedgerSettings(**values)


@contextlib.asynccontextmanager
async def running_ledger(settings: LedgerSettings, **kw: Any):
    """The ledger in this process (its real consumers, relay and scheduler) and an HTTP
    client bound to it."""
    app = create_app(settings, **kw)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ledger") as client:
            yield app, client


async def ledger_rows(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "ledger"})
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()
