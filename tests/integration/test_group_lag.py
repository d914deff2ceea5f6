"""bench/harness.py group_lag (and tests/support/ledger.py caught_up, which polls it) against
the real broker: a group that committed up to where ListOffsets puts a partition's end still
lags when that end is under-reported. The embedded broker (Tansu 0.6) lists the end as the last
record batch's base offset + 1; after a batch of three at offsets 1-3 it says 2, so a lag
computed from it showed none while offsets 2 and 3 were unconsumed."""

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from bench.harness import end_offsets, group_lag
from tests.support.kafka import topic_ending_in_a_multi_record_batch
from tests.support.ledger import caught_up


async def commit(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: OffsetAndMetadata(offset, "")})
    finally:
        await consumer.stop()


async def test_a_group_committed_to_the_listed_end_of_a_multi_record_batch_still_lags(kafka_bootstrap, topic_prefix):
    topic, group = f"{topic_prefix}.lag", f"{topic_prefix}lag-group"
    await topic_ending_in_a_multi_record_batch(kafka_bootstrap, topic)
    tp = TopicPartition(topic, 0)
    probe = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None)
    await probe.start()
    try:
        listed = (await probe.end_offsets([tp]))[tp]  # 2 on Tansu 0.6, 4 on a broker without the quirk
    finally:
        await probe.stop()

    assert await end_offsets(kafka_bootstrap, topic, 2) == {0: 4, 1: 0}
    assert await group_lag(kafka_bootstrap, group, topic, 2) == {0: 4, 1: 0}  # nothing committed yet

    await commit(kafka_bootstrap, group, tp, listed)
    assert await group_lag(kafka_bootstrap, group, topic, 2) == {0: 4 - listed, 1: 0}
    if listed < 4:
        with pytest.raises(AssertionError, match="still lags"):
            await caught_up(kafka_bootstrap, group, topic, partitions=2, timeout_s=1)

    await commit(kafka_bootstrap, group, tp, 4)
    assert await group_lag(kafka_bootstrap, group, topic, 2) == {0: 0, 1: 0}
    await caught_up(kafka_bootstrap, group, topic, partitions=2, timeout_s=5)
