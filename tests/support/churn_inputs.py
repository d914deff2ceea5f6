"""Envelopes of the churn service's inputs, as their producers write them: purchases.recorded
(also imported history), points.events, rewards.events, engagement.events; and a seeded
synthetic base of customers with their own rhythms."""

import random
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any


def envelope(type_: str, customer_id: str, payload: dict[str, Any], *, occurred_at: datetime,
             producer: str, event_id: str | None = None) -> dict[str, Any]:
    return {"event_id": event_id or str(uuid.uuid4()), "type": type_, "schema_version": 1,
            "occurred_at": occurred_at.isoformat(), "recorded_at": datetime.now(timezone.utc).isoformat(),
            "producer": producer, "correlation_id": f"corr-{uuid.uuid4().hex[:8]}", "causation_id": None,
            "customer_id": customer_id, "payload": payload}


def purchase(customer_id: str, occurred_at: datetime, amount: str, *, kind: str = "sale", category: str = "grocery",
             history: bool = False, original: str | None = None) -> dict[str, Any]:
    payload = {"purchase_id": f"p-{uuid.uuid4().hex[:12]}", "type": kind, "original_purchase_id": original,
               "source": "pos", "store_id": "store-1", "occurred_at": occurred_at.isoformat(), "currency": "PLN",
               "lines": [{"line_id": "l1", "sku": "sku-1", "category": category, "quantity": 1, "unit_price": amount,
                          "discount": "0"}],
               "total": amount, "door": "import" if history else "kafka", "history": history,
               "import_policy": "analytics" if history else None}
    return envelope("PurchaseRecorded" if kind == "sale" else "ReturnRecorded", customer_id, payload,
                    occurred_at=occurred_at, producer="purchases")


def points_earned(customer_id: str, occurred_at: datetime, available: int, tier: str = "Bronze") -> dict[str, Any]:
    payload = {"amount_points": 10, "balance": {"available_points": available, "pending_points": 5,
                                                "held_points": 0, "debt_points": 0, "tier": tier,
                                                "qualifying_points": available},
               "purchase_id": "p-x", "source": "pos", "rule_version": 1, "pending": False, "matures_at": None,
               "expires_at": (occurred_at + timedelta(days=365)).isoformat(), "tier_multiplier": "1"}
    return envelope("PointsEarned", customer_id, payload, occurred_at=occurred_at, producer="ledger")


def redemption_fulfilled(customer_id: str, occurred_at: datetime) -> dict[str, Any]:
    payload = {"redemption_id": str(uuid.uuid4()), "reward_id": "r-1", "cost_points": 100, "kind": "coupon",
               "code": "C-1", "fulfilled_at": occurred_at.isoformat()}
    return envelope("RedemptionFulfilled", customer_id, payload, occurred_at=occurred_at, producer="rewards")


def survey_answered(customer_id: str, occurred_at: datetime, nps: int) -> dict[str, Any]:
    payload = {"survey_id": str(uuid.uuid4()), "nps": nps, "csat": None, "has_remark": False,
               "answered_at": occurred_at.isoformat()}
    return envelope("SurveyAnswered", customer_id, payload, occurred_at=occurred_at, producer="engagement")


def synthetic_base(prefix: str, customers: int, *, seed: int = 7, history: bool = True,
                   now: datetime | None = None) -> list[dict[str, Any]]:
    """Purchases over the last year: each customer buys every `rhythm` days (+-30%) from a
    start date, and some stopped buying a while ago. Deterministic for a seed."""
    rng = random.Random(seed)
    now = now or datetime.now(timezone.utc)
    events = []
    for n in range(customers):
        customer = f"{prefix}{n:05d}"
        rhythm = rng.choice([3, 7, 14, 30, 60])
        start = now - timedelta(days=rng.uniform(30, 360))
        stop = now - timedelta(days=rng.uniform(0, 200)) if rng.random() < 0.4 else now
        at = start
        while at < stop:
            amount = Decimal(rng.randint(500, 20_000)) / 100
            events.append(purchase(customer, at, format(amount, "f"), history=history))
            at += timedelta(days=rhythm * rng.uniform(0.7, 1.3))
    return events
