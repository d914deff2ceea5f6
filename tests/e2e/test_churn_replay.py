"""Replaying churn's input topics from offset 0 into an empty database gives the same state:
the same facts, rhythms, scores and risk states, and the same alerts with the same event ids
(derived from customer, episode and kind), after the same fit. Duplicates, a malformed record
and an event type churn does not know are in the streams."""

import hashlib
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from shared.topics import CHURN_DLQ, ENGAGEMENT_EVENTS, POINTS_EVENTS, PURCHASES_RECORDED, REWARDS_EVENTS
from tests.support.churn import churn_rows, churn_settings, running_churn
from tests.support.churn_inputs import envelope, points_earned, purchase, redemption_fulfilled, survey_answered
from tests.support.churn_inputs import synthetic_base
from tests.support.kafka import consume, produce
from tests.support.ledger import caught_up

pytestmark = pytest.mark.asyncio(loop_scope="session")

STATE = {
    "customer_state": "SELECT * FROM customer_state ORDER BY customer_id",
    "purchase_days": "SELECT * FROM purchase_days ORDER BY customer_id, day",
    "category_spend": "SELECT * FROM category_spend ORDER BY customer_id, category",
    "scores": "SELECT * FROM scores ORDER BY customer_id",
    "risk_states": "SELECT customer_id, state, episode FROM risk_states ORDER BY customer_id",
    "alerts": "SELECT event_id, customer_id, episode, kind, priority, ltv, segment FROM alerts ORDER BY event_id",
}
WRITTEN_AT = {"updated_at", "scored_at", "created_at"}  # when a row was written, not what it says


async def state(dsn: str) -> tuple[str, dict[str, int]]:
    digest, counts = hashlib.sha256(), {}
    for name, sql in STATE.items():
        rows = await churn_rows(dsn, sql)
        counts[name] = len(rows)
        for row in rows:
            digest.update(json.dumps([name, {k: v for k, v in dict(row).items() if k not in WRITTEN_AT}],
                                     default=str, sort_keys=True).encode())
    return digest.hexdigest(), counts


async def run_to_the_end(settings, bootstrap: str) -> None:
    async with running_churn(settings) as (_, churn):
        group = f"{settings.consumer_group_prefix}.churn.main"
        for topic in (PURCHASES_RECORDED, POINTS_EVENTS, REWARDS_EVENTS, ENGAGEMENT_EVENTS):
            await caught_up(bootstrap, group, settings.topic(topic))
        fitted = await churn.post("/v1/admin/models/fit")
        assert fitted.status_code == 201, fitted.text


async def test_a_replay_from_offset_0_into_an_empty_database_gives_the_same_state(
        base_env, kafka_bootstrap, database_url, pg_cluster):
    now = datetime.now(timezone.utc)
    purchases = synthetic_base("r-", 120, seed=11, history=False)
    some = sorted({e["customer_id"] for e in purchases})[:30]
    purchases += [purchase(c, now - timedelta(hours=2), "12.00", kind="return") for c in some[:10]]
    points = [points_earned(c, now - timedelta(hours=1, minutes=i), 100 + i) for i, c in enumerate(some)]
    rewards = [redemption_fulfilled(c, now - timedelta(minutes=30)) for c in some[:5]]
    engagement = [survey_answered(c, now - timedelta(minutes=20), nps=3 + i % 7) for i, c in enumerate(some[:8])]
    engagement.append(envelope("JourneyStarted", some[0], {"journey": "x"}, occurred_at=now, producer="engagement"))
    settings = churn_settings(base_env)
    await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), purchases + purchases[:25] + [b"{not json"],
                  key_field="customer_id")
    await produce(kafka_bootstrap, settings.topic(POINTS_EVENTS), points, key_field="customer_id")
    await produce(kafka_bootstrap, settings.topic(REWARDS_EVENTS), rewards, key_field="customer_id")
    await produce(kafka_bootstrap, settings.topic(ENGAGEMENT_EVENTS), engagement, key_field="customer_id")

    await run_to_the_end(settings, kafka_bootstrap)
    first, counts = await state(database_url)

    replay_db = f"t_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(replay_db)
    replay = churn_settings({**base_env, "DATABASE_URL": pg_cluster.dsn(replay_db),
                             "CONSUMER_GROUP_PREFIX": f"replay{uuid.uuid4().hex[:6]}"})
    await run_to_the_end(replay, kafka_bootstrap)
    second, replay_counts = await state(pg_cluster.dsn(replay_db))

    assert counts == replay_counts and first == second
    buyers = len({e["customer_id"] for e in purchases})
    assert counts["customer_state"] == buyers and counts["scores"] == buyers and counts["alerts"] > 0
    [letter] = [d for d in await consume(kafka_bootstrap, settings.topic(CHURN_DLQ), idle_s=1, timeout_s=10)
                if d.get("reason") == "malformed_json"][:1]
    assert letter["original"] == "{not json"
    rows = await churn_rows(database_url, "SELECT last_nps, redemptions, points_available FROM customer_state "
                                          "WHERE customer_id = $1", some[0])
    assert rows[0]["last_nps"] == 3 and rows[0]["redemptions"] == 1 and rows[0]["points_available"] == 100
