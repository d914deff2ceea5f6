"""An operator working with purchases.dlq, against the real broker and PostgreSQL: a purchase
refused at the Kafka door for a reason the operator can fix is listed, then, once the fix is
in (here: the age limit raised for a store whose tills had their clocks wrong), replayed by
reason and recorded exactly once; a second replay changes nothing. (An HTTP client is told
its refusal in the answer, 4xx: nothing of it is dead-lettered.)"""

from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from shared.topics import PURCHASES_RAW, PURCHASES_RECORDED
from tests.support.hostile import eventually
from tests.support.kafka import consume, produce
from tests.support.purchases import purchases_settings, running_purchases, sale

pytestmark = pytest.mark.asyncio(loop_scope="session")
ADMIN = {"X-Admin-Key": "purchases-admin-test-key"}


async def recorded(dsn: str, purchase_id: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM purchases.purchases WHERE purchase_id = $1", purchase_id)
    finally:
        await conn.close()




async def test_a_refused_purchase_is_replayed_once_after_the_fix(base_env, kafka_bootstrap):
    old = sale(customer_id="c-late", occurred_at=datetime.now(timezone.utc) - timedelta(days=500))
    strict = purchases_settings(base_env, admin_api_key=ADMIN["X-Admin-Key"])
    async with running_purchases(strict) as (_, client):
        await produce(kafka_bootstrap, strict.topic(PURCHASES_RAW), [old], key="c-late")

        async def listed():
            page = (await client.get("/v1/admin/dead-letters", headers=ADMIN,
                                     params={"reason": "timestamp_too_old"})).json()
            return page["items"]
        [letter] = await eventually(listed)
        over_http = sale(customer_id="c-http", occurred_at=datetime.now(timezone.utc) - timedelta(days=600))
        http_refused = await client.post("/v1/purchases", headers={"X-API-Key": "key-store-1"}, json=over_http)
    assert letter["door"] == "kafka" and letter["original_topic"] == strict.topic(PURCHASES_RAW)
    assert http_refused.status_code == 422
    assert await recorded(strict.database_url, over_http["purchase_id"]) == 0
    assert await recorded(strict.database_url, old["purchase_id"]) == 0

    fixed = purchases_settings(base_env, admin_api_key=ADMIN["X-Admin-Key"], max_purchase_age_days=1000)
    async with running_purchases(fixed) as (_, client):
        first = (await client.post("/v1/admin/dead-letters/replay", headers=ADMIN,
                                   json={"reason": "timestamp_too_old", "actor": "ops-anna"})).json()
        assert await eventually(lambda: recorded(fixed.database_url, old["purchase_id"])) == 1
        again = (await client.post("/v1/admin/dead-letters/replay", headers=ADMIN,
                                   json={"ids": [letter["dead_letter_id"]], "actor": "ops-anna"})).json()
        events = await consume(kafka_bootstrap, fixed.topic(PURCHASES_RECORDED), count=1)
    outcomes = {o["dead_letter_id"]: o["outcome"] for o in first["outcomes"]}
    assert outcomes[letter["dead_letter_id"]] == "replayed"
    assert list(outcomes.values()) == ["replayed"]
    assert [o["outcome"] for o in again["outcomes"]] == ["already_replayed"]
    assert [e["payload"]["purchase_id"] for e in events] == [old["purchase_id"]]
    assert await recorded(fixed.database_url, old["purchase_id"]) == 1
