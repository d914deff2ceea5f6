"""The program's versions as this ledger knows them, and which one governs an input.

Every saved program (the file when it changed, an admin's replacement) is a version with an
`effective_from` time; an input earns under the version in force when it was recorded (its
envelope's recorded_at): the latest effective by then, the highest number among equal times,
the first version for anything recorded before it. The choice depends on the inputs and the
versions only, never on when the ledger got to an input, so the ledger that applied an event
live and a ledger rebuilt from offset 0 choose the same version.

For that the versions travel with the inputs: each is published to ledger.programs (through
the outbox, in the transaction that saved it), and a ledger reads that topic whole when it
first loads its program, before it applies any input: a rebuild into an empty database gets
every version, with its number and times, before its first purchase. Versions the topic lacks
(saved before the topic existed, or a broker that lost its data) are published then too.
"""

import asyncio
import bisect
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import ValidationError

from services.ledger import repository as repo
from services.ledger.program import Program, load_program_file
from shared.errors import TransientError
from shared.events import derived_event_id, utcnow
from shared.events.programs import (
    PROGRAM_KEY,
    ProgramVersionPublished,
    ProgramVersionPublishedPayload,
)
from shared.outbox import OutboxMessage, enqueue

log = logging.getLogger(__name__)

PRODUCER = "ledger"


class ProgramHistoryUnavailable(TransientError):
    """ledger.programs could not be read: nothing is applied under a program that may not be
    the one in force (transient: the pipeline retries the batch, never dead-letters it)."""


class EffectiveInThePast(ValueError):
    """A version cannot take effect before it is saved: inputs already applied would have
    earned under another version than a rebuild would choose."""


@dataclass(frozen=True, slots=True)
class ProgramVersion:
    version: int
    effective_from: datetime
    program: Program


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, (str, bytes)) else value


