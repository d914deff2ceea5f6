"""Importing purchase history end to end against the real broker and PostgreSQL: the CLI
produces a generated 18-month history to purchases.import, the purchases service records it
as history, the ledger applies the policy. Compared with an independent computation
(bench/reference.py) from the same inputs."""

import asyncio
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import pytest

from bench.history_data import HistorySpec, generate_history, write_jsonl
from bench.reference import expected_history
from services.ledger.scheduler import run_scheduler
from services.purchases import importer
from shared.topics import POINTS_EVENTS, PURCHASES_RAW, PURCHASES_RECORDED
from tests.support.kafka import consume, produce, unique
from tests.support.ledger import ledger_settings, ledger_state_hash, running_ledger
from tests.support.purchases import purchases_settings, running_purchases, sale

pytestmark = pytest.mark.asyncio(loop_scope="session")

SPEC = HistorySpec(customers=40, sales=600, days=540, stores=3)


async def rows(dsn: str, schema: str, sql: str, *args) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def run_cli(path: Path, policy: str, settings, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    args = importer.parse_args([str(path), "--policy", policy, "--no-progress", *extra])
    return await importer.run_import(args, settings, out=out), out.getvalue()


async def wait_until_applied(dsn: str, recorded: int, *, timeout_s: float = 120) -> None:
    """Until the purchases service recorded `recorded` history rows, the ledger claimed as
    many purchases.recorded events and both outboxes are empty (everything published)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        [p] = await rows(dsn, "purchases", "SELECT (SELECT count(*) FROM purchases WHERE history) AS n,"
                                           " (SELECT count(*) FROM outbox) AS out")
        [ledger] = await rows(dsn, "ledger", "SELECT (SELECT count(*) FROM inbox WHERE consumer = 'ledger.purchases')"
                                             " AS n, (SELECT count(*) FROM outbox) AS out")
        if p["n"] == recorded and ledger["n"] >= recorded and p["out"] == 0 and ledger["out"] == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, f"not applied: purchases {dict(p)}, ledger {dict(ledger)}"
        await asyncio.sleep(0.3)


def history_file(tmp_path: Path, prefix: str) -> tuple[Path, list[dict], datetime]:
    now = datetime.now(timezone.utc)
    purchases = generate_history(SPEC, now=now, prefix=prefix)
    return write_jsonl(purchases, tmp_path / "history.jsonl"), purchases, now


async def test_as_earned_history_gives_the_reference_points_tiers_and_expiries_and_no_message(base_env, tmp_path,
                                                                                              kafka_bootstrap):
    p_settings, l_settings = purchases_settings(base_env), ledger_settings(base_env)
    path, purchases, now = history_file(tmp_path, unique("h"))
    expected, expected_lots = expected_history(purchases, now=now)
    async with running_purchases(p_settings), running_ledger(l_settings) as (ledger_app, _):
        status, summary = await run_cli(path, "as-earned", p_settings)
        assert status == 0, summary
        await wait_until_applied(base_env["DATABASE_URL"], len(purchases))
        before = await ledger_state_hash(base_env["DATABASE_URL"])
        # The scheduler finds nothing to remind of (history lots are never reminded of).
        run = await run_scheduler(ledger_app.state.runtime.pool, ledger_app.state.ledger)
        # Twice more: all over again, then resumed from the finished checkpoint.
        assert (await run_cli(path, "as-earned", p_settings))[0] == 0
        assert (await run_cli(path, "as-earned", p_settings, "--resume"))[0] == 0
        await wait_until_applied(base_env["DATABASE_URL"], len(purchases))
        await asyncio.sleep(1.0)  # a duplicate, were one recorded, would have reached the ledger by now
        await wait_until_applied(base_env["DATABASE_URL"], len(purchases))
        after = await ledger_state_hash(base_env["DATABASE_URL"])
        events = await consume(kafka_bootstrap, l_settings.topic(POINTS_EVENTS), idle_s=2.0, timeout_s=60)
        recorded = await consume(kafka_bootstrap, p_settings.topic(PURCHASES_RECORDED), idle_s=1.0, timeout_s=60)
    assert run.reminders == 0
    assert before == after, "importing again changed the ledger"
    assert len(recorded) == len(purchases), "a purchase was published twice (or lost)"
    assert all(e["payload"]["history"] and e["payload"]["import_policy"] == "as-earned" for e in recorded)

    dsn = base_env["DATABASE_URL"]
    customers = {r["customer_id"]: r for r in await rows(dsn, "ledger", """
        SELECT c.customer_id, c.tier, c.qualifying_points,
               a.credits_posted - a.debits_posted - a.debits_pending AS available,
               p.credits_posted - p.debits_posted AS pending, d.debits_posted - d.credits_posted AS debt,
               (SELECT coalesce(sum(expired_points), 0) FROM lots l WHERE l.customer_id = c.customer_id) AS expired
        FROM customers c
        JOIN accounts a ON a.account_id = 'customer:' || c.customer_id || ':available'
        JOIN accounts p ON p.account_id = 'customer:' || c.customer_id || ':pending'
        JOIN accounts d ON d.account_id = 'customer:' || c.customer_id || ':debt'""")}
    assert set(customers) == set(expected)
    for cid, want in expected.items():
        got = customers[cid]
        assert (got["available"], got["pending"], got["expired"], got["debt"], got["qualifying_points"], got["tier"]) \
            == (want.available_points, want.pending_points, want.expired_points, 0, want.qualifying_points,
                want.tier), cid
    lots = {(r["purchase_source"], r["purchase_store"], r["purchase_id"]): r for r in await rows(
        dsn, "ledger", "SELECT * FROM lots")}
    assert set(lots) == set(expected_lots)
    for key, want in expected_lots.items():
        got = lots[key]
        assert (got["earned_points"], got["reversed_points"], got["tier_multiplier"], got["history"]) == \
            (want.earned, want.reversed, want.multiplier, True), key
    assert sum(x.multiplier > 1 for x in expected_lots.values()) > 50, "the history should reach higher tiers"
    assert sum(c.expired_points for c in expected.values()) > 0 and sum(c.pending_points for c in expected.values()) > 0

    # Receipts numbered per store: the same receipt id in several stores, each earning.
    ids = [k[2] for k in expected_lots]
    assert len(ids) - len(set(ids)) > 50
    # Every points event caused by history says so; none is a reminder.
    mine = [e for e in events if e["customer_id"] in expected]
    assert mine and all(e["payload"]["history"] is True for e in mine)
    assert not [e for e in mine if e["type"] == "PointsWillExpire"]
    assert {"PointsEarned", "PointsExpired"} <= {e["type"] for e in mine}
    earned = sum(e["payload"]["amount_points"] for e in mine if e["type"] == "PointsEarned")
    assert earned == sum(x.earned for x in expected_lots.values())


async def test_analytics_history_is_recorded_as_history_and_earns_nothing(base_env, tmp_path, kafka_bootstrap):
    p_settings, l_settings = purchases_settings(base_env), ledger_settings(base_env)
    path, purchases, _ = history_file(tmp_path, unique("a"))
    async with running_purchases(p_settings), running_ledger(l_settings):
        status, summary = await run_cli(path, "analytics", p_settings)
        assert status == 0, summary
        await wait_until_applied(base_env["DATABASE_URL"], len(purchases))
        again = await run_cli(path, "analytics", p_settings)
        await wait_until_applied(base_env["DATABASE_URL"], len(purchases))
        events = await consume(kafka_bootstrap, l_settings.topic(POINTS_EVENTS), idle_s=1.5, timeout_s=30)
        recorded = await consume(kafka_bootstrap, p_settings.topic(PURCHASES_RECORDED), idle_s=1.0, timeout_s=60)
    assert again[0] == 0 and f"{len(purchases)} purchases sent" in again[1]
    assert len(recorded) == len(purchases)
    assert all(e["payload"]["history"] and e["payload"]["import_policy"] == "analytics" for e in recorded)
    assert events == []
    dsn = base_env["DATABASE_URL"]
    [counts] = await rows(dsn, "ledger", "SELECT (SELECT count(*) FROM lots) AS lots,"
                                         " (SELECT count(*) FROM transfers) AS transfers")
    assert (counts["lots"], counts["transfers"]) == (0, 0)
    [row] = await rows(dsn, "purchases", "SELECT count(*) AS n, min(occurred_at) AS oldest FROM purchases"
                                         " WHERE history AND import_policy = 'analytics'")
    assert row["n"] == len(purchases)
    assert (datetime.now(timezone.utc) - row["oldest"]).days > 400  # past the live door's age limit


async def test_two_stores_sending_the_same_receipt_id_both_earn(base_env, kafka_bootstrap):
    p_settings, l_settings = purchases_settings(base_env), ledger_settings(base_env)
    receipt = unique("till-1-")
    one = sale(customer_id="ann", store_id="store-1", purchase_id=receipt, lines=[("1", 1, "40.00", "0.00")])
    two = sale(customer_id="ben", store_id="store-2", purchase_id=receipt, lines=[("1", 1, "25.00", "0.00")])
    async with running_purchases(p_settings), running_ledger(l_settings):
        await produce(kafka_bootstrap, p_settings.topic(PURCHASES_RAW), [one, two, one], key_field="customer_id")
        events = await consume(kafka_bootstrap, l_settings.topic(POINTS_EVENTS), count=2, timeout_s=60)
        dlq = await consume(kafka_bootstrap, p_settings.topic("purchases.dlq"), idle_s=1.0, timeout_s=5)
    assert sorted((e["customer_id"], e["payload"]["amount_points"]) for e in events) == [("ann", 40), ("ben", 25)]
    assert all(e["payload"]["history"] is False for e in events)
    assert dlq == []
    lots = await rows(base_env["DATABASE_URL"], "ledger", "SELECT purchase_store FROM lots WHERE purchase_id = $1",
                      receipt)
    assert sorted(r["purchase_store"] for r in lots) == ["store-1", "store-2"]


async def test_a_retailer_streaming_to_purchases_import_without_a_policy_earns_nothing(base_env, kafka_bootstrap):
    p_settings, l_settings = purchases_settings(base_env), ledger_settings(base_env)
    old = sale(customer_id="cat", occurred_at=datetime(2024, 3, 1, tzinfo=timezone.utc))
    async with running_purchases(p_settings), running_ledger(l_settings):
        await produce(kafka_bootstrap, p_settings.topic("purchases.import"), [old], key="cat")
        [recorded] = await consume(kafka_bootstrap, p_settings.topic(PURCHASES_RECORDED), count=1, timeout_s=60)
        await wait_until_applied(base_env["DATABASE_URL"], 1)
        events = await consume(kafka_bootstrap, l_settings.topic(POINTS_EVENTS), idle_s=1.0, timeout_s=5)
    assert recorded["payload"]["history"] is True and recorded["payload"]["import_policy"] == "analytics"
    assert json.loads(json.dumps(recorded))["payload"]["occurred_at"].startswith("2024-03-01")
    assert events == []


async def test_opening_balances_are_imported_once_with_their_reason_and_never_reminded_of(base_env, tmp_path,
                                                                                           kafka_bootstrap):
    from datetime import timedelta

    import httpx

    from services.ledger import opening_balances
    from tests.support.ledger import ADMIN_KEY

    l_settings = ledger_settings(base_env)
    ann, ben = unique("ob-"), unique("ob-")
    f = tmp_path / "balances.csv"
    f.write_text(f"customer_id,points,reason\n{ann},1200,card system 2019-2025\n{ben},35,\n,10,\n")
    args = opening_balances.parse_args([str(f), "--reason", "old cards", "--admin-key", ADMIN_KEY,
                                        "--ledger-url", "http://ledger"])
    async with running_ledger(l_settings) as (app, client):
        transport = httpx.ASGITransport(app=app)
        first, second = io.StringIO(), io.StringIO()
        assert await opening_balances.run(args, out=first, transport=transport) == 1  # the row without a customer
        assert await opening_balances.run(args, out=second, transport=transport) == 1
        balance = (await client.get(f"/v1/customers/{ann}/balance", headers={"X-Admin-Key": ADMIN_KEY})).json()
        run = await run_scheduler(app.state.runtime.pool, app.state.ledger,
                                  now=datetime.now(timezone.utc) + timedelta(days=350))
        app.state.runtime.relay.wake()
        events = await consume(kafka_bootstrap, l_settings.topic(POINTS_EVENTS), count=2, timeout_s=30)
    assert "2 applied, 0 applied before, 1 refused" in first.getvalue()
    assert "0 applied, 2 applied before, 1 refused" in second.getvalue()
    assert "customer_id is missing" in first.getvalue()
    assert balance["available_points"] == 1200
    assert run.reminders == 0
    adjusted = {e["customer_id"]: e for e in events if e["type"] == "PointsAdjusted"}
    assert set(adjusted) == {ann, ben} and all(e["payload"]["history"] for e in adjusted.values())
    assert adjusted[ann]["payload"]["note"] == "card system 2019-2025" and adjusted[ben]["payload"]["note"] == "old cards"
    assert adjusted[ann]["payload"]["reason_code"] == "opening_balance"
