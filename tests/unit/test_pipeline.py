"""The shared consumer pipeline with an in-memory database: inbox, dead letters, the one
classification of transient errors, the one-by-one pass that dead-letters only data errors,
and metrics and callbacks counted after the commit only."""

import json
import uuid
from dataclasses import replace
from typing import Literal

import asyncpg
import pytest
from pydantic import BaseModel, TypeAdapter

from shared.outbox import OutboxMessage
from shared.pipeline import (
    Batch,
    Pipeline,
    Record,
    Refused,
    Subscription,
    pydantic_decoder,
)
from tests.support.fakes import FakePool


class Ping(BaseModel):
    event_id: uuid.UUID
    type: Literal["Ping"] = "Ping"
    n: int


def record(n: int | None = None, *, event_id: uuid.UUID | None = None, raw: bytes | None = None,
           offset: int = 0) -> Record:
    value = raw if raw is not None else json.dumps({"event_id": str(event_id or uuid.uuid4()), "type": "Ping",
                                                    "n": n}).encode()
    return Record(value, b"cust-1", "t.pings", 0, offset)


class Recorder:
    """An apply function that remembers what it applied (only once committed) and can be
    told to fail."""

    def __init__(self) -> None:
        self.committed: list[int] = []
        self.calls = 0
        self.poison: set[int] = set()
        self.transient_times = 0
        self.refuse: set[int] = set()

    async def __call__(self, batch: Batch[Ping]) -> None:
        self.calls += 1
        if self.transient_times:
            self.transient_times -= 1
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        for item in batch.items:
            if item.event.n in self.poison:
                raise ValueError(f"cannot apply {item.event.n}")
            if item.event.n in self.refuse:
                batch.refuse(item, "negative", [{"msg": "n must not be negative"}])
        ns = [i.event.n for i in batch.items if i.event.n not in self.refuse]
        batch.after_commit(lambda: self.committed.extend(ns))


def subscription(apply: Recorder) -> Subscription[Ping]:
    return Subscription(topic="t.pings", consumer="test.pings", decode=pydantic_decoder(TypeAdapter(Ping)),
                        apply=apply, dead_letter_topic="t.pings.dlq", door="pings consumer")


def pipeline(pool: FakePool) -> Pipeline:
    return Pipeline(lambda: pool, producer="test", max_attempts=3, backoff_s=0.0001)


def dead_letters(pool: FakePool) -> list[dict]:
    return [json.loads(row["value"]) for row in pool.db.outbox if row["topic"] == "t.pings.dlq"]


async def test_a_batch_is_applied_once_in_one_transaction_and_a_redelivery_is_a_duplicate():
    pool, apply = FakePool(), Recorder()
    records = [record(n) for n in range(5)]
    report = await pipeline(pool).process(subscription(apply), records)
    again = await pipeline(pool).process(subscription(apply), records)
    assert apply.committed == [0, 1, 2, 3, 4]
    assert (report.applied, again.applied, again.duplicates) == (5, 0, 5)
    assert pool.db.commits == 2


async def test_the_same_event_twice_in_one_batch_is_applied_once():
    pool, apply = FakePool(), Recorder()
    same = uuid.uuid4()
    report = await pipeline(pool).process(subscription(apply), [record(1, event_id=same), record(1, event_id=same)])
    assert apply.committed == [1]
    assert report.duplicates == 1


async def test_an_undecodable_record_is_dead_lettered_with_its_reason_and_the_rest_applied():
    pool, apply = FakePool(), Recorder()
    report = await pipeline(pool).process(subscription(apply), [record(1), record(raw=b"{not json", offset=1),
                                                                record(raw=b'{"type": "Ping"}', offset=2)])
    letters = dead_letters(pool)
    assert [d["reason"] for d in letters] == ["malformed_json", "schema"]
    assert letters[0]["original"] == "{not json" and letters[0]["door"] == "pings consumer"
    assert letters[0]["original_offset"] == 1
    assert apply.committed == [1] and report.dead_lettered == 2


async def test_a_redelivered_undecodable_record_is_dead_lettered_once():
    pool, apply = FakePool(), Recorder()
    bad = record(raw=b"nope", offset=7)
    await pipeline(pool).process(subscription(apply), [bad])
    await pipeline(pool).process(subscription(apply), [bad])
    assert len(dead_letters(pool)) == 1


async def test_a_transient_error_is_retried_and_never_dead_letters():
    pool, apply = FakePool(), Recorder()
    apply.transient_times = 10  # more than max_attempts: transient errors do not count
    report = await pipeline(pool).process(subscription(apply), [record(1), record(2)])
    assert apply.committed == [1, 2]
    assert dead_letters(pool) == []
    assert report.attempts == 11 and not report.one_by_one


