"""The ledger's database guards, against real PostgreSQL: the open-lots query served by an
index on a populated table (EXPLAIN, no sequential scan), a hold resolved at most once
(UNIQUE pending_id), transfer codes and phases checked."""

import json
import uuid
from pathlib import Path

import asyncpg
import pytest

import services.ledger
from services.ledger import repository as repo
from services.ledger.domain.accounts import Code, Phase
from shared.db import migrate

pytestmark = pytest.mark.asyncio(loop_scope="session")

MIGRATIONS = Path(services.ledger.__file__).parent / "migrations"
CUSTOMERS, LOTS_EACH = 2_000, 25


@pytest.fixture
async def ledger_db(database_url):
    await migrate(database_url, schema="ledger", migrations_dir=MIGRATIONS)
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "ledger"})
    yield conn
    await conn.close()


async def populate_lots(conn: asyncpg.Connection) -> None:
    """50,000 lots, as a ledger in service holds them: most spent or expired (closed), a few
    per customer still open (remaining, pending or held points)."""
    await conn.execute(f"""
        INSERT INTO lots (lot_id, customer_id, source, purchase_id, occurred_at, amount_points, remaining_points,
                          held_points, pending, matures_at, expires_at)
        SELECT gen_random_uuid(), 'c' || (g % {CUSTOMERS}), 'purchase', 'p' || g, now() - (g || ' minutes')::interval,
               100,
               -- the customer's k-th lot (k = g / CUSTOMERS): the last two still have points,
               -- the one before is pending, the one before that has points held; the rest closed
               CASE WHEN g / {CUSTOMERS} >= {LOTS_EACH - 2} THEN 100 ELSE 0 END,
               CASE WHEN g / {CUSTOMERS} = {LOTS_EACH - 4} THEN 10 ELSE 0 END,
               g / {CUSTOMERS} = {LOTS_EACH - 3},
               now(), now() + interval '365 days'
        FROM generate_series(0, {CUSTOMERS * LOTS_EACH - 1}) g""")
    await conn.execute("ANALYZE lots")


def plan_nodes(plan: dict) -> list[dict]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


async def test_the_open_lots_query_uses_an_index_not_a_sequential_scan_on_a_populated_table(ledger_db):
    await populate_lots(ledger_db)
    some_lot = await ledger_db.fetchval("SELECT lot_id FROM lots WHERE customer_id = 'c7' LIMIT 1")
    [row] = await ledger_db.fetch("EXPLAIN (FORMAT JSON) " + repo.OPEN_LOTS,
                                  [f"c{i}" for i in range(0, 200, 20)], [some_lot])
    nodes = plan_nodes(json.loads(row[0])[0]["Plan"])
    scans = {(n["Node Type"], n.get("Index Name")) for n in nodes if n.get("Relation Name") == "lots"
             or "Index Name" in n}
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], f"open lots scan the table: {scans}"
    assert "lots_open" in {n.get("Index Name") for n in nodes}, scans
    # and the query still finds what it did
    lots = await repo.open_lots(ledger_db, customer_ids=["c7"], lot_ids=[])
    expected = await ledger_db.fetchval(
        "SELECT count(*) FROM lots WHERE customer_id = 'c7' AND (pending OR remaining_points > 0 OR held_points > 0)")
    assert len(lots) == expected == 4


async def transfer(conn: asyncpg.Connection, *, code: str, phase: str, pending_id: uuid.UUID | None = None) -> uuid.UUID:
    transfer_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_points, code, phase,"
        " pending_id, customer_id, ref) VALUES ($1, 'customer:c:available', 'program:redemption', 10, $2, $3, $4,"
        " 'c', 'r')", transfer_id, code, phase, pending_id)
    return transfer_id


async def test_a_hold_is_posted_or_voided_once_never_both(ledger_db):
    hold = await transfer(ledger_db, code=Code.HOLD, phase=Phase.PENDING)
    await transfer(ledger_db, code=Code.POST, phase=Phase.POST_PENDING, pending_id=hold)
    with pytest.raises(asyncpg.UniqueViolationError, match="transfers_pending_id_key"):
        await transfer(ledger_db, code=Code.VOID, phase=Phase.VOID_PENDING, pending_id=hold)
    with pytest.raises(asyncpg.UniqueViolationError):
        await transfer(ledger_db, code=Code.POST, phase=Phase.POST_PENDING, pending_id=hold)
    other = await transfer(ledger_db, code=Code.HOLD, phase=Phase.PENDING)
    await transfer(ledger_db, code=Code.VOID, phase=Phase.VOID_PENDING, pending_id=other)  # another hold: fine


async def test_every_code_and_phase_of_the_domain_is_accepted_and_anything_else_refused(ledger_db):
    for code in Code:
        await transfer(ledger_db, code=code, phase=Phase.POSTED)
    hold = await transfer(ledger_db, code=Code.HOLD, phase=Phase.PENDING)
    await transfer(ledger_db, code=Code.POST, phase=Phase.POST_PENDING, pending_id=hold)
    with pytest.raises(asyncpg.CheckViolationError, match="transfers_code_check"):
        await transfer(ledger_db, code="gift", phase=Phase.POSTED)
    with pytest.raises(asyncpg.CheckViolationError, match="transfers_phase_check"):
        await transfer(ledger_db, code=Code.EARN, phase="half_posted")
    with pytest.raises(asyncpg.CheckViolationError, match="transfers_pending_id_only_to_resolve_a_hold"):
        await transfer(ledger_db, code=Code.EARN, phase=Phase.POSTED, pending_id=hold)
    with pytest.raises(asyncpg.CheckViolationError, match="transfers_pending_id_only_to_resolve_a_hold"):
        await transfer(ledger_db, code=Code.VOID, phase=Phase.VOID_PENDING)


async def test_a_transfer_id_is_written_once(ledger_db):
    transfer_id = await transfer(ledger_db, code=Code.EARN, phase=Phase.POSTED)
    with pytest.raises(asyncpg.UniqueViolationError, match="transfers_pkey"):
        await ledger_db.execute(
            "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_points, code, phase,"
            " customer_id, ref) VALUES ($1, 'a', 'b', 1, 'earn', 'posted', 'c', 'r')", transfer_id)
