"""The Kafka side of the pipeline: a small consumer loop on aiokafka's public API.

One `ConsumerLoop` is one Kafka consumer in one group, reading every topic of one *lane* of
a service (a lane groups the subscriptions that may share a fetch wait: a saga lane a
customer waits on, a bulk lane nobody waits on). Fewer consumers mean fewer idle fetches,
which is most of what an idle stack costs the embedded broker.

The loop: poll a batch (`getmany`), hand each topic's records to the pipeline (one
transaction for them), and only after that commit the offsets, coalesced to at most one
OffsetCommit per `commit_interval_ms`. A partition being revoked waits for the batch in
flight and has its offsets committed first, so its next owner starts where this one ended;
at worst (a crash) records are read again and the inbox drops them.

Why not FastStream's subscribers (docs/architecture.md says more): its batch subscriber
sleeps a whole poll timeout after an empty poll (so a record arriving then waits for it),
runs one consumer per subscriber, and joins their groups one after another; the fix used
to patch its private internals. FastStream still describes every topic (AsyncAPI).
"""

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from shared.kafka import client_options
from shared.metrics import CONSUMER_LAG
from shared.pipeline import Pipeline, Record, Stopping, Subscription
from shared.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lane:
    """How a lane's consumer fetches. `fetch_max_wait_ms` bounds the latency of a quiet
    stream on the embedded broker (it answers an idle fetch only then) and sets the idle
    cost (one fetch per wait); `instances` consumers of the lane run in one process and
    group, each owning some partitions, so that one batch is computed while another waits
    for PostgreSQL."""

    name: str
    fetch_max_wait_ms: int
    instances: int = 1
    max_records: int = 1000
    poll_timeout_ms: int = 1000
    # Idle mode: after `idle_after_ms` without a record the consumer stops fetching (its
    # partitions paused) and looks once per `idle_poll_ms`, until a record comes or `wake()`
    # is called. 0 disables it (the consumer then fetches every fetch_max_wait_ms forever).
    idle_after_ms: int = 0
    idle_poll_ms: int = 0


class _Revocation(ConsumerRebalanceListener):
    def __init__(self, loop: "ConsumerLoop") -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._loop.partitions_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned", extra={"group": self._loop.group_id,
                                               "partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in assigned)})


