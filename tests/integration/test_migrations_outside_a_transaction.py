"""The migration runner's files marked `-- migrate: no-transaction`: run statement by statement
outside a transaction (CREATE INDEX CONCURRENTLY, which PostgreSQL refuses inside one),
recorded once done, and safe to run again after a crash between the two. Real PostgreSQL."""

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest

from shared.db import migrate, statements

pytestmark = pytest.mark.asyncio(loop_scope="session")

TABLE = "CREATE TABLE things (id bigint PRIMARY KEY, owner text NOT NULL, open boolean NOT NULL);\n" \
        "INSERT INTO things SELECT g, 'o' || (g % 10), g % 3 = 0 FROM generate_series(1, 1000) g;"
CONCURRENT_INDEX = """-- migrate: no-transaction
-- An interrupted build leaves an INVALID index: dropped first, so the file can run again.
DROP INDEX CONCURRENTLY IF EXISTS things_open;
CREATE INDEX CONCURRENTLY things_open
    ON things (owner) WHERE open;
"""


@pytest.fixture(scope="module")
def shared_db(pg_cluster) -> str:
    name = f"t_migr_{uuid.uuid4().hex[:10]}"
    pg_cluster.create_database(name)
    return pg_cluster.dsn(name)


@pytest.fixture
def schema() -> str:
    return f"migr_{uuid.uuid4().hex[:10]}"


async def one(dsn: str, sql: str, *args):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(sql, *args)
    finally:
        await conn.close()


async def valid_index(dsn: str, schema: str, name: str) -> bool | None:
    row = await one(dsn, "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                         " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                    schema, name)
    return None if row is None else row["indisvalid"]


def folder_with(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    for name, sql in files.items():
        (folder / f"{name}.sql").write_text(sql)
    return folder


async def test_a_no_transaction_file_is_split_at_the_lines_ending_a_statement():
    assert statements(CONCURRENT_INDEX) == [
        "-- migrate: no-transaction\n-- An interrupted build leaves an INVALID index: dropped first, so the file can"
        " run again.\nDROP INDEX CONCURRENTLY IF EXISTS things_open;",
        "CREATE INDEX CONCURRENTLY things_open\n    ON things (owner) WHERE open;",
    ]
    assert statements("-- migrate: no-transaction\nVACUUM things\n") == ["-- migrate: no-transaction\nVACUUM things"]


async def test_a_marked_file_builds_its_index_concurrently_and_is_recorded(shared_db, schema, tmp_path):
    folder = folder_with(tmp_path, **{"0001_things": TABLE, "0002_things_open": CONCURRENT_INDEX})
    applied = await migrate(shared_db, schema=schema, migrations_dir=folder)
    assert applied[-2:] == ["0001_things.sql", "0002_things_open.sql"]
    assert await valid_index(shared_db, schema, "things_open") is True
    recorded = await one(shared_db, f'SELECT count(*) AS n FROM "{schema}".schema_migrations WHERE name = $1',
                         "0002_things_open.sql")
    assert recorded["n"] == 1
    assert await migrate(shared_db, schema=schema, migrations_dir=folder) == []


async def test_the_same_statement_without_the_marker_is_refused_by_postgresql(shared_db, schema, tmp_path):
    folder = folder_with(tmp_path, **{"0001_things": TABLE,
                                      "0002_things_open": CONCURRENT_INDEX.replace("-- migrate: no-transaction\n", "")})
    with pytest.raises(asyncpg.ActiveSQLTransactionError):
        await migrate(shared_db, schema=schema, migrations_dir=folder)
    assert await valid_index(shared_db, schema, "things_open") is None


async def test_a_marked_file_run_again_after_a_crash_before_it_was_recorded_leaves_one_valid_index(
        shared_db, schema, tmp_path):
    folder = folder_with(tmp_path, **{"0001_things": TABLE, "0002_things_open": CONCURRENT_INDEX})
    await migrate(shared_db, schema=schema, migrations_dir=folder)
    # As if the process died after the build, before recording it; and as if an earlier
    # build had been interrupted (an INVALID index of that name).
    conn = await asyncpg.connect(shared_db)
    try:
        await conn.execute(f'DELETE FROM "{schema}".schema_migrations WHERE name = $1', "0002_things_open.sql")
        await conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = $1::regclass",
                           f'"{schema}".things_open')
    finally:
        await conn.close()
    assert await valid_index(shared_db, schema, "things_open") is False
    assert await migrate(shared_db, schema=schema, migrations_dir=folder) == ["0002_things_open.sql"]
    assert await valid_index(shared_db, schema, "things_open") is True


async def test_a_marked_file_that_fails_is_not_recorded_and_the_next_run_tries_it_again(shared_db, schema, tmp_path):
    folder = folder_with(tmp_path, **{"0001_things": TABLE,
                                      "0002_broken": "-- migrate: no-transaction\nCREATE INDEX CONCURRENTLY x ON nope (a);\n"})
    with pytest.raises(asyncpg.UndefinedTableError):
        await migrate(shared_db, schema=schema, migrations_dir=folder)
    (folder / "0002_broken.sql").write_text(CONCURRENT_INDEX)
    assert await migrate(shared_db, schema=schema, migrations_dir=folder) == ["0002_broken.sql"]


async def test_instances_migrating_at_once_wait_for_each_other_without_deadlocking_the_concurrent_build(
        shared_db, schema, tmp_path):
    # A session blocked inside pg_advisory_lock would hold a snapshot the CONCURRENTLY build
    # waits for, while it waits for the build's session: the runner polls the lock instead.
    folder = folder_with(tmp_path, **{"0001_things": TABLE, "0002_things_open": CONCURRENT_INDEX})
    results = await asyncio.gather(*(migrate(shared_db, schema=schema, migrations_dir=folder) for _ in range(3)))
    assert sorted(n for applied in results for n in applied if not n.startswith("shared/")) == [
        "0001_things.sql", "0002_things_open.sql"]
    assert await valid_index(shared_db, schema, "things_open") is True
