"""The one-shot topic-creation step of docker-compose (`python -m deploy.local.topics`),
run as a process against the real broker."""

import os
import subprocess
import sys
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from shared.topics import ALL_TOPICS

ROOT = Path(__file__).resolve().parents[2]


def run_topics_step(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.local.topics"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )


async def test_topics_step_creates_every_topic_with_the_configured_partitions_and_reruns(
    kafka_bootstrap, topic_prefix
):
    env = {
        "LOYALTY_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LOYALTY_TOPIC_PREFIX": topic_prefix,
        "LOYALTY_TOPIC_PARTITIONS": "3",
    }

    first = run_topics_step(env)
    assert first.returncode == 0, first.stderr
    again = run_topics_step(env)  # compose may run it on every `up`: must be idempotent
    assert again.returncode == 0, again.stderr
    assert "created none" in again.stdout

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        wanted = sorted(f"{topic_prefix}{name}" for name in ALL_TOPICS)
        described = await admin.describe_topics(wanted)
    finally:
        await admin.close()
    partitions = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
    assert partitions == {name: 3 for name in wanted}


def test_topics_step_fails_loudly_when_no_broker_answers():
    result = run_topics_step({
        "LOYALTY_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        # keep the bounded retry short in the test
        "LOYALTY_TOPICS_CONNECT_ATTEMPTS": "2",
    })
    assert result.returncode != 0
    assert "KafkaConnectionError" in result.stderr