class ProgramStore:
    RETRY_AFTER_S = 5.0  # what an HTTP request told "unavailable" is asked to wait (Retry-After)
    """Every version of the program, in memory (a handful of small documents). The database
    holds them; `refresh` picks up versions another instance saved: every transaction that
    applies inputs checks the latest version saved (with its customers' lock, under
    repository.APPLYING_INPUTS) and refreshes when it is newer, and so does each scheduler tick."""

    def __init__(self, program_file: Path, *, topic: str | None = None,
                 history: Callable[[], Awaitable[Sequence[bytes]]] | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._file = program_file
        # Where versions are published (None: not published, for unit tests without a broker)
        # and how the published ones are read back (the topic's record values).
        self._topic, self._history, self._clock = topic, history, clock
        self._versions: list[ProgramVersion] = []
        self._order: list[tuple[datetime, int]] = []
        self._loading = asyncio.Lock()
        # The last failed first load: (when, why), for those that were waiting behind it.
        self._failed: tuple[float, ProgramHistoryUnavailable] | None = None

    # ---- which version -------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return bool(self._versions)

    def at(self, when: datetime) -> ProgramVersion:
        """The version in force at `when`."""
        if not self._versions:
            return ProgramVersion(0, when, Program())  # never applied: ensure_loaded comes first
        i = bisect.bisect_right(self._order, (when, sys.maxsize)) - 1
        return self._versions[max(i, 0)]

    def with_rate_for(self, rules: ProgramVersion, currency: str) -> Program:
        """`rules`' program, knowing `currency` if any version does. A rate is a fact about
        money, not a rule: a purchase in a currency its version had no rate for (dead-lettered
        as unknown_currency, then replayed once an operator saved a version adding the rate)
        converts at the rate of the first later version that has one. A rebuild from the
        topics gives the same: it knows every version from the start."""
        program = rules.program
        if program.rate_to_program_currency(currency) is not None:
            return program
        for later in sorted(self._versions, key=lambda v: (v.effective_from, v.version)):
            if later.effective_from >= rules.effective_from and later.version != rules.version:
                rate = later.program.rate_to_program_currency(currency)
                if rate is not None and later.program.currency == program.currency:
                    return program.model_copy(update={"currency_rates": {**program.currency_rates,
                                                                         currency.upper(): rate}})
        return program

    def in_force(self) -> ProgramVersion:
        return self.at(self._clock())

    @property
    def latest_version(self) -> int:
        return max((v.version for v in self._versions), default=0)

    def _add(self, rows: Sequence[Any]) -> None:
        """Every row validated before any is added: a version this code cannot read (saved by
        a newer instance during an upgrade) leaves the store as it was, and is an unavailable
        history (retried, never a reason to dead-letter the inputs)."""
        known = {v.version for v in self._versions}
        new: dict[int, ProgramVersion] = {}
        for row in rows:
            if row["version"] in known or row["version"] in new:
                continue
            try:
                program = Program.model_validate(_json(row["document"]))
            except ValidationError as exc:
                raise ProgramHistoryUnavailable(
                    f"program version {row['version']} cannot be read by this ledger (saved by a newer one?): "
                    f"{exc.error_count()} errors, first: {exc.errors()[0]['msg']}") from exc
            new[row["version"]] = ProgramVersion(row["version"], row["effective_from"], program)
        self._versions.extend(new.values())
        self._versions.sort(key=lambda v: (v.effective_from, v.version))
        self._order = [(v.effective_from, v.version) for v in self._versions]

    # ---- loading and saving --------------------------------------------------------------

    async def ensure_loaded(self, conn: asyncpg.Connection, *, wait: bool = True) -> None:
        """Consumers may get their first batch before the start hooks ran: whoever comes
        first loads the program, so no posting is ever made under an unloaded one.
        `wait=False` (HTTP requests, which hold a pooled connection meanwhile): while another
        caller is loading, or within RETRY_AFTER_S of a failed load, fail at once instead of
        waiting for it or reading the topic once more."""
        if self._versions:
            return
        if not wait and (self._loading.locked() or (
                self._failed is not None and time.monotonic() - self._failed[0] < self.RETRY_AFTER_S)):
            raise ProgramHistoryUnavailable(
                "the program is being loaded" if self._loading.locked() else str(self._failed[1]))  # type: ignore[index]
        asked = time.monotonic()
        async with self._loading:
            if self._versions:
                return
            if self._failed is not None and self._failed[0] >= asked:
                # The load this caller waited for failed meanwhile: its answer, not one more
                # attempt each (a broker that never answers costs read_topic's timeout).
                raise ProgramHistoryUnavailable(str(self._failed[1])) from self._failed[1].__cause__
            try:
                await self.load(conn)
            except ProgramHistoryUnavailable as exc:
                self._failed = (time.monotonic(), exc)
                raise

    async def load(self, conn: asyncpg.Connection) -> None:
        """At start: the published versions restored (those this database lacks), the
        versions the topic lacks published, and the file saved as a new version, effective
        now, when it differs from the last one loaded from a file (otherwise the versions
        saved since, maybe an admin's, stay in force)."""
        published = await self._published_versions()
        document = load_program_file(self._file).model_dump(mode="json")
        async with conn.transaction():
            await repo.lock_program_versions(conn)
            now = self._clock()  # under the lock: later than every input applied before it
            restored = await repo.restore_program_versions(conn, versions=published)
            history = list(await repo.program_history(conn))
            on_topic = {p.version for p in published}
            messages = [self._message(r) for r in history if r["version"] not in on_topic]
            last_from_file = max((r for r in history if r["source"] == "file"), key=lambda r: r["version"], default=None)
            if last_from_file is None or _json(last_from_file["document"]) != document:
                row = await repo.insert_program_version(conn, document=document, source="file",
                                                        actor=f"file:{self._file.name}", effective_from=now)
                history.append(row)
                messages.append(self._message(row))
            if self._topic is not None:
                await enqueue(conn, messages)
        self._add(history)
        if restored:
            log.info("program versions restored from the topic", extra={"versions": restored})
        log.info("program in force", extra={"rule_version": self.in_force().version})

    async def refresh(self, conn: asyncpg.Connection) -> None:
        self._add(await repo.program_history(conn, after=self.latest_version))

    async def replace(self, conn: asyncpg.Connection, program: Program, *, actor: str,
                      effective_from: datetime | None = None) -> ProgramVersion:
        """Save `program` as a new version, in force from `effective_from` (now if None; never
        earlier than now: raises EffectiveInThePast)."""
        async with conn.transaction():
            await repo.lock_program_versions(conn)
            # The time under the lock, which waits for the inputs being applied (in any
            # instance): every input applied before this version is older than it.
            now = self._clock()
            if effective_from is not None and effective_from < now:
                raise EffectiveInThePast(f"effective_from {effective_from.isoformat()} is before now ({now.isoformat()})")
            row = await repo.insert_program_version(conn, document=program.model_dump(mode="json"), source="admin",
                                                    actor=actor, effective_from=effective_from or now)
            if self._topic is not None:
                await enqueue(conn, [self._message(row)])
        self._add([row])
        return ProgramVersion(row["version"], row["effective_from"], program)

    async def _published_versions(self) -> list[ProgramVersionPublishedPayload]:
        if self._history is None:
            return []
        try:
            values = await self._history()
        except Exception as exc:  # a timeout, a missing topic, aiokafka's errors (not OSErrors)
            raise ProgramHistoryUnavailable(f"cannot read the program versions ({type(exc).__name__}: {exc})") from exc
        versions: dict[int, ProgramVersionPublishedPayload] = {}
        for value in values:
            try:
                payload = ProgramVersionPublished.model_validate_json(value).payload
                Program.model_validate(payload.document)
            except ValidationError:
                log.error("unreadable record on the program versions topic; skipped", exc_info=True)
                continue
            versions.setdefault(payload.version, payload)
        return [versions[v] for v in sorted(versions)]

    def _message(self, row: Any) -> OutboxMessage:
        event_id = derived_event_id("ledger", "ProgramVersionPublished", str(row["version"]))
        event = ProgramVersionPublished(
            event_id=event_id, occurred_at=row["created_at"], recorded_at=row["created_at"], producer=PRODUCER,
            correlation_id=str(event_id), customer_id=None,
            payload=ProgramVersionPublishedPayload(
                version=row["version"], document=_json(row["document"]), source=row["source"], actor=row["actor"],
                effective_from=row["effective_from"], created_at=row["created_at"]),
        )
        return OutboxMessage.event(self._topic or "", event, key=PROGRAM_KEY)
