"""The churn reports under test: a churn runtime whose consumer records the reports'
signals (engagement, points, rewards events) through the real pipeline, with the reports'
routers and dashboard mounted; and loading a generated history into it."""

import asyncio
import operator
import time
from datetime import datetime
from functools import reduce
from pathlib import Path
from typing import Annotated

import asyncpg
from pydantic import Field, TypeAdapter

from services.churn import signals
from services.churn.reports_settings import ReportsSettings
from services.churn.reports_wiring import install_reports
from shared.events.engagement import ENGAGEMENT_EVENT_TYPES
from shared.events.points import POINTS_EVENT_TYPES
from shared.events.rewards import REWARDS_EVENT_TYPES
from shared.http import create_service_app
from shared.pipeline import Batch, Subscription, pydantic_decoder
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from shared.topics import CHURN_DLQ, ENGAGEMENT_EVENTS, POINTS_EVENTS, REWARDS_EVENTS
from tests.support.churn_history import History, generate, seed_state
from tests.support.kafka import produce

MIGRATIONS = Path(__file__).parents[2] / "services" / "churn" / "migrations"
KEY = "reports-admin-key"
WINDOW = 180
HISTORY = generate()
NOW = HISTORY.now

Event = Annotated[reduce(operator.or_, ENGAGEMENT_EVENT_TYPES + POINTS_EVENT_TYPES + REWARDS_EVENT_TYPES),
                  Field(discriminator="type")]
SETTINGS = ReportsSettings(active_window_days=WINDOW)


async def apply_signals(batch: Batch) -> None:
    await signals.record_signals(batch.conn, batch.events, tier_order=SETTINGS.tier_order)


def build(base_env: dict[str, str], now: datetime = NOW):
    """A churn runtime (not started) and its app, the clock fixed at `now`."""
    settings = ServiceSettings(**{k.lower(): v for k, v in base_env.items()}, consumer_commit_interval_ms=50)
    runtime = ServiceRuntime(settings, service="churn", schema="churn", migrations_dir=MIGRATIONS,
                             description="churn reports under test",
                             topics=(ENGAGEMENT_EVENTS, POINTS_EVENTS, REWARDS_EVENTS, CHURN_DLQ))
    runtime.lane("main", bulk=True)
    for topic in (ENGAGEMENT_EVENTS, POINTS_EVENTS, REWARDS_EVENTS):
        runtime.subscribe(Subscription(
            topic=settings.topic(topic), consumer=f"churn.{topic}", decode=pydantic_decoder(TypeAdapter(Event)),
            apply=apply_signals, dead_letter_topic=settings.topic(CHURN_DLQ), door=f"{topic} consumer", lane="main"))
    app = create_service_app(runtime, title="churn", description="reports under test")
    install_reports(app, runtime, admin_key=lambda: KEY, settings=SETTINGS, clock=lambda: now, jobs=False)
    return runtime, app


async def wait_for(conn: asyncpg.Connection, query: str, expected: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        n = await conn.fetchval(query)
        if n >= expected or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.1)


async def load_history(history: History, base_env: dict, kafka_bootstrap: str, topic_prefix: str,
                       conn: asyncpg.Connection) -> None:
    await seed_state(conn, history, lost_after_days=WINDOW)
    by_topic = {"engagement": f"{topic_prefix}{ENGAGEMENT_EVENTS}", "ledger": f"{topic_prefix}{POINTS_EVENTS}",
                "rewards": f"{topic_prefix}{REWARDS_EVENTS}"}
    for producer, topic in by_topic.items():
        await produce(kafka_bootstrap, topic, [e for e in history.answers + history.events if e["producer"] == producer],
                      key_field="customer_id")
    assert await wait_for(conn, "SELECT count(*) FROM churn.survey_answers", len(history.answers)) == len(history.answers)
    contacts = len({e["customer_id"] for e in history.events})
    assert await wait_for(conn, "SELECT count(*) FROM churn.relationship_signals", contacts) == contacts


