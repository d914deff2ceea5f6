"""In-memory stand-ins for unit tests of the pipeline and of use cases built on it: a pool
whose connections understand the few statements the shared plumbing sends (BEGIN, COMMIT,
ROLLBACK, the inbox claim, the outbox insert) and keep their effects only on COMMIT. A fake
store of a service's own tables (tests/support/ledger_fakes.py) defers its writes to the
commit with `on_commit`."""

import contextlib
import uuid
from collections.abc import Callable
from typing import Any


class FakeDatabase:
    def __init__(self) -> None:
        self.inbox: set[tuple[str, uuid.UUID]] = set()
        self.outbox: list[dict[str, Any]] = []
        self.commits = 0
        self.rollbacks = 0
        self.fail_next: list[BaseException] = []  # raised by the next statements, in order


class FakeConnection:
    def __init__(self, db: FakeDatabase) -> None:
        self.db = db
        self._inbox: set[tuple[str, uuid.UUID]] = set()
        self._outbox: list[dict[str, Any]] = []
        self._on_commit: list[Callable[[], None]] = []
        self.in_transaction = False

    def on_commit(self, effect: Callable[[], None]) -> None:
        """Run `effect` when this transaction commits (never if it rolls back)."""
        self._on_commit.append(effect)

    @contextlib.asynccontextmanager
    async def transaction(self, **_options: Any):
        """asyncpg's conn.transaction() (isolation and read-only options are not modelled)."""
        await self.execute("BEGIN")
        try:
            yield
        except BaseException:
            await self.execute("ROLLBACK")
            raise
        await self.execute("COMMIT")

    def _maybe_fail(self) -> None:
        if self.db.fail_next:
            raise self.db.fail_next.pop(0)

    async def execute(self, sql: str, *args: Any) -> str:
        head = sql.strip().split()[0].rstrip(";").upper()  # "BEGIN; LOCK TABLE ..." begins too
        if head == "BEGIN":
            self.in_transaction, self._inbox, self._outbox, self._on_commit = True, set(), [], []
            return "BEGIN"
        if head == "ROLLBACK":
            self.in_transaction, self._on_commit = False, []
            self.db.rollbacks += 1
            return "ROLLBACK"
        if head == "COMMIT":
            self.in_transaction = False
            self.db.inbox |= self._inbox
            self.db.outbox += self._outbox
            for effect in self._on_commit:
                effect()
            self._on_commit = []
            self.db.commits += 1
            return "COMMIT"
        self._maybe_fail()
        if "INSERT INTO outbox" in sql:
            topics, keys, values, headers = args
            self._outbox += [{"topic": t, "key": k, "value": v, "headers": h}
                             for t, k, v, h in zip(topics, keys, values, headers)]
            return f"INSERT 0 {len(topics)}"
        raise AssertionError(f"the fake does not know this statement: {sql[:80]}")

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        self._maybe_fail()
        if "INSERT INTO inbox" in sql:
            consumer, ids = args
            new = [i for i in dict.fromkeys(ids) if (consumer, i) not in self.db.inbox | self._inbox]
            self._inbox |= {(consumer, i) for i in new}
            return [{"event_id": i} for i in new]
        raise AssertionError(f"the fake does not know this statement: {sql[:80]}")


class FakePool:
    def __init__(self, db: FakeDatabase | None = None) -> None:
        self.db = db or FakeDatabase()

    @contextlib.asynccontextmanager
    async def acquire(self):
        yield FakeConnection(self.db)
