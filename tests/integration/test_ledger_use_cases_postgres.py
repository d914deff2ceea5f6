"""The ledger's use-case tests (tests/unit/test_ledger_use_cases.py) on PostgreSQL: the same
scenarios through the real store (PostgresLedgerStore, the repository's SQL), the real inbox
and outbox tables and transactions, so that the in-memory store they run on in milliseconds
answers as the database does."""

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

import services.ledger
from services.ledger import domain as d
from services.ledger import repository as repo
from services.ledger.program import Program
from services.ledger.store import PostgresLedgerStore
from shared.db import create_pool, migrate
from tests.support.ledger_fakes import LedgerHarness
from tests.unit.test_ledger_use_cases import LedgerUseCases

pytestmark = pytest.mark.asyncio(loop_scope="session")

MIGRATIONS = Path(services.ledger.__file__).parent / "migrations"


class PostgresLedgerHarness(LedgerHarness):
    def __init__(self, pool: Any, program: Program | None = None) -> None:
        super().__init__(pool, PostgresLedgerStore, program)

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self.pool.acquire() as conn:
            return await conn.fetch(sql, *args)

    async def balance(self, customer_id: str) -> d.Balance:
        async with self.pool.acquire() as conn:
            book = await repo.read_customer(conn, customer_id=customer_id)
        assert book is not None
        return book.balance()

    async def hold_state(self, redemption_id: uuid.UUID) -> str:
        [row] = await self._fetch("SELECT state FROM holds WHERE redemption_id = $1", redemption_id)
        return row["state"]

    async def lots_of(self, customer_id: str) -> list[tuple[int, int]]:
        rows = await self._fetch("SELECT remaining_points, held_points FROM lots WHERE customer_id = $1", customer_id)
        return [(r["remaining_points"], r["held_points"]) for r in rows]

    async def count(self, table: str) -> int:
        assert table in ("transfers", "adjustments")
        [row] = await self._fetch(f"SELECT count(*) AS n FROM {table}")
        return row["n"]

    async def trial_balance(self) -> tuple[int, int]:
        [row] = await self._fetch("SELECT coalesce(sum(debits_posted - credits_posted), 0) AS posted,"
                                  " coalesce(sum(debits_pending - credits_pending), 0) AS pending FROM accounts")
        return row["posted"], row["pending"]

    async def published(self, event_type: str | None = None) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT value, headers FROM outbox ORDER BY id")
        return [json.loads(r["value"]) for r in rows
                if event_type is None or json.loads(r["headers"]).get("type") == event_type]


class TestOnPostgres(LedgerUseCases):
    @pytest.fixture(autouse=True)
    async def ledger_pool(self, database_url):
        await migrate(database_url, schema="ledger", migrations_dir=MIGRATIONS)
        self.pool = await create_pool(database_url, schema="ledger", max_size=2)
        yield self.pool
        await self.pool.close()

    async def harness(self, program: Program) -> LedgerHarness:
        return PostgresLedgerHarness(self.pool, program)
