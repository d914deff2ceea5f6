"""`python -m deploy.local.topics`: create every stream's topic with the configured partition
count, then exit. docker-compose runs it once before the services start, so that no topic is
ever auto-created with the broker's default partition count.

Settings are the shared ones with the LOYALTY_ prefix (LOYALTY_KAFKA_BOOTSTRAP_SERVERS,
LOYALTY_TOPIC_PARTITIONS, LOYALTY_TOPIC_PREFIX, SASL/TLS options).
"""

import asyncio
import logging
import os
import sys

from aiokafka.errors import KafkaConnectionError

from shared.settings import ServiceSettings
from shared.topics import ALL_TOPICS, ensure_topics

log = logging.getLogger("deploy.topics")

# The broker's healthcheck can pass a moment before it accepts admin requests.
CONNECT_ATTEMPTS = int(os.environ.get("LOYALTY_TOPICS_CONNECT_ATTEMPTS", "30"))
RETRY_DELAY_S = 2.0


async def create_topics(settings: ServiceSettings, *, attempts: int = CONNECT_ATTEMPTS,
                        retry_delay_s: float = RETRY_DELAY_S) -> list[str]:
    for attempt in range(1, attempts + 1):
        try:
            return await ensure_topics(settings, ALL_TOPICS)
        except KafkaConnectionError as exc:
            if attempt == attempts:
                raise
            log.warning("broker not reachable (%s), attempt %d/%d", exc, attempt, attempts)
            await asyncio.sleep(retry_delay_s)
    raise AssertionError("unreachable")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = ServiceSettings()
    created = asyncio.run(create_topics(settings))
    wanted = [settings.topic(name) for name in ALL_TOPICS]
    print(f"topics on {settings.kafka_bootstrap_servers}: {len(wanted)} wanted, created {created or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
