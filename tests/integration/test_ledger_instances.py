"""Two ledger instances in one consumer group, one database: a program version saved through
one of them governs the inputs the other applies, from the version's time, without waiting
for the other's scheduler tick. Real broker and PostgreSQL."""

import asyncio
import uuid
from datetime import datetime

import pytest
from aiokafka.partitioner import murmur2

from services.ledger import repository as repo
from services.ledger.settings import LedgerSettings
from shared.db import transaction
from shared.topics import POINTS_EVENTS, PURCHASES_RECORDED
from tests.support.hostile import eventually
from tests.support.kafka import consume, produce, unique
from tests.support.ledger import ADMIN, ledger_settings, purchase_recorded, running_ledger

pytestmark = pytest.mark.asyncio(loop_scope="session")

PARTITIONS = 4


@pytest.fixture
def settings(base_env) -> LedgerSettings:
    return ledger_settings(base_env)  # scheduler_interval_s=3600: no tick refreshes the program during the test


def purchases_partitions(app, topic: str) -> set[int]:
    return {tp.partition for consumer in app.state.runtime.consumers
            for tp in consumer.assignment() if tp.topic == topic}


def partition_of(customer_id: str) -> int:
    return (murmur2(customer_id.encode()) & 0x7FFFFFFF) % PARTITIONS


async def save_kept_waiting(client, program: dict, conn, *, grocery: str, while_: str) -> tuple[asyncio.Task, datetime]:
    """PUT a program change while `conn` holds off saves: it must still be waiting a second
    later. Returns the save and the database's time just before the caller lets it through."""
    save = asyncio.create_task(client.put("/v1/admin/program", headers=ADMIN,
                                          json={**program, "category_multipliers": {"grocery": grocery}}))
    await asyncio.sleep(1.0)
    assert not save.done(), f"a program version was saved while {while_}"
    return save, await conn.fetchval("SELECT clock_timestamp()")


async def test_a_program_version_saved_through_one_instance_governs_what_the_other_applies(settings, kafka_bootstrap):
    topic = settings.topic(PURCHASES_RECORDED)
    async with running_ledger(settings) as (app_a, client_a), running_ledger(settings) as (app_b, _):
        for _ in range(150):  # the group rebalances when the second instance joins
            a, b = purchases_partitions(app_a, topic), purchases_partitions(app_b, topic)
            if a and b and a | b == set(range(PARTITIONS)) and not a & b:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"the partitions were not split between the instances: {a} / {b}")
        program = (await client_a.get("/v1/admin/program", headers=ADMIN)).json()["program"]
        changed = await client_a.put("/v1/admin/program", headers=ADMIN,
                                     json={**program, "category_multipliers": {"grocery": "3"}})
        assert changed.status_code == 200 and changed.json()["version"] == 2
        customers = [unique("c-") for _ in range(16)]
        await produce(kafka_bootstrap, topic, [purchase_recorded(c, amounts=("10.00",)) for c in customers],
                      key_field="customer_id")
        earned = [e for e in await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=16, distinct="event_id")
                  if e["type"] == "PointsEarned"]
    on_b = [c for c in customers if partition_of(c) in b]
    assert on_b, "no purchase went to the instance that did not save the version"
    assert sorted(e["customer_id"] for e in earned) == sorted(customers)
    # The grocery multiplier of version 2 (x3), also for the customers instance B applied.
    assert {(e["customer_id"], e["payload"]["amount_points"], e["payload"]["rule_version"]) for e in earned} == {
        (c, 30, 2) for c in customers}


async def test_a_version_is_not_saved_while_inputs_are_being_applied_and_takes_effect_after_them(settings):
    """The save waits for the transactions applying inputs (in any instance); its time is taken
    once they are done, so no input applied before it could have earned under it."""
    async with running_ledger(settings) as (app, client):
        program = (await client.get("/v1/admin/program", headers=ADMIN)).json()["program"]
        pool = app.state.runtime.pool
        async with pool.acquire() as conn:
            async with transaction(conn, opening=repo.APPLYING_INPUTS):
                save, released_at = await save_kept_waiting(client, program, conn, grocery="2",
                                                            while_="inputs were being applied")
            saved = await asyncio.wait_for(save, timeout=10)
    assert saved.status_code == 200
    assert datetime.fromisoformat(saved.json()["effective_from"]) >= released_at


async def test_a_batch_being_applied_holds_off_a_save_which_then_takes_effect_after_it(settings, kafka_bootstrap):
    """The consumers' own transactions take the lock: a purchase batch stopped in the middle
    (its customer's row held by the test) keeps a program save waiting, and the purchase earns
    under the version in force before the save."""
    customer = unique("c-")
    async with running_ledger(settings) as (app, client):
        program = (await client.get("/v1/admin/program", headers=ADMIN)).json()["program"]
        created = await client.post("/v1/admin/adjustments", headers=ADMIN, json={
            "adjustment_id": str(uuid.uuid4()), "customer_id": customer, "amount_points": 1, "reason_code": "goodwill",
            "actor": "ops@test"})
        assert created.status_code == 201
        pool = app.state.runtime.pool
        async with pool.acquire() as holder:
            async with holder.transaction():
                await holder.execute("SELECT 1 FROM customers WHERE customer_id = $1 FOR UPDATE", customer)
                await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED),
                              [purchase_recorded(customer, amounts=("10.00",))], key=customer)
                # The purchase batch has begun (it holds program_versions) and waits for this
                # customer's row. Only that transaction is blocked by this one: another that
                # applies inputs (the adjustment coming back on ledger.adjustments, a duplicate)
                # holds the same lock for a moment, and taking it for the batch would let the
                # save in before the purchase.
                await eventually(lambda: holder.fetchval(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                    " WHERE c.relname = 'program_versions' AND l.mode = 'RowExclusiveLock' AND l.granted"
                    " AND pg_backend_pid() = ANY(pg_blocking_pids(l.pid))"), timeout_s=60)
                save, released_at = await save_kept_waiting(client, program, holder, grocery="3",
                                                            while_="a batch was being applied")
        saved = await asyncio.wait_for(save, timeout=10)
        earned = [e for e in await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), count=2)
                  if e["type"] == "PointsEarned"]
    assert saved.status_code == 200 and saved.json()["version"] == 2
    assert datetime.fromisoformat(saved.json()["effective_from"]) >= released_at
    assert [(e["payload"]["amount_points"], e["payload"]["rule_version"]) for e in earned] == [(10, 1)]
