"""Topic names (one topic per stream, keyed by customer_id) and explicit topic creation."""

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from shared.kafka import client_options
from shared.settings import ServiceSettings

PURCHASES_RAW = "purchases.raw"
# Imported history (the importer CLI, or a system streaming its past purchases): the inbound
# contract plus the import policy; recorded as history on purchases.recorded.
PURCHASES_IMPORT = "purchases.import"
PURCHASES_RECORDED = "purchases.recorded"
PURCHASES_DLQ = "purchases.dlq"
POINTS_EVENTS = "points.events"
POINTS_DLQ = "points.dlq"
REWARDS_EVENTS = "rewards.events"
REWARDS_DLQ = "rewards.dlq"
# The back office's manual adjustments, as the ledger accepted them: part of the ledger's
# replayable input, next to purchases.recorded and rewards.events.
LEDGER_ADJUSTMENTS = "ledger.adjustments"
# Every version of the earning program, as the ledger saved it: a rebuild reads them first,
# so each purchase earns under the version it earned under originally.
LEDGER_PROGRAMS = "ledger.programs"
ENGAGEMENT_EVENTS = "engagement.events"
ENGAGEMENT_DLQ = "engagement.dlq"
CHURN_ALERTS = "churn.alerts"
CHURN_DLQ = "churn.dlq"

ALL_TOPICS = (
    PURCHASES_RAW,
    PURCHASES_IMPORT,
    PURCHASES_RECORDED,
    PURCHASES_DLQ,
    POINTS_EVENTS,
    POINTS_DLQ,
    REWARDS_EVENTS,
    REWARDS_DLQ,
    LEDGER_ADJUSTMENTS,
    LEDGER_PROGRAMS,
    ENGAGEMENT_EVENTS,
    ENGAGEMENT_DLQ,
    CHURN_ALERTS,
    CHURN_DLQ,
)

log = logging.getLogger(__name__)


async def ensure_topics(settings: ServiceSettings, names: tuple[str, ...] = ALL_TOPICS) -> list[str]:
    """Create the topics that do not exist yet, with the configured partition count.

    Never rely on broker auto-creation: the embedded broker would pick 4 partitions and a
    real cluster may be configured to refuse. Returns the names created by this call.
    """
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [settings.topic(n) for n in names]
        missing = [n for n in wanted if n not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [NewTopic(n, num_partitions=settings.topic_partitions, replication_factor=1) for n in missing]
                )
            except TopicAlreadyExistsError:
                pass  # another service created them first
            log.info("created topics", extra={"topics": missing})
        return missing
    finally:
        await admin.close()
