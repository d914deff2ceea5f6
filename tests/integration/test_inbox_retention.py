"""Inbox retention against real PostgreSQL: rows older than the topics' retention plus the
margin are deleted in chunks, newer ones kept; an event whose row was swept is new again
(why a replay from offset 0 starts from an empty database)."""

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from shared.db import create_pool, migrate
from shared.inbox import claim_new, inbox_retention_job, sweep_inbox
from shared.settings import ServiceSettings

pytestmark = pytest.mark.asyncio(loop_scope="session")

NOW = datetime.now(timezone.utc)


@pytest.fixture
async def pool(database_url, tmp_path: Path):
    (tmp_path / "m").mkdir()
    await migrate(database_url, schema="boxes", migrations_dir=tmp_path / "m")  # the shared tables only
    pool = await create_pool(database_url, schema="boxes")
    yield pool
    await pool.close()


async def processed(pool: asyncpg.Pool, ages_days: list[float]) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in ages_days]
    await pool.executemany("INSERT INTO inbox (consumer, event_id, processed_at) VALUES ('c', $1, $2)",
                           [(i, NOW - timedelta(days=age)) for i, age in zip(ids, ages_days)])
    return ids


async def test_rows_past_the_retention_are_deleted_in_chunks_and_newer_ones_kept(pool):
    old = await processed(pool, [30.0] * 23 + [14.5])
    kept = await processed(pool, [13.9, 7.0, 0.0])
    deleted = await sweep_inbox(pool, older_than=NOW - timedelta(days=14), chunk_rows=5)
    assert deleted == len(old)
    left = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM inbox")}
    assert left == set(kept)
    assert await sweep_inbox(pool, older_than=NOW - timedelta(days=14), chunk_rows=5) == 0


async def test_the_sweep_uses_the_settings_and_an_event_swept_is_new_again(pool, database_url):
    [swept] = await processed(pool, [15.0])
    [recent] = await processed(pool, [13.0])
    settings = ServiceSettings(database_url=database_url, topic_retention_days=7, inbox_retention_margin_days=7,
                               inbox_sweep_chunk_rows=100)
    interval_s, name, job = inbox_retention_job(settings, lambda: pool)
    assert (interval_s, name) == (3600.0, "inbox-retention")
    await job()
    async with pool.acquire() as conn, conn.transaction():
        assert await claim_new(conn, consumer="c", event_ids=[swept, recent]) == {swept}


async def test_topics_kept_forever_keep_the_inbox_forever(database_url):
    settings = ServiceSettings(database_url=database_url, topic_retention_days=0)
    assert settings.inbox_keep_for() is None and inbox_retention_job(settings, lambda: None) is None
    assert ServiceSettings(topic_retention_days=3, inbox_retention_margin_days=1).inbox_keep_for() == timedelta(days=4)


async def test_the_old_rows_are_found_through_the_processed_at_index(pool):
    await processed(pool, [float(i % 40) for i in range(20_000)])
    await pool.execute("ANALYZE inbox")
    async with pool.acquire() as conn:
        await conn.execute("SET enable_seqscan = off")  # a small table: is the index there to use at all?
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN SELECT ctid FROM inbox WHERE processed_at < $1 LIMIT 5000", NOW - timedelta(days=14)))
        await conn.execute("RESET enable_seqscan")
    assert "inbox_processed_at" in plan, plan
