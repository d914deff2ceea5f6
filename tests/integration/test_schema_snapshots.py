"""Each service's schema as its migrations build it, compared with a snapshot kept in
tests/integration/schema_snapshots/<service>.txt: columns, indexes, constraints and triggers.
An index or a guard that a migration drops (or never creates) fails here, by name.

After a migration that changes the schema on purpose, write the snapshots again and review
the diff:

    UPDATE_SCHEMA_SNAPSHOTS=1 .venv/bin/python -m pytest -q tests/integration/test_schema_snapshots.py

A new service adds its name to SERVICES (and its snapshot, written the same way)."""

import difflib
import os
from pathlib import Path

import asyncpg
import pytest

from shared.db import migrate

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = Path(__file__).parent / "schema_snapshots"
SERVICES = ["purchases", "ledger", "rewards", "churn", "engagement"]

_COLUMNS = """
SELECT format('column %s.%s %s%s%s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
              CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END,
              CASE WHEN d.adbin IS NOT NULL THEN ' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid) ELSE '' END)
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v') AND a.attnum > 0 AND NOT a.attisdropped
"""
_INDEXES = """
SELECT format('index %s %s%s', c.relname, pg_get_indexdef(i.indexrelid), CASE WHEN i.indisvalid THEN '' ELSE ' INVALID' END)
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1
"""
_CONSTRAINTS = """
SELECT format('constraint %s.%s %s%s', t.relname, k.conname, pg_get_constraintdef(k.oid),
              CASE WHEN k.convalidated THEN '' ELSE ' NOT VALIDATED' END)
FROM pg_constraint k
JOIN pg_class t ON t.oid = k.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = $1
"""
_TRIGGERS = """
SELECT format('trigger %s.%s %s', c.relname, g.tgname, pg_get_triggerdef(g.oid))
FROM pg_trigger g
JOIN pg_class c ON c.oid = g.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND NOT g.tgisinternal
"""


async def schema_lines(dsn: str, schema: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        lines: list[str] = []
        for sql in (_COLUMNS, _INDEXES, _CONSTRAINTS, _TRIGGERS):
            lines += [r[0].replace(f"{schema}.", "") for r in await conn.fetch(sql, schema)]
        return sorted(lines)
    finally:
        await conn.close()


@pytest.mark.parametrize("service", SERVICES)
async def test_the_migrated_schema_matches_its_snapshot(service, database_url):
    await migrate(database_url, schema=service, migrations_dir=ROOT / "services" / service / "migrations")
    lines = await schema_lines(database_url, service)
    snapshot = SNAPSHOTS / f"{service}.txt"
    if os.environ.get("UPDATE_SCHEMA_SNAPSHOTS"):
        snapshot.parent.mkdir(exist_ok=True)
        snapshot.write_text("\n".join(lines) + "\n")
    expected = snapshot.read_text().splitlines()
    missing = [x for x in expected if x not in lines]
    assert lines == expected, (
        f"the {service} schema differs from {snapshot.relative_to(ROOT)}"
        + (f"; gone: {missing}" if missing else "")
        + "\n" + "\n".join(difflib.unified_diff(expected, lines, "snapshot", "migrated", lineterm="", n=0))
        + "\n(a change on purpose: UPDATE_SCHEMA_SNAPSHOTS=1, then review the diff)")


async def test_a_dropped_index_or_constraint_is_named_by_the_comparison(database_url):
    """The comparison itself can fail: the ledger's schema without its open-lots index and
    a CHECK differs from the snapshot by exactly those two lines."""
    await migrate(database_url, schema="ledger", migrations_dir=ROOT / "services" / "ledger" / "migrations")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP INDEX ledger.lots_open")
        await conn.execute("ALTER TABLE ledger.transfers DROP CONSTRAINT transfers_code_check")
    finally:
        await conn.close()
    lines = await schema_lines(database_url, "ledger")
    expected = (SNAPSHOTS / "ledger.txt").read_text().splitlines()
    gone = [x for x in expected if x not in lines]
    assert [x.split(" ", 2)[:2] for x in gone] == [["constraint", "transfers.transfers_code_check"],
                                                   ["index", "lots_open"]]
    assert [x for x in lines if x not in expected] == []
