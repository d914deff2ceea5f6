"""The churn service's reports against the real broker and PostgreSQL, with a generated
history (tests/support/churn_history.py: 400 customers over two years, some leaving):
survey answers, contacts, tiers lost and failed redemptions go through the broker into the
consumer pipeline's `record_signals`; each indicator is checked against an independent
computation from the same raw history; the matrix's quadrants add up to the customers;
departure factors match a hand-built case."""

from datetime import UTC, date, datetime
from decimal import Decimal
from statistics import median

import asyncpg
import httpx
import pytest

from services.churn import reports, signals
from tests.support.churn_history import expected_month, month_bounds
from tests.support.churn_reports import (
    HISTORY,
    KEY,
    NOW,
    SETTINGS,
    WINDOW,
    build,
    load_history,
)


@pytest.fixture
async def stack(base_env, kafka_bootstrap, topic_prefix, database_url):
    runtime, app = build(base_env)
    await runtime.start()
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "churn"})
    try:
        await load_history(HISTORY, base_env, kafka_bootstrap, topic_prefix, conn)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://churn",
                                     headers={"X-Admin-Key": KEY}) as client:
            yield runtime, client, conn
    finally:
        await conn.close()
        await runtime.stop()


async def test_each_indicator_equals_an_independent_computation_from_the_history(stack):
    _, client, _ = stack
    response = await client.get("/v1/indicators", params={"from": "2025-01", "to": "2026-11"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["months"]) == 23
    checked_rates = 0
    for row in body["months"]:
        first, last = month_bounds(*map(int, row["period"].split("-")))
        want = expected_month(HISTORY, WINDOW, first, last)
        got = {k: row[k] for k in ("customers_at_start", "customers_at_end", "new_customers", "lost_customers",
                                   "retention_rate", "churn_rate", "loyalty_index")}
        got.update({k: row["satisfaction"][k] for k in ("csat", "csat_answers", "nps", "nps_answers")})
        assert got == want, row["period"]
        checked_rates += want["retention_rate"] is not None and want["csat"] is not None
    assert checked_rates >= 18  # the history gives most months customers and answers
    assert any(m["lost_customers"] > 0 for m in body["months"])  # some customers leave
    rolling = body["rolling"]
    assert rolling["period"] == "2025-12..2026-11"
    want = expected_month(HISTORY, WINDOW, date(2025, 12, 1), date(2026, 11, 30))
    assert {k: rolling[k] for k in ("retention_rate", "churn_rate", "loyalty_index", "customers_at_start")} == {
        k: want[k] for k in ("retention_rate", "churn_rate", "loyalty_index", "customers_at_start")}


async def test_indicator_months_are_validated(stack):
    _, client, _ = stack
    for params in ({"from": "2026-13"}, {"from": "2026-05", "to": "2026-01"}, {"to": "yesterday"},
                   {"from": "2000-01", "to": "2026-01"}):
        response = await client.get("/v1/indicators", params=params)
        assert response.status_code == 422 and response.json()["detail"]["error"], params
    assert (await client.get("/v1/indicators", headers={"X-Admin-Key": "wrong"})).status_code == 401


async def test_matrix_quadrants_add_up_to_the_customers_and_match_the_medians(stack):
    runtime, client, conn = stack
    body = (await client.get("/v1/matrix")).json()
    counts = {q["quadrant"]: q["customers"] for q in body["quadrants"]}
    assert sum(counts.values()) == body["customers"] == len(HISTORY.customers)
    assert sum(Decimal(q["revenue"]) for q in body["quadrants"]) == sum(
        c.gross - c.returned for c in HISTORY.customers.values())
    # independently: realised margin x (active x purchase days per month of tenure), split at the medians
    today = NOW.date()
    values = {}
    for c in HISTORY.customers.values():
        months = max((today - c.days[0]).days / 30.4375 + 1 / 30.4375, 1.0)
        values[c.customer_id] = (c.margin(), (1.0 if (today - c.days[-1]).days < WINDOW else 0.0) * len(c.days) / months)
    cut_p, cut_l = median(v[0] for v in values.values()), median(v[1] for v in values.values())
    want = {"true_friend": 0, "butterfly": 0, "barnacle": 0, "stranger": 0}
    for p, loyal in values.values():
        want[("true_friend" if loyal > cut_l else "butterfly") if p > cut_p else
             ("barnacle" if loyal > cut_l else "stranger")] += 1
    assert counts == want and all(want.values())
    # the refresh stores each customer's quadrant; a quadrant's page is ranked by profitability
    await reports.refresh_quadrants(runtime.pool, SETTINGS, now=NOW)
    stored = dict(await conn.fetch("SELECT quadrant, count(*) FROM churn.customer_quadrants GROUP BY 1"))
    assert stored == want
    page = (await client.get("/v1/matrix/true_friend/customers", params={"limit": 10})).json()
    assert page["total"] == want["true_friend"] and len(page["customers"]) == 10 and page["next_offset"] == 10
    profits = [Decimal(c["profitability"]) for c in page["customers"]]
    assert profits == sorted(profits, reverse=True)
    assert (await client.get("/v1/matrix/friends/customers")).status_code == 422
    by_quadrant = (await client.get("/v1/profitability", params={"by": "quadrant"})).json()
    assert {r["key"]: r["customers"] for r in by_quadrant["rows"]} == want


async def test_profitability_by_category_and_cohorts(stack):
    _, client, _ = stack
    rows = (await client.get("/v1/profitability", params={"by": "category"})).json()["rows"]
    assert {r["key"] for r in rows} == {"grocery", "electronics", "beauty"}
    assert next(r for r in rows if r["key"] == "beauty")["margin_rate"] == pytest.approx(0.45, abs=0.02)
    assert (await client.get("/v1/profitability", params={"by": "store"})).status_code == 422
    cohorts = (await client.get("/v1/cohorts")).json()["cohorts"]
    assert sum(c["customers"] for c in cohorts) == len(HISTORY.customers)
    first = cohorts[0]
    members = [c for c in HISTORY.customers.values() if (c.days[0].year, c.days[0].month) == tuple(
        map(int, first["month"].split("-")))]
    assert first["customers"] == len(members) and first["buying"][0] == len(members)
    assert first["buying"][3] == sum(1 for c in members if any(
        (d.year * 12 + d.month) - (c.days[0].year * 12 + c.days[0].month) == 3 for d in c.days))


HAND_NOW = datetime(2026, 6, 1, tzinfo=UTC)


async def test_departure_factors_match_a_hand_built_case(base_env, database_url):
    runtime, app = build(base_env, HAND_NOW)
    await runtime.start()
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "churn"})
    try:
        async def customer(cid: str, *, state: str, nps=None, csat=None, complaints=0, gross="100", returned="0",
                           points=0, last_day=date(2026, 5, 1)):
            await conn.execute("""
                INSERT INTO customer_state (customer_id, first_purchase_day, last_purchase_day, purchase_days,
                    gross_spend, returned_spend, margin, points_available, points_pending, last_nps, last_csat,
                    complaints_open) VALUES ($1, '2025-01-01', $2, 5, $3, $4, 10, $5, 0, $6, $7, $8)""",
                cid, last_day, Decimal(gross), Decimal(returned), points, nps, csat, complaints)
            await conn.execute("INSERT INTO risk_states (customer_id, state, episode, entered_at, updated_at) "
                               "VALUES ($1, $2, $3, $4, $4)", cid, state, 1 if state == "lost" else 0,
                               datetime(2026, 4, 1, tzinfo=UTC))
        # lost-1: everything went wrong; lost-2: only an open complaint; three retained customers
        await customer("lost-1", state="lost", nps=3, complaints=1, returned="30", points=800,
                       last_day=date(2025, 10, 1))
        await customer("lost-2", state="lost", csat=5, complaints=1, last_day=date(2025, 10, 1))
        await customer("kept-1", state="active", nps=10, complaints=1)
        await customer("kept-2", state="active", csat=1, points=900)
        await customer("kept-3", state="at_risk", nps=9)
        contact = datetime(2026, 3, 20, tzinfo=UTC)  # 12 days before lost-2's loss, 73 before HAND_NOW
        events = [
            ("TouchpointSent", "lost-2", {"sent_at": contact}), ("TouchpointSent", "kept-1", {"sent_at": contact}),
            ("TouchpointSent", "kept-2", {"sent_at": contact}), ("TouchpointSent", "kept-3", {"sent_at": contact}),
            ("TouchpointSent", "lost-1", {"sent_at": datetime(2025, 12, 1, tzinfo=UTC)}),
            ("TierChanged", "lost-1", {"from_tier": "Gold", "to_tier": "Silver"}),
            ("TierChanged", "kept-3", {"from_tier": "Bronze", "to_tier": "Silver"}),  # up: not a loss
            ("RedemptionFailed", "lost-1", {}), ("RedemptionCancelled", "kept-2", {}),
        ]
        await signals.record_signals(conn, [_Event(kind, cid, payload) for kind, cid, payload in events],
                                     tier_order=SETTINGS.tier_order)
        await conn.execute("INSERT INTO customer_quadrants VALUES ('lost-1', 'barnacle', 1, 0.1, $1)", HAND_NOW)
        assert await reports.record_departures(runtime.pool, SETTINGS, now=HAND_NOW) == 2
        assert await reports.record_departures(runtime.pool, SETTINGS, now=HAND_NOW) == 0  # once per episode
        recorded = {r["customer_id"]: set(r["factors"]) for r in await conn.fetch("SELECT * FROM departures")}
        assert recorded == {
            "lost-1": {"low_satisfaction", "open_complaint", "high_returns", "unredeemed_points", "tier_lost",
                       "failed_redemption", "no_recent_contact", "quadrant_barnacle"},
            "lost-2": {"open_complaint"},
        }
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://churn",
                                     headers={"X-Admin-Key": KEY}) as client:
            body = (await client.get("/v1/departures")).json()
        assert (body["lost_customers"], body["retained_customers"]) == (2, 3)
        rows = {r["factor"]: r for r in body["factors"]}
        assert (rows["open_complaint"]["lost_count"], rows["open_complaint"]["retained_count"]) == (2, 1)
        assert rows["open_complaint"]["ratio"] == round((2 / 2) / (1 / 3), 6)
        assert (rows["unredeemed_points"]["lost_count"], rows["unredeemed_points"]["retained_count"]) == (1, 1)
        assert (rows["failed_redemption"]["lost_count"], rows["failed_redemption"]["retained_count"]) == (1, 1)
        assert (rows["low_satisfaction"]["lost_count"], rows["low_satisfaction"]["retained_count"]) == (1, 1)
        assert (rows["tier_lost"]["lost_count"], rows["tier_lost"]["retained_count"]) == (1, 0)
        assert rows["tier_lost"]["ratio"] is None  # never seen among retained: no ratio, listed first
        assert {f["factor"] for f in body["factors"][:4]} == {"high_returns", "tier_lost", "no_recent_contact",
                                                             "quadrant_barnacle"}
        assert body["factors"][4]["factor"] == "open_complaint"  # the highest finite ratio (3.0)
        assert rows["no_recent_contact"]["retained_count"] == 0
    finally:
        await conn.close()
        await runtime.stop()


class _Payload:
    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)


class _Event:
    def __init__(self, kind: str, customer_id: str, payload: dict) -> None:
        self.type, self.customer_id = kind, customer_id
        self.occurred_at = payload.get("sent_at", datetime(2026, 3, 1, tzinfo=UTC))
        self.payload = _Payload(payload)
