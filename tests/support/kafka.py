"""Test helpers for talking to the real broker directly with aiokafka."""

import asyncio
import json
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


async def produce(bootstrap: str, topic: str, values: list[Any], *, key: str | None = None,
                  key_field: str | None = None) -> None:
    """Produce JSON values; keyed by `key`, or by each value's `key_field` (e.g. customer_id,
    so that a return lands in the partition of its sale, as a till keyed by customer does)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        futures = []
        for v in values:
            raw = v if isinstance(v, bytes) else json.dumps(v).encode()
            k = key if key_field is None or not isinstance(v, dict) else (v.get(key_field) or "")
            futures.append(await producer.send(topic, raw, key=k.encode() if k else None))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def consume(
    bootstrap: str, topic: str, *, count: int | None = None, timeout_s: float = 15.0, idle_s: float | None = None,
    distinct: str | None = None, at_least: int = 0,
) -> list[dict[str, Any]]:
    """Read a topic from the beginning (no group) until `count` messages arrived, the timeout
    passed, or (with `idle_s`) nothing new came for that long once `at_least` messages did (a
    relay that publishes late, on a loaded machine, is waited for; only what might follow is
    given `idle_s`). Returns decoded JSON values with `_key` added. With `distinct` (a field,
    e.g. "event_id"), a repeat of a value already read (an at-least-once redelivery) is
    dropped and does not count."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + 5
        while not partitions and time.monotonic() < deadline:
            await consumer.topics()  # refreshes metadata
            await asyncio.sleep(0.1)
            partitions = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[dict[str, Any]] = []
        seen: set[Any] = set()
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            got = False
            for records in batch.values():
                for r in records:
                    try:
                        value = json.loads(r.value)
                    except ValueError:
                        value = {"_raw": r.value.decode(errors="replace")}
                    if isinstance(value, dict):
                        value["_key"] = r.key.decode() if r.key else None
                        if distinct is not None:
                            if value.get(distinct) in seen:
                                continue
                            seen.add(value.get(distinct))
                    out.append(value)
                    got = True
            if got:
                last_new = time.monotonic()
            if count is not None and len(out) >= count:
                break
            if idle_s is not None and len(out) >= at_least and time.monotonic() - last_new > idle_s:
                break
        return out
    finally:
        await consumer.stop()


async def topic_ending_in_a_multi_record_batch(bootstrap: str, topic: str) -> None:
    """A topic of two partitions; partition 0 holds "a" (a batch of one, offset 0) then "b",
    "c", "d" in one record batch (offsets 1-3): the embedded broker lists that partition's end
    as the last batch's base offset + 1 (2), not 4."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await (await producer.send(topic, b"a", partition=0))
        batch = producer.create_batch()
        for value in (b"b", b"c", b"d"):
            batch.append(key=None, value=value, timestamp=None)
        batch.close()
        await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()


def unique(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"
