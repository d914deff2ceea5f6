"""The shared inbox, transactional outbox and relay, and migration runner, as reusable pieces:
a tiny service of our own (one state table in its own schema) against the real PostgreSQL
and the real broker."""

import asyncio
import json
import os
import signal
import time
from datetime import datetime, timezone
from decimal import Decimal
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import RecordListTooLargeError

from deploy.local.infra import free_port, start_broker, stop_process_group
from shared.events import derived_event_id, envelope
from shared.events.purchases import PurchaseLine, PurchasePayload, PurchaseRecorded
from shared.db import SHARED_MIGRATIONS, create_pool, migrate
from shared.inbox import claim_new
from shared.kafka import create_producer
from shared.outbox import OutboxMessage, OutboxRelay, enqueue
from shared.settings import ServiceSettings
from shared.topics import ensure_topics
from tests.support.kafka import consume

pytestmark = pytest.mark.asyncio(loop_scope="session")

CONSUMER = "boxes.test"
KEYS = ("alice", "bob", "carol", "dave", "erin")

STATE_SQL = """
CREATE TABLE accounts (customer_id text PRIMARY KEY, balance_points bigint NOT NULL DEFAULT 0);
"""


class CrashError(ConnectionError):
    """What our fake producer raises: the process "dies" in the middle of a relay round."""


class _Wrapped:
    """A real producer behind the relay's interface (partitions, batches), to be wrapped."""

    def __init__(self, real: AIOKafkaProducer) -> None:
        self._real = real
        self._max_request_size = real._max_request_size

    async def partitions_for(self, topic):
        return await self._real.partitions_for(topic)

    def create_batch(self):
        return self._real.create_batch()

    async def send(self, topic, value=None, key=None, headers=None):
        return await self._real.send(topic, value, key=key, headers=headers)


class FlakyProducer(_Wrapped):
    """A real producer whose connection is lost after `fail_after` record batches, as a
    broker connection lost in the middle of a relay round would. Earlier batches really
    reach the broker; `sent` counts their records."""

    def __init__(self, real: AIOKafkaProducer, *, fail_after: int) -> None:
        super().__init__(real)
        self._left = fail_after
        self.sent = 0

    async def send_batch(self, batch, topic, *, partition):
        if self._left == 0:
            raise CrashError("connection to the broker lost")
        self._left -= 1
        self.sent += batch.record_count()
        return await self._real.send_batch(batch, topic, partition=partition)


class PickyProducer(_Wrapped):
    """A real producer in front of a broker that refuses any record batch larger than
    `limit` bytes (as a topic's max.message.bytes would; the embedded broker enforces none)."""

    def __init__(self, real: AIOKafkaProducer, *, limit: int) -> None:
        super().__init__(real)
        self.limit = limit
        self.refused = 0

    async def send_batch(self, batch, topic, *, partition):
        if batch.size() > self.limit:
            self.refused += 1
            raise RecordListTooLargeError(f"batch of {batch.size()} bytes over {self.limit}")
        return await self._real.send_batch(batch, topic, partition=partition)


class GatedProducer(_Wrapped):
    """A real producer whose first send waits until the test opens the gate: the relay using
    it holds its claimed rows locked for as long as the test wants."""

    def __init__(self, real: AIOKafkaProducer) -> None:
        super().__init__(real)
        self.claimed = asyncio.Event()
        self.gate = asyncio.Event()
        self.sent = 0

    async def send_batch(self, batch, topic, *, partition):
        self.claimed.set()
        await self.gate.wait()
        self.sent += batch.record_count()
        return await self._real.send_batch(batch, topic, partition=partition)


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def migrations_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_accounts.sql").write_text(STATE_SQL)
    return folder


@pytest.fixture(scope="module")
def shared_db(pg_cluster) -> str:
    """One database for this module (creating one per test costs seconds on a busy machine);
    every test gets its own schema in it, so tests still never see each other's rows."""
    name = f"t_boxes_{uuid.uuid4().hex[:10]}"
    pg_cluster.psql("postgres", f'CREATE DATABASE "{name}"')
    return pg_cluster.dsn(name)


