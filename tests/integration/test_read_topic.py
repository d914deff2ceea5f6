"""shared/kafka.py read_topic against the real broker: a topic read whole from offset 0, also
when its last record batch holds several records (the embedded broker then reports the
partition's end as the batch's base offset + 1: a reader that trusted it lost the rest; that is
how a rebuilt ledger once missed the last of two program versions published in one batch)."""

from shared.kafka import read_topic
from shared.settings import ServiceSettings
from tests.support.kafka import topic_ending_in_a_multi_record_batch


async def test_a_topic_is_read_whole_even_when_its_last_batch_holds_several_records(kafka_bootstrap, topic_prefix):
    topic = f"{topic_prefix}.read-whole"
    await topic_ending_in_a_multi_record_batch(kafka_bootstrap, topic)
    settings = ServiceSettings(kafka_bootstrap_servers=kafka_bootstrap)

    records = await read_topic(settings, topic, timeout_s=15)

    assert [(r.partition, r.offset, r.value) for r in records] == [(0, 0, b"a"), (0, 1, b"b"), (0, 2, b"c"), (0, 3, b"d")]
