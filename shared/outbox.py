"""The transactional outbox and its relay.

A use case calls `enqueue` in the same transaction as its state change. The relay claims
rows with FOR UPDATE SKIP LOCKED (so several relays never publish the same row at once and
never skip one the way "id > last id" does when transactions commit out of order), deleting
them in the same statement, sends them, waits for the broker's acknowledgement, and only then
commits; a failed send rolls the transaction back and the rows are there again. A crash
after the send and before the commit re-sends those rows: consumers de-duplicate by
event_id, so that costs nothing but a duplicate delivery. For the same reason the relay's
commit need not wait for the disk (synchronous_commit off for that transaction only): a
delete lost in a crash only means a re-send.

One relay publishes at a time per schema (a transaction-level advisory lock): with two
service instances, two relays publishing in parallel would let a customer's later event
overtake an earlier one. A row the broker can never accept (too large) is moved to
`outbox_failed` with the error instead of blocking every row behind it.
"""

import asyncio
import functools
import json
import logging
import random
import time
from collections import Counter as Counter_
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.errors import InvalidTopicError, MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel

log = logging.getLogger(__name__)

OUTBOX_PUBLISHED = Counter("outbox_published_total", "Outbox rows published to Kafka", ["topic"])
OUTBOX_BATCH = Histogram(
    "outbox_relay_batch_size", "Rows published per relay round", buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000)
)
OUTBOX_PENDING = Gauge("outbox_pending_rows", "Outbox rows not yet published (sampled by the relay)")
PENDING_SAMPLE_INTERVAL_S = 5.0
OUTBOX_ERRORS = Counter("outbox_relay_errors_total", "Relay rounds that failed and will be retried")
OUTBOX_FAILED = Counter("outbox_failed_total", "Outbox rows the broker refused for good, moved to outbox_failed",
                        ["topic"])


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    topic: str
    key: str | None
    value: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def event(cls, topic: str, event: BaseModel, *, key: str | None) -> "OutboxMessage":
        """An envelope as an outbox row; `type` and `correlation_id` also go in headers so
        consumers can route or skip without parsing the body."""
        headers = {"type": str(getattr(event, "type", "")), "correlation_id": str(getattr(event, "correlation_id", ""))}
        return cls(topic=topic, key=key, value=event.model_dump_json().encode(), headers=headers)


_ENQUEUE = """
INSERT INTO outbox (topic, key, value, headers)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::jsonb[])
"""


async def enqueue(conn: asyncpg.Connection, messages: Sequence[OutboxMessage]) -> None:
    """Add messages to the outbox, inside the caller's transaction (never commits)."""
    if not messages:
        return
    await conn.execute(
        _ENQUEUE,
        [m.topic for m in messages],
        [m.key for m in messages],
        [m.value for m in messages],
        [json.dumps(m.headers) for m in messages],
    )


# Errors that sending the same row again can never cure. Anything else (timeouts, broker
# away) fails the round, which is retried with every row still in the outbox.
NEVER_ACCEPTED = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError, InvalidTopicError)

# aiokafka's murmur2 is pure Python; keys (customer ids) repeat, so their hashes are kept.
_murmur2 = functools.lru_cache(maxsize=200_000)(murmur2)
_record_size = DefaultRecordBatchBuilder.estimate_size_in_bytes

def _record(row: asyncpg.Record) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """An outbox row as Kafka key, value and headers."""
    key = row["key"].encode() if row["key"] is not None else None
    return key, row["value"], [(k, v.encode()) for k, v in json.loads(row["headers"]).items()]


# One publisher per schema at a time keeps each key's events in order.
_ONE_RELAY = "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.outbox-relay'))"

