"""shared/consumer.py's loop with an in-memory Kafka consumer and database: offsets are
committed only after the batch's transaction, never for a batch abandoned at stop; a revoked
partition's pending offsets are committed before it goes, a lost one's are left to its new
owner; a failed commit is tried again; records not applied are read again, never skipped."""

import asyncio
import json
import uuid
from dataclasses import dataclass

import asyncpg
from aiokafka import TopicPartition
from pydantic import BaseModel, TypeAdapter

from shared.consumer import ConsumerLoop, Lane
from shared.pipeline import Batch, Pipeline, Subscription, pydantic_decoder
from shared.settings import ServiceSettings
from tests.support.fakes import FakePool

TOPIC = "t.pings"
TP0, TP1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


class Ping(BaseModel):
    event_id: uuid.UUID
    n: int


@dataclass
class FakeRecord:  # what aiokafka's getmany returns, as far as the loop reads it
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    headers: tuple = ()


def records(tp: TopicPartition, first: int, count: int) -> list[FakeRecord]:
    return [FakeRecord(tp.topic, tp.partition, first + i,
                       json.dumps({"event_id": str(uuid.uuid4()), "n": first + i}).encode())
            for i in range(count)]


class FakeKafka:
    """Hands out the scripted polls, then empty ones; remembers commits and seeks."""

    def __init__(self, *polls: dict[TopicPartition, list[FakeRecord]]) -> None:
        self.polls = list(polls)
        self.assigned = {TP0, TP1}
        self.commits: list[dict[TopicPartition, int]] = []
        self.fail_commits = 0
        self.seeks: list[tuple[TopicPartition, int]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def subscribe(self, topics, listener=None) -> None:
        pass

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, tp: TopicPartition) -> int | None:
        return None

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict:
        if self.polls:
            return self.polls.pop(0)
        await asyncio.sleep(0.005)
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.fail_commits:
            self.fail_commits -= 1
            raise RuntimeError("rebalance in progress")
        self.commits.append(dict(offsets))


class Applier:
    """The apply function: holds its batch while `gate` is closed, can fail for ever."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.committed: list[int] = []
        self.transient_forever = False

    async def __call__(self, batch: Batch[Ping]) -> None:
        self.started.set()
        await self.gate.wait()
        if self.transient_forever:
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        ns = [item.event.n for item in batch.items]
        batch.after_commit(lambda: self.committed.extend(ns))


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the state never came")
        await asyncio.sleep(0.005)


async def started_loop(kafka: FakeKafka, apply: Applier, *, commit_interval_ms: int = 0,
                       pool: FakePool | None = None, process=None) -> ConsumerLoop:
    sub = Subscription(topic=TOPIC, consumer="test.pings", decode=pydantic_decoder(TypeAdapter(Ping)),
                       apply=apply, dead_letter_topic="t.pings.dlq", door="pings consumer")
    pool = pool or FakePool()
    pipeline = Pipeline(lambda: pool, producer="test", max_attempts=2, backoff_s=0.001, max_backoff_s=0.01)
    if process is not None:
        pipeline.process = process  # type: ignore[method-assign]
    loop = ConsumerLoop(ServiceSettings(), group_id="g", client_id="c",
                        lane=Lane("main", fetch_max_wait_ms=10, poll_timeout_ms=10), subscriptions=[sub],
                        pipeline=pipeline, commit_interval_ms=commit_interval_ms)
    loop.consumer = kafka  # type: ignore[assignment]
    await loop.start()
    return loop


async def test_offsets_are_committed_only_after_the_batch_committed():
    kafka, apply, pool = FakeKafka({TP0: records(TP0, 0, 3), TP1: records(TP1, 10, 2)}), Applier(), FakePool()
    apply.gate.clear()
    loop = await started_loop(kafka, apply, pool=pool)
    await apply.started.wait()
    await asyncio.sleep(0.05)  # the batch is held inside its transaction
    assert kafka.commits == [] and pool.db.commits == 0
    apply.gate.set()
    await until(lambda: kafka.commits)
    await loop.stop()
    assert pool.db.commits == 1 and apply.committed == [0, 1, 2, 10, 11]
    assert kafka.commits[0] == {TP0: 3, TP1: 12}  # the offset after each partition's last record


async def test_a_batch_abandoned_at_stop_commits_no_offset():
    kafka, apply, pool = FakeKafka({TP0: records(TP0, 0, 3)}), Applier(), FakePool()
    apply.transient_forever = True  # retried for as long as it lasts
    loop = await started_loop(kafka, apply, pool=pool)
    await apply.started.wait()
    await loop.stop(grace_s=0.1)
    assert kafka.commits == [] and pool.db.commits == 0 and apply.committed == []


async def test_pending_offsets_of_a_revoked_partition_are_committed_before_it_goes():
    kafka, apply = FakeKafka({TP0: records(TP0, 0, 3), TP1: records(TP1, 0, 1)}), Applier()
    loop = await started_loop(kafka, apply, commit_interval_ms=60_000)  # no timed commit in this test
    await until(lambda: loop.batches == 1)
    await loop.partitions_revoked([TP0])
    assert kafka.commits == [{TP0: 3}]
    await loop.stop()
    assert kafka.commits == [{TP0: 3}, {TP1: 1}]


async def test_a_partition_lost_before_the_commit_is_left_to_its_new_owner():
    kafka, apply = FakeKafka({TP0: records(TP0, 0, 3), TP1: records(TP1, 0, 1)}), Applier()
    loop = await started_loop(kafka, apply, commit_interval_ms=60_000)
    await until(lambda: loop.batches == 1)
    kafka.assigned = {TP1}  # TP0 went to another member without a revocation here (a lost session)
    await loop.stop()
    assert kafka.commits == [{TP1: 1}]


async def test_a_failed_commit_is_tried_again_with_the_newest_offsets():
    kafka, apply = FakeKafka({TP0: records(TP0, 0, 3)}), Applier()
    kafka.fail_commits = 1
    loop = await started_loop(kafka, apply)
    await until(lambda: kafka.commits)
    await loop.stop()
    assert kafka.commits[0] == {TP0: 3}


async def test_records_the_pipeline_did_not_apply_are_read_again_from_their_first_offset():
    kafka, apply = FakeKafka({TP0: records(TP0, 5, 3)}), Applier()
    # A bug below the pipeline's own handling (say its dead-letter path itself fails).
    loop = await started_loop(kafka, apply, process=_raising)
    await until(lambda: kafka.seeks)
    await loop.stop()
    assert kafka.seeks[0] == (TP0, 5) and kafka.commits == []


async def _raising(sub, records):
    raise RuntimeError("a bug")