async def test_a_poison_record_is_isolated_and_only_it_is_dead_lettered():
    pool, apply = FakePool(), Recorder()
    apply.poison = {2}
    report = await pipeline(pool).process(subscription(apply), [record(n, offset=n) for n in range(4)])
    assert apply.committed == [0, 1, 3]
    letters = dead_letters(pool)
    assert [(d["reason"], d["original_offset"]) for d in letters] == [("processing_failed", 2)]
    assert "cannot apply 2" in letters[0]["errors"][0]["msg"]
    assert report.one_by_one and report.dead_lettered == 1 and report.applied == 3


async def test_in_the_one_by_one_pass_a_good_record_meeting_a_deadlock_is_retried_not_dead_lettered():
    pool, apply = FakePool(), Recorder()
    apply.poison = {1}
    records = [record(0, offset=0), record(1, offset=1)]

    calls_before_isolation = 3  # max_attempts failed batch attempts

    original = apply.__call__

    async def flaky(batch):
        if apply.calls == calls_before_isolation and batch.items[0].event.n == 0:
            apply.calls += 1
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        await original(batch)

    sub = Subscription(topic="t.pings", consumer="test.pings", decode=pydantic_decoder(TypeAdapter(Ping)),
                       apply=flaky, dead_letter_topic="t.pings.dlq", door="pings consumer")
    await pipeline(pool).process(sub, records)
    assert apply.committed == [0]
    assert [d["original_offset"] for d in dead_letters(pool)] == [1]


async def test_callbacks_and_counts_come_only_from_the_attempt_that_committed():
    pool, apply = FakePool(), Recorder()
    apply.transient_times = 2
    await pipeline(pool).process(subscription(apply), [record(5)])
    assert apply.committed == [5]  # not [5, 5, 5]: the rolled-back attempts left nothing
    assert pool.db.rollbacks == 2


async def test_an_input_the_use_case_refuses_is_dead_lettered_in_the_same_transaction():
    pool, apply = FakePool(), Recorder()
    apply.refuse = {-1}
    report = await pipeline(pool).process(subscription(apply), [record(-1), record(3)])
    assert [d["reason"] for d in dead_letters(pool)] == ["negative"]
    assert apply.committed == [3]
    assert (report.applied, report.dead_lettered) == (1, 1)
    assert pool.db.commits == 1


async def test_an_event_of_another_type_is_skipped_when_the_decoder_knows_its_types():
    pool, apply = FakePool(), Recorder()
    decode = pydantic_decoder(TypeAdapter(Ping), known_types=frozenset({"Ping"}))
    sub = Subscription(topic="t.pings", consumer="test.pings", decode=decode, apply=apply,
                       dead_letter_topic="t.pings.dlq", door="pings consumer")
    other = Record(json.dumps({"event_id": str(uuid.uuid4()), "type": "Pong"}).encode(), None, "t.pings", 0, 0,
                   (("type", b"Pong"),))
    report = await pipeline(pool).process(sub, [other, record(1)])
    assert report.skipped == 1 and apply.committed == [1] and dead_letters(pool) == []


async def test_the_service_counts_its_dead_letters_after_the_commit_only_and_may_shape_them():
    """on_dead_letter sees each dead letter of the attempt that committed (one, though the
    record failed every attempt before), dead_letter builds it in the service's own shape."""
    pool, apply = FakePool(), Recorder()
    apply.poison = {2}
    counted: list[str] = []

    def shaped(rec, reason, errors, now):
        return OutboxMessage("t.pings.dlq", rec.key_text(), json.dumps({"reason": f"{reason}!"}).encode(), {})

    sub = replace(subscription(apply), on_dead_letter=counted.append, dead_letter=shaped)
    report = await pipeline(pool).process(sub, [record(1), record(2, offset=1), record(raw=b"{", offset=2)])
    assert counted == ["processing_failed", "malformed_json"]  # in the order of the one-by-one pass
    assert sorted(d["reason"] for d in dead_letters(pool)) == ["malformed_json!", "processing_failed!"]
    assert report.dead_lettered == 2 and apply.committed == [1]


async def test_a_batch_tells_how_many_records_were_read_duplicates_included():
    pool, seen = FakePool(), []

    async def apply(batch: Batch[Ping]) -> None:
        seen.append((batch.read, len(batch.items)))

    sub = Subscription(topic="t.pings", consumer="test.pings", decode=pydantic_decoder(TypeAdapter(Ping)),
                       apply=apply, dead_letter_topic="t.pings.dlq", door="pings consumer")
    same = uuid.uuid4()
    await pipeline(pool).process(sub, [record(1, event_id=same), record(1, event_id=same), record(2)])
    assert seen == [(3, 2)]


def test_a_refusal_carries_a_reason_and_its_errors():
    refused = Refused("schema", [{"msg": "x"}])
    assert refused.reason == "schema" and refused.errors == [{"msg": "x"}]


@pytest.mark.parametrize("exc,transient", [
    (asyncpg.DeadlockDetectedError("d"), True), (ConnectionResetError(), True), (TimeoutError(), True),
    (asyncpg.UniqueViolationError("u"), False), (ValueError("v"), False), (KeyError("k"), False),
])
def test_one_classification_of_transient_errors(exc, transient):
    from shared.errors import is_transient
    assert is_transient(exc) is transient
