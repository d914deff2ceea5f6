"""The one consumer pipeline: a batch of records -> decode -> inbox claim -> the service's
apply function, all in one transaction -> outbox -> (then) offsets committed.

A service declares a `Subscription` per topic it reads: how to decode a record into an
event, and an apply function that gets a `Batch` (the unit of work: the connection, the new
events, and where to put what it emits). Everything else lives here, once:

- A record that cannot be decoded (`Refused`) goes to the subscription's dead-letter topic
  with the reason, in the same transaction as the rest of the batch.
- The inbox: `(consumer, event_id)` claimed in the transaction; a duplicate is dropped before
  the apply function sees it (also a duplicate inside one batch).
- Errors: a transient one (shared/errors.py) retries the batch with backoff and jitter for as
  long as it lasts and never dead-letters anything. Any other error retries the batch a
  bounded number of times, then a one-by-one pass applies each record in its own
  transaction: only a record that fails on its own, for a non-transient reason, is
  dead-lettered (`processing_failed`); a good record that merely met a deadlock is retried.
- Metrics are counted after the commit (a rolled-back attempt counts nothing), and so are the
  apply function's own `after_commit` callbacks.

The Kafka side (which consumer reads which topics, when offsets are committed) is in
shared/consumer.py; this module knows nothing of Kafka but the `Record`.
"""

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import asyncpg
from prometheus_client import Counter, Histogram
from pydantic import TypeAdapter, ValidationError

from shared.db import transaction
from shared.errors import is_transient
from shared.events import DeadLetter, derived_event_id, utcnow
from shared.inbox import claim_new
from shared.logging import correlation_id
from shared.outbox import OutboxMessage, enqueue

log = logging.getLogger(__name__)

E = TypeVar("E")

RECORDS = Counter("consumer_records_total", "Records consumed, by what became of them (counted after the commit)",
                  ["topic", "outcome"])
DEAD_LETTERS = Counter("consumer_dead_letters_total", "Records sent to a dead-letter topic, by reason",
                       ["topic", "reason"])
RETRIES = Counter("consumer_batch_retries_total", "Batch attempts that failed and were tried again",
                  ["topic", "kind"])