class ConsumerLoop:
    def __init__(self, settings: ServiceSettings, *, group_id: str, client_id: str, lane: Lane,
                 subscriptions: Sequence[Subscription[Any]], pipeline: Pipeline,
                 commit_interval_ms: int | None = None) -> None:
        self.settings = settings
        self.group_id = group_id
        self.lane = lane
        self._subs = {s.topic: s for s in subscriptions}
        self._pipeline = pipeline
        self._commit_interval_s = (settings.consumer_commit_interval_ms if commit_interval_ms is None
                                   else commit_interval_ms) / 1000
        self.consumer = AIOKafkaConsumer(
            **client_options(settings),
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.consumer_session_timeout_ms,
            heartbeat_interval_ms=settings.consumer_heartbeat_interval_ms,
            fetch_max_wait_ms=lane.fetch_max_wait_ms,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        self._pending: dict[TopicPartition, int] = {}
        self._processing = asyncio.Lock()  # held while a batch is applied; a revocation waits for it
        self._task: asyncio.Task[None] | None = None
        self._commit_timer: asyncio.Task[None] | None = None
        self._stopping = False
        self._wakeup = asyncio.Event()
        self._paused = False  # partitions paused by idle mode
        self._last_records = 0.0  # monotonic time of the last batch with records (or of wake())
        self.batches = 0  # batches committed (tests wait on state, this is for diagnostics)
        self.idle_looks = 0  # looks made in idle mode (diagnostics)

    @property
    def topics(self) -> list[str]:
        return list(self._subs)

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.subscribe(self.topics, listener=_Revocation(self))
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"consumer-{self.group_id}")

    async def stop(self, *, grace_s: float = 15.0) -> None:
        """Finish the batch in flight (or abandon it uncommitted after `grace_s`), commit what
        is pending, leave the group."""
        self._stopping = True
        self._wakeup.set()  # out of an idle wait at once
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=grace_s)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._pipeline.stopping = True
                self._task.cancel()
                try:
                    await self._task
                except BaseException:  # noqa: BLE001 - it was cancelled on purpose
                    pass
        if self._commit_timer is not None:
            self._commit_timer.cancel()
        try:
            await self._flush()
        finally:
            await self.consumer.stop()

    async def ready(self) -> bool:
        """The broker answers a metadata request."""
        await asyncio.wait_for(self.consumer.topics(), timeout=2)
        return True

    def wake(self) -> None:
        """Leave idle mode now, and stay out of it for idle_after_ms: a record is expected
        (e.g. the answer to a request this service just sent)."""
        self._last_records = time.monotonic()
        self._wakeup.set()

    def _idle(self) -> bool:
        lane = self.lane
        return bool(lane.idle_poll_ms) and time.monotonic() - self._last_records > lane.idle_after_ms / 1000

    async def _poll(self) -> dict[TopicPartition, list[Any]]:
        """One poll. Busy: fetch (the broker holds an empty fetch fetch_max_wait_ms). Idle:
        every partition paused, so no fetch is sent at all; once per idle_poll_ms one
        ListOffsets request asks whether anything came past this consumer's positions (on the
        embedded broker a tenth of an empty fetch's cost), and only then, or at wake(), the
        partitions are resumed for a fetch."""
        if not self._idle():
            if self._paused:  # left idle mode by wake() while a look was under way
                self._resume()
            batches = await self.consumer.getmany(timeout_ms=self.lane.poll_timeout_ms,
                                                  max_records=self.lane.max_records)
        else:
            assigned = self.consumer.assignment()
            if assigned:
                self.consumer.pause(*assigned)
                self._paused = True
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.lane.idle_poll_ms / 1000)
            except asyncio.TimeoutError:
                pass
            self.idle_looks += 1
            if not self._wakeup.is_set() and not await self._news(assigned):
                return {}
            self._resume()
            # Records already fetched come back at once; else one fetch round (the broker
            # answers an empty fetch after fetch_max_wait_ms) and a margin, not two rounds.
            batches = await self.consumer.getmany(timeout_ms=self.lane.fetch_max_wait_ms + 15,
                                                  max_records=self.lane.max_records)
        if any(batches.values()):
            self._last_records = time.monotonic()
        return batches

    def _resume(self) -> None:
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)
        self._paused = False

    async def _news(self, partitions: set[TopicPartition]) -> bool:
        """Whether any of these partitions holds records past this consumer's position (or
        that cannot be told: then a fetch finds out)."""
        if not partitions:
            return False
        try:
            ends = await asyncio.wait_for(self.consumer.end_offsets(list(partitions)), timeout=5)
            for tp, end in ends.items():
                position = await asyncio.wait_for(self.consumer.position(tp), timeout=1)
                # The high watermark of the last fetch too: the embedded broker's ListOffsets
                # can name an end inside the last record batch, below records not yet read.
                if end > position or (self.consumer.highwater(tp) or 0) > position:
                    return True
        except Exception:  # noqa: BLE001 - a rebalance, the broker away: let a fetch tell
            return True
        return False

    async def _run(self) -> None:
        backoff_s = retry_s = 0.1
        self._last_records = time.monotonic()
        while not self._stopping:
            try:
                batches = await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker away, a rebalance: poll again
                log.warning("poll failed; polling again", extra={"group": self.group_id, "error": repr(exc)})
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            backoff_s = 0.1
            if not batches:
                continue
            try:
                async with self._processing:
                    await self._apply(batches)
                # Counted from the end of the batch: one applied for longer than idle_after_ms
                # must not send the loop idle with the rest of a fetch unread.
                self._last_records = time.monotonic()
            except Stopping:
                return  # abandoned uncommitted: read again by whoever comes next
            except Exception:  # noqa: BLE001 - a bug below the pipeline's own handling
                # Never go on past records not applied: read them again from their first
                # offset, after a pause (the loop must not die, nor skip them).
                log.exception("batch not applied; reading it again", extra={"group": self.group_id})
                assigned = self.consumer.assignment()
                for tp, records in batches.items():
                    if records and tp in assigned:
                        self.consumer.seek(tp, records[0].offset)
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, 5.0)
                continue
            retry_s = 0.1
            self._schedule_commit()

    async def _apply(self, batches: dict[TopicPartition, list[Any]]) -> None:
        by_topic: dict[str, list[Record]] = {}
        ends: dict[TopicPartition, int] = {}
        for tp in sorted(batches, key=lambda tp: (tp.topic, tp.partition)):
            raw = batches[tp]
            if not raw:
                continue
            by_topic.setdefault(tp.topic, []).extend(
                Record(r.value or b"", r.key, r.topic, r.partition, r.offset, tuple(r.headers or ()))
                for r in raw)
            ends[tp] = raw[-1].offset + 1
        for topic, records in by_topic.items():
            await self._pipeline.process(self._subs[topic], records)
        assigned = self.consumer.assignment()
        for tp, end in ends.items():
            if tp in assigned:
                self._pending[tp] = end
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(highwater - end, 0))
        self.batches += 1

    def _schedule_commit(self) -> None:
        if self._commit_interval_s <= 0:
            self._commit_timer = asyncio.get_running_loop().create_task(self._flush())
        elif self._commit_timer is None or self._commit_timer.done():
            self._commit_timer = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self, delay_s: float | None = None) -> None:
        await asyncio.sleep(self._commit_interval_s if delay_s is None else delay_s)
        await self._flush()

    async def _flush(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Commit the pending offsets: of every partition still assigned, or of `partitions`
        (being revoked: still ours until the callback returns)."""
        if partitions is None:
            pending, self._pending = self._pending, {}
            assigned = self.consumer.assignment()
            offsets = {tp: offset for tp, offset in pending.items() if tp in assigned}
        else:
            offsets = {tp: self._pending.pop(tp) for tp in partitions if tp in self._pending}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - e.g. a rebalance in between
            log.warning("offset commit failed", extra={"group": self.group_id, "error": repr(exc)})
            if partitions is None and not self._stopping:
                # Tried again with the next commit (newer offsets of a later batch win): an
                # idle partition would otherwise keep its old offset, and show lag, until a
                # record came. A partition lost meanwhile is left to its new owner.
                self._pending = offsets | self._pending
                self._commit_timer = asyncio.get_running_loop().create_task(
                    self._flush_later(max(self._commit_interval_s, 0.1)))

    async def partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Waiting for the batch in flight means the partitions' offsets are committed before
        # their next owner reads them: no record is applied twice in the normal case.
        async with self._processing:
            await self._flush(revoked)