@pytest.fixture
def schema() -> str:
    return f"boxes_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(kafka_bootstrap: str, shared_db: str, topic_prefix: str) -> ServiceSettings:
    return ServiceSettings(kafka_bootstrap_servers=kafka_bootstrap, database_url=shared_db,
                           topic_prefix=topic_prefix, topic_partitions=4)


@pytest.fixture
async def pool(settings: ServiceSettings, schema: str, migrations_dir: Path):
    await migrate(settings.database_url, schema=schema, migrations_dir=migrations_dir)
    pool = await create_pool(settings.database_url, schema=schema, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def topic(settings: ServiceSettings) -> str:
    await ensure_topics(settings, ("boxes.events",))
    return settings.topic("boxes.events")


@pytest.fixture
async def producer(settings: ServiceSettings):
    producer = create_producer(settings, client_id="boxes-outbox")
    await producer.start()
    yield producer
    await producer.stop()


# ---- helpers ------------------------------------------------------------------------------


def messages_for(topic: str, count: int, *, start: int = 0) -> list[OutboxMessage]:
    """`count` events spread over a few keys; `seq` is the order they were written in."""
    out = []
    for seq in range(start, start + count):
        key = KEYS[seq % len(KEYS)]
        value = json.dumps({"id": str(uuid.uuid4()), "key": key, "seq": seq, "amount_points": 1}).encode()
        out.append(OutboxMessage(topic=topic, key=key, value=value, headers={"type": "PointsEarned"}))
    return out


async def apply_and_enqueue(conn: asyncpg.Connection, messages: Sequence[OutboxMessage]) -> None:
    """A use case of our tiny service: a state change and its events, one transaction."""
    async with conn.transaction():
        for m in messages:
            await conn.execute(
                "INSERT INTO accounts (customer_id, balance_points) VALUES ($1, 1) "
                "ON CONFLICT (customer_id) DO UPDATE SET balance_points = accounts.balance_points + 1", m.key)
        await enqueue(conn, messages)


async def drain(relay: OutboxRelay) -> int:
    total = 0
    while (n := await relay.publish_once()) > 0:
        total += n
    return total


async def outbox_rows(pool: asyncpg.Pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM outbox")


async def topic_contents(bootstrap: str, topic: str, *, at_least: int, quiet_s: float = 0.5) -> list[dict]:
    """Everything on the topic: read until `at_least` arrived and then nothing more for
    `quiet_s`, so that an extra (duplicate) message is seen too."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[dict] = []
        deadline = time.monotonic() + 20
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                out += [{**json.loads(r.value), "_key": r.key.decode() if r.key else None} for r in records]
            if any(batch.values()):
                last_new = time.monotonic()
            elif len(out) >= at_least and time.monotonic() - last_new > quiet_s:
                break
        assert len(out) >= at_least, f"only {len(out)} of {at_least} messages arrived"
        return out
    finally:
        await consumer.stop()


def seqs_per_key(events: list[dict], *, first_occurrence: bool = False) -> dict[str, list[int]]:
    """Per key, the `seq` numbers in the order the topic holds them. With first_occurrence,
    a re-sent event counts where it first appeared (what an inbox-guarded consumer applies)."""
    seen: set[str] = set()
    out: dict[str, list[int]] = defaultdict(list)
    for e in events:
        assert e["_key"] == e["key"]
        if first_occurrence and e["id"] in seen:
            continue
        seen.add(e["id"])
        out[e["key"]].append(e["seq"])
    return dict(out)


def written_per_key(messages: Sequence[OutboxMessage]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        out[m.key].append(json.loads(m.value)["seq"])
    return dict(out)


def ids(messages: Sequence[OutboxMessage]) -> set[str]:
    return {json.loads(m.value)["id"] for m in messages}


# ---- outbox and relay ---------------------------------------------------------------------


async def test_rows_committed_before_a_crash_are_all_published_by_a_fresh_relay(settings, schema, pool, topic,
                                                                              kafka_bootstrap):
    written = messages_for(topic, 40)
    async with pool.acquire() as conn:
        await apply_and_enqueue(conn, written)
    # The process dies here: committed, never published. A new process starts from scratch.
    await pool.close()
    fresh_pool = await create_pool(settings.database_url, schema=schema)
    fresh_producer = create_producer(settings, client_id="boxes-outbox-2")
    await fresh_producer.start()
    try:
        assert await drain(OutboxRelay(fresh_pool, fresh_producer, batch_size=15)) == 40
        events = await topic_contents(kafka_bootstrap, topic, at_least=40)
        assert {e["id"] for e in events} == ids(written) and len(events) == 40
        assert seqs_per_key(events) == written_per_key(written)
        assert await outbox_rows(fresh_pool) == 0
        assert await fresh_pool.fetchval("SELECT sum(balance_points) FROM accounts") == 40
    finally:
        await fresh_producer.stop()
        await fresh_pool.close()


async def test_a_relay_dying_mid_round_loses_nothing_and_a_later_round_publishes_everything(
        pool, topic, producer, kafka_bootstrap):
    written = messages_for(topic, 30)
    async with pool.acquire() as conn:
        await apply_and_enqueue(conn, written)
    flaky = FlakyProducer(producer, fail_after=2)  # 4 partitions: two batches go, then the connection is lost
    with pytest.raises(CrashError):
        await OutboxRelay(pool, flaky, batch_size=100).publish_once()
    assert 0 < flaky.sent < 30
    assert await outbox_rows(pool) == 30  # the round's transaction rolled back: nothing deleted

    assert await drain(OutboxRelay(pool, producer, batch_size=100)) == 30
    events = await topic_contents(kafka_bootstrap, topic, at_least=30 + flaky.sent)
    assert {e["id"] for e in events} == ids(written)
    # At-least-once: the records sent before the crash arrive twice, nothing else does.
    resent = [e["seq"] for e in events if sum(x["id"] == e["id"] for x in events) > 1]
    assert len(set(resent)) == flaky.sent and len(events) == 30 + flaky.sent
    assert seqs_per_key(events, first_occurrence=True) == written_per_key(written)
    assert await outbox_rows(pool) == 0


async def test_an_unreachable_broker_leaves_the_rows_in_the_outbox_until_a_later_round(
        pool, topic, producer, kafka_bootstrap):
    port = free_port()
    doomed = start_broker(port, log_path=Path(tempfile.gettempdir()) / f"loyalty-test-doomed-broker-{port}.log")
    unlucky = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{port}", acks="all", request_timeout_ms=1000)
    try:
        await unlucky.start()
        await unlucky.send_and_wait(topic, b"warm-up")  # metadata known: sends go to the accumulator
        os.killpg(doomed.pid, signal.SIGKILL)  # the broker dies
        doomed.wait(timeout=5)

        first = messages_for(topic, 12)
        async with pool.acquire() as conn:
            await apply_and_enqueue(conn, first)
        with pytest.raises(Exception) as failed:
            await OutboxRelay(pool, unlucky, batch_size=100).publish_once()
        assert not isinstance(failed.value, AssertionError)
        assert await outbox_rows(pool) == 12
    finally:
        stop_process_group(doomed.pid)
        await unlucky.stop()

    later = messages_for(topic, 8, start=12)  # written while the broker was away
    async with pool.acquire() as conn:
        await apply_and_enqueue(conn, later)
    assert await drain(OutboxRelay(pool, producer, batch_size=5)) == 20
    events = await topic_contents(kafka_bootstrap, topic, at_least=20)
    assert len(events) == 20 and {e["id"] for e in events} == ids(first + later)
    assert seqs_per_key(events) == written_per_key(first + later)
    assert await outbox_rows(pool) == 0


async def test_two_relays_at_once_publish_every_row_exactly_once_and_one_at_a_time(settings, schema, pool, topic, producer,
                                                                kafka_bootstrap):
    written = messages_for(topic, 1500)
    async with pool.acquire() as conn:
        await apply_and_enqueue(conn, written)
    other_pool = await create_pool(settings.database_url, schema=schema)
    other_producer = create_producer(settings, client_id="boxes-outbox-other")
    await other_producer.start()
    try:
        gated = GatedProducer(producer)
        first, second = OutboxRelay(pool, gated, batch_size=100), OutboxRelay(other_pool, other_producer, batch_size=100)
        first_round = asyncio.create_task(first.publish_once())
        try:
            await asyncio.wait_for(gated.claimed.wait(), timeout=10)
            # The first relay is mid-round. The second publishes nothing meanwhile (it neither
            # waits nor overtakes: a key's later rows must not go out before its earlier ones).
            assert await asyncio.wait_for(second.publish_once(), timeout=10) == 0
        finally:
            gated.gate.set()  # never leave the first round hanging on a failure
        assert await first_round == 100
        counts = await asyncio.gather(drain(first), drain(second))
        assert sum(counts) == 1400
    finally:
        await other_producer.stop()
        await other_pool.close()
    events = await topic_contents(kafka_bootstrap, topic, at_least=1500)
    assert len(events) == 1500 and {e["id"] for e in events} == ids(written)
    assert await outbox_rows(pool) == 0


async def test_a_row_the_broker_can_never_take_is_set_aside_and_does_not_block_the_rest(pool, topic, producer,
                                                                                       kafka_bootstrap):
    before, after = messages_for(topic, 3), messages_for(topic, 3, start=4)
    too_large = OutboxMessage(topic=topic, key="k-big", value=b'{"id": "big", "pad": "' + b"x" * 5_000_000 + b'"}')
    async with pool.acquire() as conn:
        await apply_and_enqueue(conn, [*before, too_large, *after])
    assert await drain(OutboxRelay(pool, producer)) == 7
    events = await topic_contents(kafka_bootstrap, topic, at_least=6)
    assert {e["id"] for e in events} == ids(before) | ids(after)
    assert await outbox_rows(pool) == 0
    [failed] = await pool.fetch("SELECT key, error FROM outbox_failed")
    assert failed["key"] == "k-big" and "TooLarge" in failed["error"]


async def test_the_running_relay_reports_the_rows_still_waiting(pool, topic, producer):
    from shared.outbox import OUTBOX_PENDING

    async with pool.acquire() as conn:
        await apply_and_enqueue(conn, messages_for(topic, 3))
    relay = OutboxRelay(pool, producer, batch_size=1, poll_interval_ms=10)
    relay.start()
    try:
        for _ in range(200):
            if await outbox_rows(pool) == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        await relay.stop()
    assert await outbox_rows(pool) == 0
    assert OUTBOX_PENDING._value.get() == 2  # sampled after the first round of one row


async def test_a_rolled_back_transaction_leaves_no_outbox_rows_and_publishes_nothing(pool, topic, producer,
                                                                                   kafka_bootstrap):
    doomed = messages_for(topic, 5)
    with pytest.raises(ZeroDivisionError):
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, doomed)
            await conn.execute("INSERT INTO accounts (customer_id) VALUES ('zed')")
            1 / 0  # the use case fails after writing
    assert await outbox_rows(pool) == 0
    assert await pool.fetchval("SELECT count(*) FROM accounts") == 0
    marker = messages_for(topic, 1, start=99)
    async with pool.acquire() as conn:
        await apply_and_enqueue(conn, marker)
    assert await drain(OutboxRelay(pool, producer)) == 1
    events = await topic_contents(kafka_bootstrap, topic, at_least=1)
    assert [e["id"] for e in events] == [e for e in ids(marker)]


async def test_the_running_relay_publishes_on_wake_and_drains_on_stop(pool, topic, producer, kafka_bootstrap):
    # A poll interval far beyond the test: only wake() and stop() can make it publish.
    relay = OutboxRelay(pool, producer, poll_interval_ms=600_000)
    relay.start()
    try:
        woken = messages_for(topic, 3)
        async with pool.acquire() as conn:
            await apply_and_enqueue(conn, woken)
        relay.wake()
        events = await consume(kafka_bootstrap, topic, count=3, timeout_s=10)
        assert {e["id"] for e in events} == ids(woken)
        left_behind = messages_for(topic, 2, start=3)
        async with pool.acquire() as conn:
            await apply_and_enqueue(conn, left_behind)
    finally:
        await relay.stop()
    assert await outbox_rows(pool) == 0
    events = await topic_contents(kafka_bootstrap, topic, at_least=5)
    assert {e["id"] for e in events} == ids(woken + left_behind)


async def test_an_outbox_event_arrives_as_its_envelope_with_key_and_type_and_correlation_headers(
        pool, topic, producer, kafka_bootstrap):
    occurred_at = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
    payload = PurchasePayload(purchase_id="p-1", type="sale", source="pos", store_id="s-1", occurred_at=occurred_at,
                              currency="PLN", lines=[PurchaseLine(line_id="l1", sku="x", category="c", quantity=2,
                                                                  unit_price=Decimal("12.50"))],
                              total=Decimal("25.00"), door="kafka")
    event = envelope(PurchaseRecorded, event_id=derived_event_id("test", "p-1"), occurred_at=occurred_at,
                     producer="boxes", correlation_id="corr-42", customer_id="alice", payload=payload)
    async with pool.acquire() as conn, conn.transaction():
        await enqueue(conn, [OutboxMessage.event(topic, event, key="alice")])
    assert await drain(OutboxRelay(pool, producer)) == 1

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert tps, "the topic has partitions"
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records = []
        for _ in range(100):
            records += [r for batch in (await consumer.getmany(timeout_ms=100)).values() for r in batch]
            if records:
                break
    finally:
        await consumer.stop()
    [record] = records
    assert record.key == b"alice"
    assert dict(record.headers) == {"type": b"PurchaseRecorded", "correlation_id": b"corr-42"}
    received = PurchaseRecorded.model_validate_json(record.value)
    assert received == event and received.payload.total == Decimal("25.00")
    assert json.loads(record.value)["payload"]["lines"][0]["unit_price"] == "12.50"  # money as a string


# ---- inbox --------------------------------------------------------------------------------


async def apply_points(conn: asyncpg.Connection, events: Sequence[tuple[uuid.UUID, str, int]], *,
                       crash_before_commit: bool = False) -> set[uuid.UUID]:
    """An inbox-guarded consumer: (event_id, customer_id, amount_points) events applied in
    one transaction with their claims."""
    async with conn.transaction():
        new = await claim_new(conn, consumer=CONSUMER, event_ids=[e[0] for e in events])
        todo = set(new)
        for event_id, customer_id, amount_points in events:
            if event_id in todo:
                todo.discard(event_id)  # a duplicate inside the batch is applied once
                await conn.execute(
                    "INSERT INTO accounts VALUES ($1, $2) ON CONFLICT (customer_id) DO UPDATE "
                    "SET balance_points = accounts.balance_points + EXCLUDED.balance_points", customer_id, amount_points)
        if crash_before_commit:
            raise CrashError("process died before commit")
    return new


async def balances(pool: asyncpg.Pool) -> dict[str, int]:
    return {r["customer_id"]: r["balance_points"] for r in await pool.fetch("SELECT * FROM accounts")}


async def test_claim_new_returns_only_ids_not_seen_before_by_that_consumer(pool):
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with pool.acquire() as conn:
        assert await claim_new(conn, consumer=CONSUMER, event_ids=[a, b]) == {a, b}
        assert await claim_new(conn, consumer=CONSUMER, event_ids=[a, b, c]) == {c}
        assert await claim_new(conn, consumer=CONSUMER, event_ids=[]) == set()
        # Another consumer has its own inbox: the same events are new to it.
        assert await claim_new(conn, consumer="someone.else", event_ids=[a, c]) == {a, c}


async def test_a_redelivered_batch_changes_nothing(pool):
    batch = [(uuid.uuid4(), "alice", 10), (uuid.uuid4(), "bob", 5), (uuid.uuid4(), "alice", 1)]
    async with pool.acquire() as conn:
        assert await apply_points(conn, batch) == {e[0] for e in batch}
        before = await balances(pool)
        assert await apply_points(conn, batch) == set()
        assert await apply_points(conn, list(reversed(batch[:2]))) == set()
    assert before == {"alice": 11, "bob": 5}
    assert await balances(pool) == before


async def test_claims_roll_back_with_the_transaction_so_the_events_are_processed_again(pool):
    batch = [(uuid.uuid4(), "alice", 10), (uuid.uuid4(), "bob", 5)]
    async with pool.acquire() as conn:
        with pytest.raises(CrashError):
            await apply_points(conn, batch, crash_before_commit=True)
        assert await balances(pool) == {}
        assert await pool.fetchval("SELECT count(*) FROM inbox") == 0
        assert await apply_points(conn, batch) == {e[0] for e in batch}  # the redelivery
    assert await balances(pool) == {"alice": 10, "bob": 5}


async def test_duplicates_inside_one_batch_are_claimed_and_applied_once(pool):
    a, b = uuid.uuid4(), uuid.uuid4()
    async with pool.acquire() as conn:
        assert await apply_points(conn, [(a, "alice", 10), (a, "alice", 10), (b, "bob", 1), (a, "alice", 10)]) == {a, b}
    assert await balances(pool) == {"alice": 10, "bob": 1}
    assert await pool.fetchval("SELECT count(*) FROM inbox WHERE consumer = $1", CONSUMER) == 2


async def test_two_transactions_racing_for_the_same_event_apply_it_once(pool):
    event = (uuid.uuid4(), "alice", 7)
    async with pool.acquire() as first, pool.acquire() as second:
        tx = first.transaction()
        await tx.start()
        assert await claim_new(first, consumer=CONSUMER, event_ids=[event[0]]) == {event[0]}
        # The second claim waits on the first transaction's uncommitted row...
        racer = asyncio.create_task(apply_points(second, [event]))
        await asyncio.sleep(0.2)
        assert not racer.done()
        await tx.rollback()  # ...and gets the event once the first one gives up on it.
        assert await asyncio.wait_for(racer, timeout=5) == {event[0]}

        tx = first.transaction()
        await tx.start()
        racer = asyncio.create_task(apply_points(second, [(uuid.uuid4(), "bob", 1), event]))
        assert await claim_new(first, consumer=CONSUMER, event_ids=[event[0]]) == set()
        await tx.commit()
        assert event[0] not in await asyncio.wait_for(racer, timeout=5)
    assert await balances(pool) == {"alice": 7, "bob": 1}


# ---- migrations ---------------------------------------------------------------------------


def shared_names() -> list[str]:
    return [f"shared/{p.name}" for p in sorted(SHARED_MIGRATIONS.glob("*.sql"))]


def write_service_migrations(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    # Each file depends on the one before (and the last on the shared outbox table), so
    # any other order fails.
    (folder / "0001_accounts.sql").write_text(STATE_SQL)
    (folder / "0002_tier.sql").write_text("ALTER TABLE accounts ADD COLUMN tier text NOT NULL DEFAULT 'basic';")
    (folder / "0010_views.sql").write_text(
        "CREATE VIEW account_tiers AS SELECT customer_id, tier FROM accounts;\n"
        "CREATE INDEX outbox_created_idx ON outbox (created_at);")


async def recorded_migrations(dsn: str, schema: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r["name"] for r in await conn.fetch(
            f'SELECT name FROM "{schema}".schema_migrations ORDER BY applied_at, name')]
    finally:
        await conn.close()


async def test_migrate_applies_shared_then_service_files_in_order_and_records_them(shared_db, schema, tmp_path):
    folder = tmp_path / "m"
    write_service_migrations(folder)
    applied = await migrate(shared_db, schema=schema, migrations_dir=folder)
    expected = shared_names() + ["0001_accounts.sql", "0002_tier.sql", "0010_views.sql"]
    assert applied == expected
    assert sorted(await recorded_migrations(shared_db, schema)) == sorted(expected)
    conn = await asyncpg.connect(shared_db)
    try:
        tables = {r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)}
        assert {"inbox", "outbox", "accounts", "account_tiers", "schema_migrations"} <= tables
    finally:
        await conn.close()


async def test_a_second_migrate_applies_nothing_and_a_new_file_alone(shared_db, schema, tmp_path):
    folder = tmp_path / "m"
    write_service_migrations(folder)
    await migrate(shared_db, schema=schema, migrations_dir=folder)
    assert await migrate(shared_db, schema=schema, migrations_dir=folder) == []
    (folder / "0011_more.sql").write_text("ALTER TABLE accounts ADD COLUMN note text;")
    assert await migrate(shared_db, schema=schema, migrations_dir=folder) == ["0011_more.sql"]


async def test_concurrent_migrations_do_not_fail_and_apply_each_file_once(shared_db, schema, tmp_path):
    folder = tmp_path / "m"
    write_service_migrations(folder)
    results = await asyncio.gather(*(migrate(shared_db, schema=schema, migrations_dir=folder) for _ in range(3)))
    expected = shared_names() + ["0001_accounts.sql", "0002_tier.sql", "0010_views.sql"]
    assert sorted(name for applied in results for name in applied) == sorted(expected)
    assert sorted(await recorded_migrations(shared_db, schema)) == sorted(expected)


async def test_a_failing_migration_is_rolled_back_and_not_recorded(shared_db, schema, tmp_path):
    folder = tmp_path / "m"
    write_service_migrations(folder)
    (folder / "0011_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nALTER TABLE no_such_table ADD COLUMN x int;")
    with pytest.raises(asyncpg.UndefinedTableError):
        await migrate(shared_db, schema=schema, migrations_dir=folder)
    names = await recorded_migrations(shared_db, schema)
    assert "0011_broken.sql" not in names and "0010_views.sql" in names
    conn = await asyncpg.connect(shared_db)
    try:
        assert await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".half_done') is None
        assert await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".accounts') is not None
    finally:
        await conn.close()


async def test_the_relay_puts_a_key_on_the_partition_the_producer_itself_would(pool, topic, producer):
    """The relay sends record batches with partitions it chose: they must be the ones a
    plain send() picks, so a key's events share one partition however they were published."""
    relay = OutboxRelay(pool, producer)
    for key in [*KEYS, "anonymous:store-7", "zażółć", "c-" * 40]:
        sent = await producer.send_and_wait(topic, b"{}", key=key.encode())
        assert await relay._partition_of(topic, key.encode()) == sent.partition


async def test_a_batch_the_broker_refuses_is_sent_again_row_by_row_and_only_the_culprit_is_set_aside(
        pool, topic, producer, kafka_bootstrap):
    small = messages_for(topic, 20)
    big = OutboxMessage(topic=topic, key=KEYS[0], value=json.dumps(
        {"id": "big", "key": KEYS[0], "seq": 999, "pad": "x" * 6_000}).encode())
    async with pool.acquire() as conn:
        await apply_and_enqueue(conn, [*small[:10], big, *small[10:]])
    picky = PickyProducer(producer, limit=5_000)  # each small row fits alone, the big one never
    assert await drain(OutboxRelay(pool, picky, batch_size=100)) == 21
    assert picky.refused >= 2  # a batch with the big row, then the big row alone
    events = await topic_contents(kafka_bootstrap, topic, at_least=20)
    assert {e["id"] for e in events} == ids(small)
    assert seqs_per_key(events, first_occurrence=True) == written_per_key(small)
    assert await outbox_rows(pool) == 0
    [failed] = await pool.fetch("SELECT key, error FROM outbox_failed")
    assert failed["key"] == KEYS[0] and "RecordListTooLarge" in failed["error"]


async def test_a_migration_waiting_for_a_lock_lets_the_running_transactions_through_and_is_applied_after(
        shared_db, schema, tmp_path):
    """A migration that needs a table the services are using gives its turn up after its lock
    timeout (instead of queueing every later transaction behind it) and is tried again."""
    folder = tmp_path / "m"
    write_service_migrations(folder)
    await migrate(shared_db, schema=schema, migrations_dir=folder)
    (folder / "0011_more.sql").write_text("ALTER TABLE accounts ADD COLUMN note text;")
    in_flight, later = await asyncpg.connect(shared_db), await asyncpg.connect(shared_db)
    try:
        tx = in_flight.transaction()
        await tx.start()
        await in_flight.execute(f'LOCK TABLE "{schema}".accounts IN ROW EXCLUSIVE MODE')  # a batch in flight
        migration = asyncio.create_task(migrate(shared_db, schema=schema, migrations_dir=folder,
                                                lock_timeout_s=0.2, lock_attempts=100))
        await asyncio.sleep(0.5)
        # A transaction that comes after the migration still gets its lock (it would queue
        # behind the migration's ACCESS EXCLUSIVE request for as long as that waits).
        async with later.transaction():
            await later.execute("SET LOCAL lock_timeout = '2s'")
            await later.execute(f'LOCK TABLE "{schema}".accounts IN ROW EXCLUSIVE MODE')
        assert not migration.done()
        await tx.commit()
        assert await asyncio.wait_for(migration, timeout=10) == ["0011_more.sql"]
    finally:
        await in_flight.close()
        await later.close()
