"""Hostile input on purchases.raw: every input ends either recorded or in purchases.dlq with
a reason (never both, never neither), nothing blocks the partition, the service stays ready."""

import hashlib
import json

import pytest

from services.purchases.service import MAX_DEAD_LETTER_ORIGINAL_BYTES
from shared.topics import PURCHASES_DLQ, PURCHASES_RAW
from tests.support.hostile import (
    collect,
    eventually,
    fetch,
    kafka_mutations,
    metric_total,
    mutated_purchases,
    produce_raw,
)
from tests.support.kafka import consume
from tests.support.purchases import purchases_settings, running_purchases, sale

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Reasons a malformed input may carry; anything else would be a refusal nobody can act on.
REASONS = {"malformed_json", "schema", "unknown_currency", "total_mismatch", "timestamp_future", "timestamp_too_old",
           "conflict", "processing_error"}


async def _settle(settings, client_probe_id: str) -> None:
    """Wait until the probe (produced last, same partition) is recorded and the outbox is
    drained: everything produced before it was then processed and published."""
    async def probe_recorded():
        return await fetch(settings.database_url, "SELECT 1 FROM purchases.purchases WHERE purchase_id = $1",
                           client_probe_id)

    async def outbox_empty():
        return (await fetch(settings.database_url, "SELECT count(*) AS n FROM purchases.outbox"))[0]["n"] == 0

    await eventually(probe_recorded, timeout_s=30)
    await eventually(outbox_empty, timeout_s=30)


async def test_each_hostile_kafka_input_is_recorded_or_dead_lettered_with_a_reason(base_env, kafka_bootstrap):
    settings = purchases_settings(base_env)
    fixed = kafka_mutations(sale(customer_id="kafka-hostile"))
    generated = collect(mutated_purchases(lambda: sale(customer_id="kafka-property")), 60)
    items = fixed + [(f"property_{i}", json.dumps(g).encode()) for i, g in enumerate(generated)]
    probe = sale(customer_id="probe")
    async with running_purchases(settings) as (_, client):
        refused_before = await metric_total(client, "purchases_rejected_total", door="kafka")
        produced = await produce_raw(kafka_bootstrap, settings.topic(PURCHASES_RAW),
                                     items + [("probe", json.dumps(probe).encode())], key=b"hostile")
        await _settle(settings, probe["purchase_id"])
        dead = await consume(kafka_bootstrap, settings.topic(PURCHASES_DLQ), count=len(items), idle_s=1.5,
                             timeout_s=30)
        ready = await client.get("/readyz")
        refused = await metric_total(client, "purchases_rejected_total", door="kafka") - refused_before
    assert ready.status_code == 200
    assert refused == len(dead), "every dead letter is counted as a refusal"
    rows = {r["purchase_id"] for r in await fetch(settings.database_url, "SELECT purchase_id FROM purchases.purchases")}
    dead_at = {(d["original_partition"], d["original_offset"]): d for d in dead}
    assert len(dead_at) == len(dead), "one dead letter per refused input"
    recorded = []
    for p in produced[:-1]:
        letter = dead_at.pop((p.partition, p.offset), None)
        if p.label in dict(fixed):
            assert letter is not None, f"{p.label} was neither refused nor dead-lettered"
        if letter is None:
            recorded.append(json.loads(p.value)["purchase_id"])
            continue
        assert letter["reason"] in REASONS, (p.label, letter["reason"])
        assert letter["errors"] and all(e.get("msg") for e in letter["errors"]), (p.label, letter)
        assert letter["door"] == "kafka" and letter["original_key"] == "hostile"
        if len(p.value) > MAX_DEAD_LETTER_ORIGINAL_BYTES:  # kept in part, with its size and digest
            assert any(e["type"] == "original_truncated" and hashlib.sha256(p.value).hexdigest() in e["msg"]
                       for e in letter["errors"]), p.label
            kept = p.value[:MAX_DEAD_LETTER_ORIGINAL_BYTES]
        else:
            kept = p.value
        assert letter["original"] == kept.decode("utf-8", errors="replace"), p.label
    assert not dead_at, f"dead letters that match no input: {list(dead_at)}"
    # No partial write: the table holds exactly the inputs that were not dead-lettered.
    assert rows == set(recorded) | {probe["purchase_id"]}
    assert len(rows) == len(recorded) + 1
    reasons = {d["reason"] for d in dead}
    assert {"malformed_json", "schema"} <= reasons
