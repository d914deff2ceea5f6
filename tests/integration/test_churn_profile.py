"""The churn service against the real broker and PostgreSQL, fed by the real purchases
service: purchases change the profile (recency, frequency, value, rhythm) and the segment, a
return lowers the value, a customer who stops buying gets exactly one CustomerAtRisk with its
reasons and then CustomerRecovered when they buy; one long gone is lost."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from shared.topics import CHURN_ALERTS
from tests.support.churn import churn_settings, running_churn, wait_for_profile
from tests.support.kafka import consume, unique
from tests.support.purchases import (
    purchases_settings,
    return_of,
    running_purchases,
    sale,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
STORE = {"X-API-Key": "key-store-1"}


def days_ago(days: float) -> datetime:
    # Counted from an hour back just after midnight: purchases a few minutes apart must fall
    # on one purchase day (the profile counts days in the event's own offset, here UTC).
    now = datetime.now(UTC)
    return (now if now.hour >= 1 else now - timedelta(hours=1)) - timedelta(days=days)


async def buy(client, customer: str, days: float, amount: str = "50.00", category: str = "grocery") -> dict:
    body = sale(customer_id=customer, occurred_at=days_ago(days), lines=[("l1", 1, amount, "0.00")])
    body["lines"][0]["category"] = category
    r = await client.post("/v1/purchases", json=body, headers=STORE)
    assert r.status_code in (200, 201, 202), r.text
    return body


async def alerts_of(settings, bootstrap: str, customer: str, *, idle_s: float = 2.0) -> list[dict]:
    return [a for a in await consume(bootstrap, settings.topic(CHURN_ALERTS), idle_s=idle_s, timeout_s=30,
                                     distinct="event_id") if a["customer_id"] == customer]


async def test_purchases_returns_and_a_customer_who_stops_buying(base_env, kafka_bootstrap):
    settings = churn_settings(base_env)
    steady, regular, newcomer, gone = (unique("c-") for _ in range(4))
    async with running_purchases(purchases_settings(base_env)) as (_, shop), running_churn(settings) as (_, churn):
        for d in (50, 40, 30, 25):
            await buy(shop, steady, d + 0.01)
        # A second purchase on one purchase day: at the first one's moment (25 days ago, as
        # opposed to 25.01, was another day when the test ran in the 14 minutes after midnight).
        await buy(shop, steady, 25.01, "30.00", category="drinks")
        for d in (10, 6, 1):
            await buy(shop, regular, d, "20.00")
        await buy(shop, newcomer, 2, "500.00")
        first = await buy(shop, gone, 300, "80.00")

        profile = await wait_for_profile(churn, steady, lambda p: p["purchases"] == 5)
        assert profile["purchase_days"] == 4 and profile["rhythm"]["intervals"] == 3
        assert profile["rhythm"]["median_interval_days"] == 10.0 and profile["rhythm"]["source"] == "own"
        assert Decimal(profile["net_spend"]) == Decimal("230.00")
        assert Decimal(profile["average_order_value"]) == Decimal("46.00")
        assert 24 < profile["days_since_last_purchase"] < 26
        assert {c["category"] for c in profile["categories"]} == {"grocery", "drinks"}
        await wait_for_profile(churn, gone, lambda p: p["purchases"] == 1)
        await wait_for_profile(churn, newcomer, lambda p: p["purchases"] == 1)
        await wait_for_profile(churn, regular, lambda p: p["purchases"] == 3)

        # The quintile boundaries of this base, then every customer rescored and evaluated.
        refreshed = await churn.post("/v1/admin/rfm/refresh")
        assert refreshed.status_code == 201, refreshed.text
        profile = (await churn.get(f"/v1/customers/{steady}/profile")).json()
        assert profile["segment"] is not None and profile["recency_score"] in range(1, 6)
        assert profile["risk"]["state"] == "at_risk" and profile["risk"]["episode"] == 1
        assert [r["signal"] for r in profile["risk"]["reasons"]][0] == "overdue"
        regular_profile = (await churn.get(f"/v1/customers/{regular}/profile")).json()
        assert regular_profile["risk"]["state"] == "active"
        assert regular_profile["rhythm"]["source"] == "base"  # 3 intervals are needed: the base's rhythm
        assert regular_profile["frequency_score"] > profile["frequency_score"] or profile["frequency_score"] == 5

        # A return lowers the value, not the purchase days.
        r = await shop.post("/v1/purchases", json=return_of(first, {"l1": 1}), headers=STORE)
        assert r.status_code in (200, 201, 202), r.text
        gone_profile = await wait_for_profile(churn, gone, lambda p: p["returns"] == 1)
        assert Decimal(gone_profile["net_spend"]) == Decimal("0.00") and gone_profile["purchase_days"] == 1
        assert gone_profile["returns_ratio"] == 1.0 and gone_profile["risk"]["state"] == "lost"

        # Evaluating again says nothing new (hysteresis).
        again = await churn.post("/v1/admin/evaluations")
        assert again.status_code == 201 and again.json()["transitions"] == 0

        at_risk = (await churn.get("/v1/at-risk", params={"limit": 1})).json()
        assert len(at_risk["items"]) == 1 and at_risk["next_cursor"]
        rest = (await churn.get("/v1/at-risk", params={"limit": 10, "cursor": at_risk["next_cursor"]})).json()
        listed = [i["customer_id"] for i in at_risk["items"] + rest["items"]]
        assert sorted(listed) == sorted([steady, gone]) and rest["next_cursor"] is None
        segments = (await churn.get("/v1/segments")).json()["segments"]
        assert sum(s["customers"] for s in segments) == 4

        # The customer buys again: recovered.
        await buy(shop, steady, 0.001)
        profile = await wait_for_profile(churn, steady, lambda p: p["risk"]["state"] == "active")
        assert profile["purchase_days"] == 5

        steady_alerts = await alerts_of(settings, kafka_bootstrap, steady)
        gone_alerts = await alerts_of(settings, kafka_bootstrap, gone, idle_s=0.5)
    risk = [a for a in steady_alerts if a["type"] != "SegmentChanged"]
    assert [a["type"] for a in risk] == ["CustomerAtRisk", "CustomerRecovered"]
    at_risk_alert, recovered = risk
    assert at_risk_alert["payload"]["episode"] == recovered["payload"]["episode"] == 1
    [reason] = [r for r in at_risk_alert["payload"]["reasons"] if r["signal"] == "overdue"]
    assert 24 < reason["value"] < 26 and reason["threshold"] == 20.0
    assert at_risk_alert["payload"]["segment"] == profile["segment"] or at_risk_alert["payload"]["segment"]
    assert at_risk_alert["payload"]["priority"] in ("high", "medium", "low")
    assert at_risk_alert["_key"] == steady
    assert [a["type"] for a in gone_alerts if a["type"] != "SegmentChanged"] == ["CustomerLost"]


async def test_the_api_needs_the_admin_key(base_env):
    settings = churn_settings(base_env)
    async with running_churn(settings) as (_, churn):
        missing = await churn.get("/v1/segments", headers={"X-Admin-Key": ""})
        wrong = await churn.get("/v1/segments", headers={"X-Admin-Key": "nope"})
        unknown = await churn.get("/v1/customers/nobody/profile")
        bad_cursor = await churn.get("/v1/at-risk", params={"cursor": "!!"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_admin_key"
    assert missing.status_code == 401
    assert unknown.status_code == 404 and unknown.json()["error"] == "customer_not_found"
    assert bad_cursor.status_code == 422 and bad_cursor.json()["error"] == "invalid_cursor"