_MOVE_FAILED = """
INSERT INTO outbox_failed (id, topic, key, value, headers, created_at, error)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""

# One statement claims and deletes (the transaction is rolled back if the send fails). The
# ids are claimed first, as an array (an InitPlan: the delete is then an index lookup, never a
# scan of a backlog), under a one-time filter evaluated before any row is locked: the
# one-relay lock (no rows when another relay of this schema is publishing) and an
# asynchronous commit for this transaction only.
_CLAIM = f"""
DELETE FROM outbox WHERE id = ANY(ARRAY(
    SELECT id FROM outbox
    WHERE ({_ONE_RELAY} AND set_config('synchronous_commit', 'off', true) = 'off')
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
))
RETURNING id, topic, key, value, headers, created_at
"""


class OutboxRelay:
    """Publishes outbox rows. `wake()` after a commit makes it publish without waiting for
    the poll interval; the interval covers rows written by other processes."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        *,
        batch_size: int = 2000,
        poll_interval_ms: int = 200,
    ) -> None:
        self._pool = pool
        self._producer = producer
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_ms / 1000
        self._max_request_size = getattr(producer, "_max_request_size", 1024 * 1024)
        # Partitions per topic, read once: topics are created with their partitions up front
        # (shared/topics.py) and never grown while the services run.
        self._partitions: dict[str, list[int]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        """Publish what is pending (best effort, bounded), then stop."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def publish_once(self) -> int:
        """One round: claim (and delete), send, await acknowledgements, commit. Returns rows
        published or set aside."""
        async with self._pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetch(_CLAIM, self._batch_size)  # none if another relay is publishing
            if not claimed:
                return 0
            rows = sorted(claimed, key=lambda r: r["id"])  # RETURNING has no order; ids are the outbox order
            try:
                failed = await self._send_in_batches(rows)
            except NEVER_ACCEPTED:
                # A batch the broker refused as a whole: send the round again a row per batch,
                # so only the culprits are refused (rows already sent go twice; consumers
                # drop the repeats).
                failed = await self._send_one_by_one(rows)
            for row, error in failed:
                await conn.execute(_MOVE_FAILED, row["id"], row["topic"], row["key"], row["value"], row["headers"],
                                   row["created_at"], f"{type(error).__name__}: {error}")
                log.error("outbox row refused by the broker for good; moved to outbox_failed",
                          extra={"outbox_id": row["id"], "topic": row["topic"], "error": repr(error)})
        failed_ids = {row["id"] for row, _ in failed}
        for topic, n in Counter_(r["topic"] for r in rows if r["id"] not in failed_ids).items():
            OUTBOX_PUBLISHED.labels(topic).inc(n)
        for row, _ in failed:
            OUTBOX_FAILED.labels(row["topic"]).inc()
        OUTBOX_BATCH.observe(len(rows))
        return len(rows)

    async def _send_in_batches(self, rows: Sequence[asyncpg.Record]) -> list[tuple[asyncpg.Record, BaseException]]:
        """The rows as one record batch per partition (in row order within each), all sent
        at once: a future per batch rather than per row.
        Partitions are chosen as the producer's own send() would (murmur2 of the key), so a
        key's events stay on one partition whichever way they were published. Rows too
        large for any request are returned as failed without being sent."""
        producer = self._producer
        too_large: list[tuple[asyncpg.Record, BaseException]] = []
        batches: dict[tuple[str, int], list] = {}
        sends = []
        for row in rows:
            topic = row["topic"]
            key, value, headers = _record(row)
            if _record_size(key, value, headers) > self._max_request_size:
                too_large.append((row, self._too_large()))
                continue
            partition = await self._partition_of(topic, key)
            open_batches = batches.setdefault((topic, partition), [])
            if not open_batches or open_batches[-1].append(timestamp=None, key=key, value=value,
                                                           headers=headers) is None:
                batch = producer.create_batch()
                open_batches.append(batch)
                if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                    # never: an empty batch takes any first record (sizes were checked above)
                    raise RecordTooLargeError("a record does not fit in an empty batch")
        for (topic, partition), built in batches.items():
            for batch in built:
                batch.close()
                sends.append(await producer.send_batch(batch, topic, partition=partition))
        for outcome in await asyncio.gather(*sends, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome  # the whole round is retried (or, if never accepted, isolated)
        return too_large

    async def _send_one_by_one(self, rows: Sequence[asyncpg.Record]) -> list[tuple[asyncpg.Record, BaseException]]:
        """Each row in a record batch of its own (in row order, so a key's events keep their
        order): the rows the broker can never accept are returned as failed, every other row
        is sent; any other error fails the round."""
        failed: list[tuple[asyncpg.Record, BaseException]] = []
        sends: list[tuple[asyncpg.Record, asyncio.Future]] = []
        for row in rows:
            key, value, headers = _record(row)
            if _record_size(key, value, headers) > self._max_request_size:
                failed.append((row, self._too_large()))
                continue
            batch = self._producer.create_batch()
            batch.append(timestamp=None, key=key, value=value, headers=headers)
            batch.close()
            try:
                partition = await self._partition_of(row["topic"], key)
                sends.append((row, await self._producer.send_batch(batch, row["topic"], partition=partition)))
            except NEVER_ACCEPTED as exc:  # refused before sending (e.g. a topic name Kafka refuses)
                failed.append((row, exc))
        outcomes = await asyncio.gather(*(f for _, f in sends), return_exceptions=True)
        for (row, _), outcome in zip(sends, outcomes):
            if isinstance(outcome, NEVER_ACCEPTED):
                failed.append((row, outcome))
            elif isinstance(outcome, BaseException):
                raise outcome  # the whole round is retried: nothing deleted
        return failed

    def _too_large(self) -> MessageSizeTooLargeError:
        return MessageSizeTooLargeError(f"the record is larger than max_request_size ({self._max_request_size} bytes)")

    async def _partition_of(self, topic: str, key: bytes | None) -> int:
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = self._partitions[topic] = sorted(await self._producer.partitions_for(topic))
        if key is None:
            return random.choice(partitions)
        return partitions[(_murmur2(key) & 0x7FFFFFFF) % len(partitions)]

    async def pending(self) -> int:
        return await self._pool.fetchval("SELECT count(*) FROM outbox")

    async def _run(self) -> None:
        backoff_s = 0.1
        sampled_at = 0.0
        while True:
            self._wakeup.clear()  # before the round: a commit that wakes it during the round gets its own
            try:
                published = await self.publish_once()
                backoff_s = 0.1
                if time.monotonic() - sampled_at > PENDING_SAMPLE_INTERVAL_S:  # a count(*), so not every round
                    sampled_at = time.monotonic()
                    OUTBOX_PENDING.set(await self.pending())
            except asyncio.CancelledError:
                raise
            except Exception:
                OUTBOX_ERRORS.inc()
                log.exception("outbox relay round failed; retrying")
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            if published >= self._batch_size:
                continue  # more is waiting
            if self._stopping:
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._poll_interval_s)
            except asyncio.TimeoutError:
                pass
