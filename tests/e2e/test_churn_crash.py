"""kill -9 of the churn service in the middle of an evaluation of the whole base, then a
restart: the run is resumed from its cursor and every overdue customer gets exactly one
CustomerAtRisk (none lost, none repeated: one event id per customer and episode), while the
customers within their rhythm get none."""

import asyncio
import threading
import urllib.request
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from shared.topics import CHURN_ALERTS, PURCHASES_RECORDED
from tests.support.churn import ADMIN_KEY
from tests.support.churn_inputs import purchase
from tests.support.kafka import consume, produce
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

OVERDUE, ACTIVE = 1500, 300


async def scalar(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "churn"})
    try:
        return await conn.fetchval(sql)
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def base_of_customers(now: datetime) -> list[dict]:
    """Overdue: purchase days 10 days apart, the last 25-35 days ago (over 2 x 10, under the
    4 x 10 of lost). Active: the same rhythm, the last purchase 2 days ago."""
    events = []
    for n in range(OVERDUE + ACTIVE):
        customer = f"o-{n:05d}" if n < OVERDUE else f"a-{n:05d}"
        last = 25 + n % 10 if n < OVERDUE else 2
        for k in range(4):
            events.append(purchase(customer, now - timedelta(days=last + 10 * k, hours=1), "40.00"))
    return events


def evaluate(url: str) -> None:
    request = urllib.request.Request(f"{url}/v1/admin/evaluations", method="POST", headers={"X-Admin-Key": ADMIN_KEY})
    try:
        urllib.request.urlopen(request, timeout=120).read()
    except Exception:  # noqa: BLE001 - the process is killed under it
        pass


async def test_kill_9_during_an_evaluation_then_restart_loses_no_alert_and_repeats_none(
        base_env, kafka_bootstrap, tmp_path):
    dsn = base_env["DATABASE_URL"]
    extra = {"CHURN_ADMIN_API_KEY": ADMIN_KEY, "CHURN_EVALUATION_CHUNK_SIZE": "10", "CHURN_REFRESH_AT_START": "false",
             "CHURN_REFRESH_ON_GROWTH": "false", "CHURN_EVALUATION_INTERVAL_S": "3600"}
    service = ServiceProcess("churn", base_env, extra, log_dir=tmp_path)
    service.start()
    try:
        events = base_of_customers(datetime.now(timezone.utc))
        await produce(kafka_bootstrap, base_env["TOPIC_PREFIX"] + PURCHASES_RECORDED, events, key_field="customer_id")
        for _ in range(1200):
            if await scalar(dsn, "SELECT coalesce(sum(purchases), 0) FROM customer_state") >= len(events):
                break
            await asyncio.sleep(0.05)
        caller = threading.Thread(target=evaluate, args=(service.url,), daemon=True)
        caller.start()
        for _ in range(3000):
            if await scalar(dsn, "SELECT count(*) FROM alerts") >= 200:
                break
            await asyncio.sleep(0.005)
        service.kill9()
        at_kill = await scalar(dsn, "SELECT count(*) FROM alerts")
        assert 0 < at_kill < OVERDUE, "the kill must land in the middle of the evaluation"
        assert await scalar(dsn, "SELECT count(*) FROM evaluations WHERE finished_at IS NULL") == 1
        service.start()  # resumes the unfinished run at start
        for _ in range(1200):
            if not await scalar(dsn, "SELECT count(*) FROM evaluations WHERE finished_at IS NULL"):
                break
            await asyncio.sleep(0.05)
        evaluate(service.url)  # and one more: nothing new to say
        alerts = await consume(kafka_bootstrap, base_env["TOPIC_PREFIX"] + CHURN_ALERTS, timeout_s=60, idle_s=3)
    finally:
        service.stop()
    ids = defaultdict(set)
    for a in alerts:
        if a["type"] == "CustomerAtRisk":
            ids[a["customer_id"]].add(a["event_id"])
    assert len(ids) == OVERDUE and all(c.startswith("o-") for c in ids)
    assert all(len(v) == 1 for v in ids.values()), "an at-risk alert emitted twice for one episode"
    assert await scalar(dsn, "SELECT count(*) FROM alerts WHERE kind = 'CustomerAtRisk'") == OVERDUE
    assert await scalar(dsn, "SELECT count(*) FROM risk_states WHERE state = 'at_risk' AND episode = 1") == OVERDUE
    assert await scalar(dsn, "SELECT count(*) FROM evaluations WHERE transitions > 0") >= 1
