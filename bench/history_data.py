"""A generated purchase history in the inbound contract, for the import's tests and benchmark:
customers buying over `days` from several stores of a chain whose tills number receipts
independently (so receipt ids repeat across stores), some partial returns within days of
their sale, a few anonymous sales. Chronological, seeded: the same arguments give the same
history.

Dates avoid a day either side of the boundaries that the moment of the check would decide
(a return window, an expiry or the tier window ending "now"), so a reference computed at
generation time and a ledger applying it minutes later agree."""

import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

PENDING_DAYS, EXPIRY_DAYS, WINDOW_DAYS = 14, 365, 365


@dataclass(frozen=True)
class HistorySpec:
    customers: int = 60
    sales: int = 900
    days: int = 540
    stores: int = 3
    return_share: float = 0.12
    anonymous_share: float = 0.03
    seed: int = 14


def _near_a_boundary(t: datetime, now: datetime) -> bool:
    age_days = (now - t).total_seconds() / 86400
    for boundary in (PENDING_DAYS, PENDING_DAYS + EXPIRY_DAYS, WINDOW_DAYS):
        if abs(age_days - boundary) < 1.5:
            return True
    return age_days < 1.5


def generate_history(spec: HistorySpec, *, now: datetime | None = None, prefix: str = "") -> list[dict[str, Any]]:
    now = now or datetime.now(timezone.utc)
    rnd = random.Random(spec.seed)
    # A few heavy buyers reach Silver and Gold; most stay Bronze.
    weights = [rnd.choice((1, 1, 1, 2, 3, 12)) for _ in range(spec.customers)]
    customers = [f"{prefix}c-{i:05d}" for i in range(spec.customers)]
    tills = [0] * spec.stores
    sales: list[dict[str, Any]] = []
    for _ in range(spec.sales):
        while True:
            t = now - timedelta(seconds=rnd.uniform(2 * 86400, spec.days * 86400))
            if not _near_a_boundary(t, now):
                break
        store = rnd.randrange(spec.stores)
        tills[store] += 1
        customer = None if rnd.random() < spec.anonymous_share else rnd.choices(customers, weights)[0]
        lines = []
        for n in range(rnd.randint(1, 3)):
            quantity = rnd.randint(1, 3)
            price = Decimal(rnd.randint(300, 8000)) / 100
            discount = Decimal(rnd.randint(0, 200)) / 100 if rnd.random() < 0.3 else Decimal("0.00")
            lines.append({"line_id": str(n + 1), "sku": f"sku-{rnd.randint(1, 40)}", "category": "grocery",
                          "quantity": quantity, "unit_price": format(price, "f"), "discount": format(discount, "f")})
        sales.append({
            "purchase_id": f"{prefix}till-1-{tills[store]:06d}", "type": "sale", "original_purchase_id": None,
            "source": "pos", "store_id": f"{prefix}store-{store + 1}", "customer_id": customer,
            "occurred_at": t.isoformat(), "currency": "PLN", "lines": lines, "total": _total(lines),
        })
    returns = []
    for s in sales:
        if s["customer_id"] is None or rnd.random() >= spec.return_share:
            continue
        t = datetime.fromisoformat(s["occurred_at"]) + timedelta(days=rnd.uniform(0.5, 10))
        if t > now - timedelta(days=1.5) or _near_a_boundary(t, now):
            continue
        lines = []
        for line in s["lines"]:
            if rnd.random() < 0.6:
                q = rnd.randint(1, line["quantity"])
                discount = (Decimal(line["discount"]) * q / line["quantity"]).quantize(Decimal("0.01"))
                lines.append({**line, "quantity": q, "discount": format(discount, "f")})
        if lines:
            returns.append({**s, "purchase_id": f"ret-{s['purchase_id']}", "type": "return",
                            "original_purchase_id": s["purchase_id"], "occurred_at": t.isoformat(),
                            "lines": lines, "total": _total(lines)})
    return sorted(sales + returns, key=lambda p: datetime.fromisoformat(p["occurred_at"]))


def _total(lines: list[dict[str, Any]]) -> str:
    return format(sum(Decimal(x["unit_price"]) * x["quantity"] - Decimal(x["discount"]) for x in lines), "f")


def write_jsonl(purchases: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w") as f:
        for p in purchases:
            f.write(json.dumps(p, separators=(",", ":")) + "\n")
    return path
