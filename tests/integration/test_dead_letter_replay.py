"""Dead letters an operator can work with, against the real broker and PostgreSQL: a record
the use case refused is listed by reason, shown with its original, and after the fix a
replay by reason applies it exactly once; a second replay is "already_replayed"; who
replayed it is on record; the admin key guards it all."""

import uuid

import asyncpg
import httpx
from pydantic import SecretStr, TypeAdapter

from shared.http import create_service_app
from shared.pipeline import Batch, Subscription, pydantic_decoder
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from tests.integration.test_pipeline_runtime import MIGRATIONS, Ping, ping, wait_for_rows
from tests.support.hostile import eventually
from tests.support.kafka import produce

ADMIN = "admin-key-for-the-test"


class ToySettings(ServiceSettings):
    admin_api_key: SecretStr | None = None


class UnluckyApply:
    """Refuses 13 until the operator has 'fixed' the cause."""

    def __init__(self) -> None:
        self.fixed = False

    async def __call__(self, batch: Batch[Ping]) -> None:
        rows = []
        for item in batch.items:
            if item.event.n == 13 and not self.fixed:
                batch.refuse(item, "unlucky", [{"msg": "13 is not accepted yet"}])
            else:
                rows.append((item.event.event_id, item.record.topic, item.event.n))
        await batch.conn.executemany("INSERT INTO pings (event_id, topic, n) VALUES ($1, $2, $3)", rows)




async def test_a_refused_record_is_listed_shown_and_replayed_once_after_the_fix(base_env, kafka_bootstrap,
                                                                              database_url, topic_prefix):
    settings = ToySettings(**{k.lower(): v for k, v in base_env.items()}, admin_api_key=ADMIN)
    runtime = ServiceRuntime(settings, service="pipetest", schema="pipetest", migrations_dir=MIGRATIONS,
                             description="toy", topics=("pings.a", "pings.dlq"))
    apply = UnluckyApply()
    runtime.subscribe(Subscription(topic=settings.topic("pings.a"), consumer="pipetest.pings",
                                   decode=pydantic_decoder(TypeAdapter(Ping)), apply=apply,
                                   dead_letter_topic=settings.topic("pings.dlq"), door="pings consumer"))
    app = create_service_app(runtime, title="toy", description="toy")
    await runtime.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://toy",
                                     headers={"X-Admin-Key": ADMIN}) as http:
            pings = [ping(n) for n in range(10, 16)]
            await produce(kafka_bootstrap, settings.topic("pings.a"), pings, key_field="customer_id")
            assert await wait_for_rows(database_url, 5) == 5

            async def listed():
                page = (await http.get("/v1/admin/dead-letters", params={"reason": "unlucky"})).json()
                return page if page["items"] else None
            page = await eventually(listed)
            assert page["counts_by_reason"] == {"unlucky": 1}
            letter = page["items"][0]
            assert letter["original_topic"] == settings.topic("pings.a") and letter["replayed_at"] is None
            shown = (await http.get(f"/v1/admin/dead-letters/{letter['dead_letter_id']}")).json()
            assert '"n": 13' in shown["original"] and shown["errors"] == [{"msg": "13 is not accepted yet"}]

            apply.fixed = True
            first = (await http.post("/v1/admin/dead-letters/replay",
                                     json={"reason": "unlucky", "actor": "ops-anna"})).json()
            assert [o["outcome"] for o in first["outcomes"]] == ["replayed"]
            assert await wait_for_rows(database_url, 6) == 6
            again = (await http.post("/v1/admin/dead-letters/replay",
                                     json={"ids": [letter["dead_letter_id"], str(uuid.uuid4())],
                                           "actor": "ops-bob"})).json()
            assert sorted(o["outcome"] for o in again["outcomes"]) == ["already_replayed", "not_found"]
            after = (await http.get(f"/v1/admin/dead-letters/{letter['dead_letter_id']}")).json()
            assert after["replayed_by"] == "ops-anna" and after["replayed_at"] is not None

            assert (await http.get("/v1/admin/dead-letters", headers={"X-Admin-Key": "wrong"})).status_code == 401
            assert (await http.post("/v1/admin/dead-letters/replay",
                                    json={"actor": "x"})).status_code == 422
    finally:
        await runtime.stop()
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pipetest.pings WHERE n = 13") == 1
    finally:
        await conn.close()
