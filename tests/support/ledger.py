"""Builders for the ledger's inputs (purchases.recorded, rewards.events and ledger.adjustments
envelopes, as the purchases and rewards services and the ledger's admin API publish them), an
in-process ledger service, and what a test reads back: the ledger's state, consumer lag."""

import asyncio
import contextlib
import hashlib
import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import httpx

from bench.harness import group_lag
from services.ledger.main import create_app
from services.ledger.settings import LedgerSettings
from shared.events import derived_event_id

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
    elif type_ == "RedemptionShipped":
        payload.update(carrier="DHL", tracking_number="JD0001", tracking_url=None,
                       shipped_at=datetime.now(timezone.utc).isoformat())
    elif type_ == "RedemptionDelivered":
        payload["delivered_at"] = datetime.now(timezone.utc).isoformat()
    return _envelope(type_, customer_id, payload, producer="rewards")


def adjustment_recorded(customer_id: str, amount_points: int, *, adjustment_id: uuid.UUID | None = None,
                        occurred_at: datetime | None = None, event_id: str | None = None,
                        reason_code: str = "goodwill", actor: str = "ops@test", note: str | None = None) -> dict[str, Any]:
    """An AdjustmentRecorded as the admin API writes it (event id derived from the adjustment id)."""
    adjustment_id = adjustment_id or uuid.uuid4()
    occurred_at = occurred_at or datetime.now(timezone.utc)
    payload = {"adjustment_id": str(adjustment_id), "customer_id": customer_id, "amount_points": amount_points,
               "reason_code": reason_code, "actor": actor, "note": note, "occurred_at": occurred_at.isoformat()}
    event_id = event_id or str(derived_event_id("ledger", "AdjustmentRecorded", str(adjustment_id)))
    return _envelope("AdjustmentRecorded", customer_id, payload, event_id=event_id, occurred_at=occurred_at,
                     producer="ledger")


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


# What defines the ledger, row by row in a stable order. Left out: when a row was written
# (created_at, updated_at, seq) and hold expiries (processing time plus the timeout). The
# adjustments' created_at is kept: it is when the ledger accepted the adjustment.
STATE_QUERIES = {
    "accounts": "SELECT account_id, customer_id, kind, debits_pending, debits_posted, credits_pending, credits_posted "
                "FROM accounts ORDER BY account_id",
    "customers": "SELECT customer_id, tier, has_purchased, qualifying_points FROM customers ORDER BY customer_id",
    "lots": "SELECT lot_id, customer_id, source, purchase_id, occurred_at, amount_points, remaining_points, "
            "held_points, expired_points, pending, matures_at, expires_at, rule_version, qualifying, earned_points, "
            "reversed_points, bonus_points, tier_multiplier, lines, breakdown, return_ids FROM lots ORDER BY lot_id",
    "holds": "SELECT redemption_id, customer_id, amount_points, state, transfer_id, allocations FROM holds "
             "ORDER BY redemption_id",
    "transfers": "SELECT transfer_id, debit_account_id, credit_account_id, amount_points, code, phase, pending_id, "
                 "customer_id, ref, lot_id, rule_version, occurred_at FROM transfers ORDER BY transfer_id",
    "adjustments": "SELECT adjustment_id, customer_id, amount_points, reason_code, actor, note, transfer_id, created_at "
                   "FROM adjustments ORDER BY adjustment_id",
}


async def ledger_state(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of STATE_QUERIES, table by table."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "ledger"})
    try:
        return {name: [tuple(r.values()) for r in await conn.fetch(sql)] for name, sql in STATE_QUERIES.items()}
    finally:
        await conn.close()


async def ledger_state_hash(dsn: str) -> tuple[str, dict[str, int]]:
    """A hash of ledger_state, and the row count of each table."""
    digest, counts = hashlib.sha256(), {}
    for name, rows in (await ledger_state(dsn)).items():
        counts[name] = len(rows)
        for row in rows:
            digest.update(json.dumps([name, *row], default=str, sort_keys=True).encode())
    return digest.hexdigest(), counts


async def caught_up(bootstrap: str, group: str, topic: str, *, partitions: int = 4, timeout_s: float = 60) -> None:
    """Wait until `group` has committed every record of `topic`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        lag = await group_lag(bootstrap, group, topic, partitions)
        if not any(lag.values()):
            return
        assert asyncio.get_running_loop().time() < deadline, f"{group} still lags on {topic}: {lag}"
        await asyncio.sleep(0.2)