BATCH_SECONDS = Histogram("consumer_batch_seconds", "Time to apply and commit one batch", ["topic"],
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record, as the pipeline hands it around."""

    value: bytes
    key: bytes | None = None
    topic: str = ""
    partition: int = -1
    offset: int = -1
    headers: tuple[tuple[str, bytes], ...] = ()

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                # NUL cannot go into PostgreSQL text (a dead letter's or an outbox row's headers)
                return value.decode(errors="replace").replace("\x00", "\ufffd")
        return None

    def key_text(self) -> str | None:
        return self.key.decode(errors="replace").replace("\x00", "\ufffd") if self.key else None

    def derived_id(self, consumer: str) -> uuid.UUID:
        """An id for input that has none of its own (or none readable): where it was read."""
        return derived_event_id(consumer, "record", self.topic, str(self.partition), str(self.offset))


class Refused(Exception):
    """This input can never be applied as it is: raised by a decoder (or given to
    `Batch.refuse`). `reason` is a short fixed word (a metric label); `errors` the details."""

    def __init__(self, reason: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors = errors or []


@dataclass(slots=True)
class Item(Generic[E]):
    """A decoded record: the event and the record it came from."""

    record: Record
    event: E


@dataclass(slots=True)
class _Refusal:
    record: Record
    reason: str
    errors: list[dict[str, Any]]


class Batch(Generic[E]):
    """The unit of work an apply function receives: one transaction, already begun.

    `items` are the new events (duplicates removed), in the order read. Emit with
    `publish` (outbox rows written before the commit), refuse an input the use case cannot
    apply with `refuse` (a dead letter in the same transaction), and leave what must happen
    only once the transaction committed (metrics, waking waiters) to `after_commit`."""

    def __init__(self, conn: asyncpg.Connection, items: list[Item[E]], now: datetime, read: int | None = None) -> None:
        self.conn = conn
        self.items = items
        self.now = now
        self.read = len(items) if read is None else read  # records in this attempt, duplicates included
        self.messages: list[OutboxMessage] = []
        self.refusals: list[_Refusal] = []
        self.callbacks: list[Callable[[], None]] = []

    @property
    def events(self) -> list[E]:
        return [item.event for item in self.items]

    def publish(self, *messages: OutboxMessage) -> None:
        self.messages.extend(messages)

    def refuse(self, item: Item[E] | Record, reason: str, errors: list[dict[str, Any]] | None = None) -> None:
        record = item.record if isinstance(item, Item) else item
        self.refusals.append(_Refusal(record, reason, errors or []))

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)


Apply = Callable[[Batch[Any]], Awaitable[None]]
DeadLetterBuilder = Callable[[Record, str, list[dict[str, Any]], datetime], OutboxMessage]


def _event_id(event: Any) -> uuid.UUID:
    return event.event_id


@dataclass(frozen=True)
class Subscription(Generic[E]):
    """One topic a service reads, and what to do with it.

    - `topic`: the full topic name (with the environment's prefix).
    - `consumer`: the inbox name, e.g. "ledger.purchases"; None when the use case
      de-duplicates by a key of its own (then `event_id` is not used).
    - `decode`: bytes -> event; raises `Refused` for input that can never be applied, returns
      None for an event this consumer has no use for (skipped, forward compatible).
    - `apply`: the use case, given a `Batch` inside the transaction.
    - `dead_letter_topic`, `door`: where refused input goes and how its dead letter names
      the door it came through.
    - `lane`: subscriptions of one lane share a Kafka consumer (and its fetch wait); see
      shared/consumer.py.
    - `opening`: SQL run in the same round trip as BEGIN (a lock held to the end).
    - `prepare`: awaited on the connection before each attempt's BEGIN (e.g. load a cache).
    - `dead_letter`: builds the dead letter of a refused record, for a service whose dead
      letters keep a shape of their own (default: `dead_letter_message`).
    - `on_dead_letter`: called after the commit with the reason of each record the batch
      dead-lettered (a service's own counter of refusals).
    - `schema`, `description`: for the AsyncAPI document.
    """

    topic: str
    consumer: str | None
    decode: Callable[[Record], E | None]
    apply: Apply
    dead_letter_topic: str
    door: str
    lane: str = "main"
    event_id: Callable[[E], uuid.UUID] = _event_id
    opening: str = ""
    prepare: Callable[[asyncpg.Connection], Awaitable[None]] | None = None
    dead_letter: DeadLetterBuilder | None = None
    on_dead_letter: Callable[[str], None] | None = None
    schema: Any = None
    description: str = ""


def pydantic_decoder(adapter: TypeAdapter[E], *, known_types: frozenset[str] | None = None,
                     ) -> Callable[[Record], E | None]:
    """A decoder from a pydantic TypeAdapter (usually a union discriminated by `type`).
    With `known_types`, an event whose `type` is another one is skipped (None) instead of
    refused, found from the record's `type` header without parsing the body when it has one."""

    def decode(record: Record) -> E | None:
        if known_types is not None:
            event_type = record.header("type")
            if event_type is not None and event_type not in known_types:
                return None
        try:
            return adapter.validate_json(record.value)
        except ValidationError as exc:
            errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                      for e in exc.errors(include_url=False, include_context=False, include_input=False)]
            if any(e["type"] == "json_invalid" for e in errors):
                raise Refused("malformed_json", errors) from None
            if any(e["type"] == "union_tag_invalid" for e in errors):
                if known_types is not None:
                    return None
                raise Refused("unknown_event_type", errors) from None
            raise Refused("schema", errors) from None
        except (ValueError, TypeError, RecursionError) as exc:  # raised by a validator itself
            raise Refused("schema", [{"loc": [], "msg": f"{type(exc).__name__}: {exc}", "type": "invalid"}]) from None

    return decode


@dataclass
class BatchReport:
    """What one call of `Pipeline.process` did (after its commits)."""

    applied: int = 0
    duplicates: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    attempts: int = 0
    one_by_one: bool = False
    outcomes: list[Batch[Any]] = field(default_factory=list)


class Stopping(Exception):
    """The pipeline was asked to stop while a batch waited to be retried: the batch is
    abandoned uncommitted (its offsets too), and is read again by whoever comes next."""


@dataclass
class _Decoded:
    record: Record
    event: Any = None
    refusal: Refused | None = None
    skipped: bool = False


class Pipeline:
    """Applies batches of one service's subscriptions. `pool` is a callable so the pipeline
    can be built before the pool exists (the composition root builds, the lifespan connects)."""

    def __init__(self, pool: Callable[[], asyncpg.Pool], *, producer: str,
                 on_committed: Callable[[], None] = lambda: None, max_attempts: int = 5,
                 clock: Callable[[], datetime] = utcnow, backoff_s: float = 0.05, max_backoff_s: float = 5.0) -> None:
        self._pool = pool
        self.producer = producer
        self._on_committed = on_committed
        self.max_attempts = max_attempts
        self._clock = clock
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self.stopping = False

    # ---- the batch ----------------------------------------------------------------------

    async def process(self, sub: Subscription[Any], records: Sequence[Record]) -> BatchReport:
        """Apply `records` (one topic, in the order read) until it is committed, dead-lettered
        record by record, or the pipeline stops (`Stopping`). Never returns with a record
        neither applied, skipped, duplicate nor dead-lettered."""
        started = time.perf_counter()
        correlation_id.set(records[0].header("correlation_id") if records else None)
        decoded = [self._decode(sub, r) for r in records]
        report = BatchReport()
        failures = 0
        while True:
            report.attempts += 1
            try:
                batch, counts = await self._apply(sub, decoded)
                break
            except Exception as exc:  # noqa: BLE001 - classified right here
                if is_transient(exc):
                    RETRIES.labels(sub.topic, "transient").inc()
                    log.warning("transient error; the batch is tried again", extra={
                        "topic": sub.topic, "records": len(records), "error": repr(exc)})
                    await self._pause(report.attempts)
                    continue
                failures += 1
                RETRIES.labels(sub.topic, "failed").inc()
                if failures < self.max_attempts:
                    log.warning("batch failed; trying it again", exc_info=True, extra={
                        "topic": sub.topic, "records": len(records), "attempt": failures})
                    await self._pause(failures)
                    continue
                if len(decoded) == 1:
                    batch, counts = await self._dead_letter_failed(sub, decoded[0], exc)
                    break
                log.error("batch failed %d times; applying it record by record", failures,
                          extra={"topic": sub.topic, "records": len(records)})
                report.one_by_one = True
                for entry in decoded:
                    one = await self.process_one(sub, entry)
                    for name in ("applied", "duplicates", "skipped", "dead_lettered"):
                        setattr(report, name, getattr(report, name) + getattr(one, name))
                    report.outcomes += one.outcomes
                BATCH_SECONDS.labels(sub.topic).observe(time.perf_counter() - started)
                return report
        self._committed(sub, batch, counts)
        report.outcomes.append(batch)
        report.applied, report.duplicates, report.skipped, report.dead_lettered = counts
        BATCH_SECONDS.labels(sub.topic).observe(time.perf_counter() - started)
        return report

    async def process_one(self, sub: Subscription[Any], entry: _Decoded) -> BatchReport:
        """One record in its own transaction: transient errors retried without end, any other
        error `max_attempts` times, then the record is dead-lettered with the error."""
        report = BatchReport()
        failures = 0
        while True:
            report.attempts += 1
            try:
                batch, counts = await self._apply(sub, [entry])
                break
            except Exception as exc:  # noqa: BLE001
                if is_transient(exc):
                    RETRIES.labels(sub.topic, "transient").inc()
                    await self._pause(report.attempts)
                    continue
                failures += 1
                if failures < self.max_attempts:
                    RETRIES.labels(sub.topic, "failed").inc()
                    await self._pause(failures)
                    continue
                batch, counts = await self._dead_letter_failed(sub, entry, exc)
                break
        self._committed(sub, batch, counts)
        report.outcomes.append(batch)
        report.applied, report.duplicates, report.skipped, report.dead_lettered = counts
        return report

    async def _dead_letter_failed(self, sub: Subscription[Any], entry: _Decoded,
                                  exc: BaseException) -> tuple[Batch[Any], tuple[int, int, int, int]]:
        log.error("record failed on its own; dead-lettering it", exc_info=exc, extra={
            "topic": sub.topic, "partition": entry.record.partition, "offset": entry.record.offset})
        refusal = Refused("processing_failed", [{"loc": [], "msg": f"{type(exc).__name__}: {exc}"[:2000],
                                                  "type": "processing_failed"}])
        failed = _Decoded(entry.record, entry.event, refusal)
        while True:
            try:
                # The apply function is not called: a decoded event is claimed in the inbox
                # (a redelivery is a duplicate) and refused.
                return await self._apply(sub, [failed])
            except Exception as again:  # noqa: BLE001
                if not is_transient(again):
                    raise
                await self._pause(1)

    def _decode(self, sub: Subscription[Any], record: Record) -> _Decoded:
        try:
            event = sub.decode(record)
        except Refused as refusal:
            return _Decoded(record, refusal=refusal)
        if event is None:
            return _Decoded(record, skipped=True)
        return _Decoded(record, event)

    def _inbox_id(self, sub: Subscription[Any], entry: _Decoded) -> uuid.UUID:
        if entry.event is not None:
            return sub.event_id(entry.event)
        return entry.record.derived_id(sub.consumer or self.producer)

    async def _apply(self, sub: Subscription[Any], decoded: Sequence[_Decoded],
                     ) -> tuple[Batch[Any], tuple[int, int, int, int]]:
        """One attempt: one transaction. Returns the committed batch and the counts
        (applied, duplicates, skipped, dead-lettered)."""
        if self.stopping:
            raise Stopping()
        wanted = [e for e in decoded if not e.skipped]
        skipped = len(decoded) - len(wanted)
        async with self._pool().acquire() as conn:
            if sub.prepare is not None:
                await sub.prepare(conn)
            async with transaction(conn, opening=sub.opening):
                fresh = wanted
                if sub.consumer is not None and wanted:
                    new_ids = await claim_new(conn, consumer=sub.consumer,
                                              event_ids=list({self._inbox_id(sub, e): None for e in wanted}))
                    fresh = []
                    for entry in wanted:  # the first occurrence of each new id, in order
                        inbox_id = self._inbox_id(sub, entry)
                        if inbox_id in new_ids:
                            new_ids.discard(inbox_id)
                            fresh.append(entry)
                now = self._clock()
                items = [Item(e.record, e.event) for e in fresh if e.refusal is None]
                batch: Batch[Any] = Batch(conn, items, now, read=len(decoded))
                for entry in fresh:
                    if entry.refusal is not None:
                        batch.refuse(entry.record, entry.refusal.reason, entry.refusal.errors)
                if items:
                    await sub.apply(batch)
                messages = batch.messages + [self._dead_letter(sub, r, now) for r in batch.refusals]
                await enqueue(conn, messages)
        applied = len(items) - _refused_items(batch, items)
        return batch, (applied, len(wanted) - len(fresh), skipped, len(batch.refusals))

    def _dead_letter(self, sub: Subscription[Any], refusal: _Refusal, now: datetime) -> OutboxMessage:
        if sub.dead_letter is not None:
            return sub.dead_letter(refusal.record, refusal.reason, refusal.errors, now)
        return dead_letter_message(refusal.record, topic=sub.dead_letter_topic, door=sub.door,
                                   producer=self.producer, reason=refusal.reason, errors=refusal.errors,
                                   now=now, consumer=sub.consumer or self.producer)

    def _committed(self, sub: Subscription[Any], batch: Batch[Any], counts: tuple[int, int, int, int]) -> None:
        applied, duplicates, skipped, dead = counts
        for outcome, n in (("applied", applied), ("duplicate", duplicates), ("skipped", skipped),
                           ("dead_lettered", dead)):
            if n:
                RECORDS.labels(sub.topic, outcome).inc(n)
        for refusal in batch.refusals:
            DEAD_LETTERS.labels(sub.topic, refusal.reason).inc()
            if sub.on_dead_letter is not None:
                sub.on_dead_letter(refusal.reason)
            log.warning("dead-lettered", extra={"topic": sub.topic, "reason": refusal.reason,
                                                "partition": refusal.record.partition,
                                                "offset": refusal.record.offset})
        for callback in batch.callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - the batch is committed; a metric must not undo that
                log.exception("after-commit callback failed", extra={"topic": sub.topic})
        if batch.messages or batch.refusals:
            self._on_committed()

    async def _pause(self, attempt: int) -> None:
        """Exponential backoff with full jitter, capped; interrupted by a stop."""
        if self.stopping:
            raise Stopping()
        delay = random.uniform(0, min(self._max_backoff_s, self._backoff_s * 2 ** min(attempt, 16)))
        await asyncio.sleep(delay)
        if self.stopping:
            raise Stopping()


def _refused_items(batch: Batch[Any], items: Sequence[Item[Any]]) -> int:
    """How many of the decoded items the apply function refused itself."""
    if not batch.refusals:
        return 0
    records = {id(item.record) for item in items}
    return sum(1 for r in batch.refusals if id(r.record) in records)


def dead_letter_message(record: Record, *, topic: str, door: str, producer: str, reason: str,
                        errors: list[dict[str, Any]], now: datetime, consumer: str) -> OutboxMessage:
    """The dead letter of one record, as an outbox row: the original bytes, the reason and
    where it was read. Its id derives from the record's place, so a redelivered bad record
    yields the same dead letter."""
    letter = DeadLetter(
        dead_letter_id=derived_event_id(consumer, "dead-letter", record.topic, str(record.partition),
                                        str(record.offset)),
        door=door, reason=reason, errors=errors,
        original=record.value.decode("utf-8", errors="replace"),
        original_key=record.key_text(),
        original_topic=record.topic or None,
        original_partition=record.partition if record.partition >= 0 else None,
        original_offset=record.offset if record.offset >= 0 else None,
        producer=producer, recorded_at=now,
    )
    return OutboxMessage(topic=topic, key=letter.original_key, value=letter.model_dump_json().encode(),
                         headers={"type": "DeadLetter", "reason": reason, "door": door})


def json_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """A ValidationError's errors as plain JSON values (for a dead letter or a 422 body)."""
    return json.loads(exc.json(include_url=False, include_input=False))
