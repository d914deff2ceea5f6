"""Builders for purchases in the inbound contract, and an in-process purchases service."""

import contextlib
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import httpx

from services.purchases import repository
from services.purchases.main import create_app
from services.purchases.settings import PurchasesSettings

SHOPIFY_SECRET = "shopify-test-secret"
WOO_SECRET = "woo-test-secret"


def sale(*, customer_id: str | None = "c-1", store_id: str = "store-1", source: str = "pos",
         lines: list[tuple[str, int, str, str]] | None = None, occurred_at: datetime | None = None,
         purchase_id: str | None = None, currency: str = "PLN") -> dict[str, Any]:
    """lines: (line_id, quantity, unit_price, discount)."""
    lines = lines or [("l1", 2, "12.50", "0.00"), ("l2", 1, "100.00", "10.00")]
    body_lines = [{"line_id": lid, "sku": f"sku-{lid}", "category": "grocery", "quantity": q,
                   "unit_price": price, "discount": disc} for lid, q, price, disc in lines]
    total = sum(Decimal(price) * q - Decimal(disc) for _, q, price, disc in lines)
    return {
        "purchase_id": purchase_id or f"p-{uuid.uuid4().hex[:12]}",
        "type": "sale", "original_purchase_id": None, "source": source, "store_id": store_id,
        "customer_id": customer_id,
        "occurred_at": (occurred_at or datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat(),
        "currency": currency, "lines": body_lines, "total": format(total, "f"),
    }


def return_of(original: dict[str, Any], returned: dict[str, int], *, purchase_id: str | None = None) -> dict[str, Any]:
    lines = []
    for line in original["lines"]:
        if line["line_id"] in returned:
            q = returned[line["line_id"]]
            disc = Decimal(line["discount"]) * q / line["quantity"]
            lines.append({**line, "quantity": q, "discount": format(disc.quantize(Decimal("0.01")), "f")})
    total = sum(Decimal(line["unit_price"]) * line["quantity"] - Decimal(line["discount"]) for line in lines)
    return {**original, "purchase_id": purchase_id or f"r-{uuid.uuid4().hex[:12]}", "type": "return",
            "original_purchase_id": original["purchase_id"], "lines": lines, "total": format(total, "f"),
            "occurred_at": datetime.now(timezone.utc).isoformat()}


def purchases_settings(base_env: dict[str, str], **overrides: Any) -> PurchasesSettings:
    values: dict[str, Any] = {k.lower(): v for k, v in base_env.items()}
    values.update(shopify_webhook_secret=SHOPIFY_SECRET, woocommerce_webhook_secret=WOO_SECRET)
    values.update(overrides)
    return PurchasesSettings(**values)


@contextlib.asynccontextmanager
async def running_purchases(settings: PurchasesSettings, *, api_keys: dict[str, str] | None = None):
    """The service in this process (its real Kafka consumer and relay included) and an HTTP
    client bound to it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        for key, store in (api_keys or {"key-store-1": "store-1"}).items():
            await repository.add_api_key(runtime.pool, key=key, store_id=store)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://purchases") as client:
            yield app, client
