"""The consumer plumbing of shared/kafka.py, with fake consumers: a batch subscriber's poll
does not sleep after a poll that waited its full time (and never spins on one that came back
early), and coalesced offset commits commit what was consumed at each ack, later, once, and
only for partitions still assigned; stopping commits what is pending first."""

import asyncio
import time

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata
from faststream.kafka.subscriber.usecase import BatchSubscriber

from shared.kafka import CoalescedCommits, _get_batch

TP0, TP1 = TopicPartition("t", 0), TopicPartition("t", 1)


def test_faststream_batch_subscriber_uses_the_poll_without_sleep():
    assert BatchSubscriber.get_msg is _get_batch


class FakeBatch:
    def __init__(self, timeout_ms: int) -> None:
        self.batch_timeout_ms, self.max_records = timeout_ms, 10


class PollingConsumer:
    def __init__(self, results: list, *, wait: bool) -> None:
        self.results, self.wait, self.polls = results, wait, 0

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        self.polls += 1
        if self.wait:
            await asyncio.sleep(timeout_ms / 1000)
        return self.results.pop(0) if self.results else {}


async def test_an_empty_poll_that_waited_its_time_does_not_sleep_again(monkeypatch):
    # The sleeps are counted, not timed: on a loaded machine the poll alone may take longer
    # than a poll and a sleep would on an idle one.
    sleeps, sleep = [], asyncio.sleep

    async def counted_sleep(delay, *args, **kw):
        sleeps.append(delay)
        return await sleep(delay, *args, **kw)

    monkeypatch.setattr(asyncio, "sleep", counted_sleep)
    consumer = PollingConsumer([], wait=True)
    assert await _get_batch(FakeBatch(50), consumer) == ()
    assert sleeps == [0.05]  # the poll's own wait; FastStream's get_msg sleeps as long again


async def test_an_empty_poll_that_came_back_early_sleeps_the_rest_so_the_loop_cannot_spin():
    consumer = PollingConsumer([], wait=False)
    started = time.monotonic()
    assert await _get_batch(FakeBatch(50), consumer) == ()
    assert time.monotonic() - started >= 0.045


async def test_records_are_returned_as_one_tuple():
    consumer = PollingConsumer([{TP0: ["a", "b"], TP1: ["c"]}], wait=False)
    assert await _get_batch(FakeBatch(50), consumer) == ("a", "b", "c")


class Assignment:
    def __init__(self) -> None:
        self.positions: dict = {}

    def all_consumed_offsets(self) -> dict:
        return {tp: OffsetAndMetadata(p, "") for tp, p in self.positions.items()}


class Subscription:
    def __init__(self, assignment: Assignment) -> None:
        self.assignment = assignment


class SubscriptionState:
    def __init__(self, assignment: Assignment) -> None:
        self.subscription = Subscription(assignment)


class CommittingConsumer:
    def __init__(self) -> None:
        self.assigned = Assignment()
        self._subscription = SubscriptionState(self.assigned)
        self.commits: list[dict] = []
        self.stopped = False

    def assignment(self) -> set:
        return set(self.assigned.positions)

    async def commit(self, offsets: dict | None = None) -> None:
        self.commits.append({tp: o.offset for tp, o in (offsets or self.assigned.all_consumed_offsets()).items()})

    async def stop(self) -> None:
        self.stopped = True


async def commits_made(consumer: CommittingConsumer, count: int, *, timeout_s: float = 30.0) -> None:
    """Wait until the coalescer has made `count` commits (its timer runs when the loop gets
    to it, later on a loaded machine): the test then checks what they were."""
    deadline = time.monotonic() + timeout_s
    while len(consumer.commits) < count:
        assert time.monotonic() < deadline, f"{len(consumer.commits)} commits made, {count} expected"
        await asyncio.sleep(0.01)


async def test_acks_within_an_interval_make_one_commit_of_the_offsets_acked_last():
    consumer = CommittingConsumer()
    CoalescedCommits(consumer, 0.05)
    consumer.assigned.positions = {TP0: 5, TP1: 3}
    await consumer.commit()
    consumer.assigned.positions = {TP0: 9, TP1: 3}
    await consumer.commit()
    consumer.assigned.positions = {TP0: 12, TP1: 4}  # a batch handed over but not acked yet
    assert consumer.commits == []
    await commits_made(consumer, 1)
    assert consumer.commits == [{TP0: 9, TP1: 3}]
    await consumer.commit()
    await commits_made(consumer, 2)
    assert consumer.commits == [{TP0: 9, TP1: 3}, {TP0: 12, TP1: 4}]


async def test_a_partition_lost_before_the_commit_is_left_to_its_new_owner():
    consumer = CommittingConsumer()
    CoalescedCommits(consumer, 0.05)
    consumer.assigned.positions = {TP0: 5, TP1: 3}
    await consumer.commit()
    consumer.assigned.positions = {TP1: 3}
    await commits_made(consumer, 1)
    assert consumer.commits == [{TP1: 3}]


async def test_stopping_commits_what_is_pending_then_stops():
    consumer = CommittingConsumer()
    CoalescedCommits(consumer, 60)
    consumer.assigned.positions = {TP0: 7}
    await consumer.commit()
    await consumer.stop()
    assert consumer.commits == [{TP0: 7}] and consumer.stopped


async def test_explicit_offsets_are_committed_at_once():
    consumer = CommittingConsumer()
    CoalescedCommits(consumer, 60)
    consumer.assigned.positions = {TP0: 7}
    await consumer.commit({TP0: OffsetAndMetadata(4, "")})
    assert consumer.commits == [{TP0: 4}]


async def test_a_failed_commit_is_tried_again_with_the_newest_offsets():
    consumer = CommittingConsumer()
    failures = [RuntimeError("rebalance in progress")]
    original = consumer.commit

    async def flaky(offsets=None):
        if failures:
            raise failures.pop()
        await original(offsets)

    consumer.commit = flaky
    CoalescedCommits(consumer, 0.03)
    consumer.assigned.positions = {TP0: 5, TP1: 2}
    await consumer.commit()
    while failures:  # the first try failed
        await asyncio.sleep(0.01)
    consumer.assigned.positions = {TP0: 8, TP1: 2}
    await consumer.commit()
    await commits_made(consumer, 1)
    assert consumer.commits == [{TP0: 8, TP1: 2}]
