"""FastStream subscribers of the ledger: purchases.recorded, rewards.events and its own
ledger.adjustments, consumed in micro-batches. Decode nothing here (the use case
dead-letters what it cannot read), apply the batch in one transaction, let FastStream commit
the offsets after it. Publishers are declared for the AsyncAPI document; the outbox relay
does the publishing."""

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Union

import asyncpg
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.message import KafkaMessage

from services.ledger.service import (
    ADJUSTMENTS_CONSUMER,
    PURCHASES_CONSUMER,
    REWARDS_CONSUMER,
    Apply,
    Ledger,
    Record,
    apply_adjustments,
    apply_one_by_one,
    apply_purchases,
    apply_rewards,
)
from services.ledger.settings import LedgerSettings
from shared.events import DeadLetter
from shared.events.adjustments import AdjustmentRecorded
from shared.events.programs import ProgramVersionPublished
from shared.events.points import POINTS_EVENT_TYPES
from shared.kafka import consumer_options, the_message
from shared.logging import correlation_id
from shared.metrics import observe_consumer_lag
from shared.topics import (
    LEDGER_ADJUSTMENTS, LEDGER_PROGRAMS, POINTS_DLQ, POINTS_EVENTS, PURCHASES_RECORDED, REWARDS_EVENTS,
)

log = logging.getLogger(__name__)

# Infrastructure failures say nothing about the batch: retried without limit (with backoff),
# never dead-lettered. Anything else counts against the batch's bounded retries.
RETRYABLE = (OSError, asyncio.TimeoutError, asyncpg.exceptions.ConnectionFailureError,
             asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.InterfaceError,
             asyncpg.exceptions.TooManyConnectionsError, asyncpg.exceptions.DeadlockDetectedError,
             asyncpg.exceptions.SerializationError)


def _header(record: Any, name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            return value.decode(errors="replace")
    return None


class BatchConsumer:
    """Runs one stream's batches: retries a failing batch a bounded number of times, then
    applies it record by record so that only the poison record is dead-lettered."""

    def __init__(self, *, stream: str, consumer: str, apply: Apply, ledger: Ledger,
                 pool_getter: Callable[[], asyncpg.Pool], on_committed: Callable[[], None]) -> None:
        self.stream, self.consumer, self.apply, self.ledger = stream, consumer, apply, ledger
        self._pool_getter, self._on_committed = pool_getter, on_committed
        self._failures: dict[tuple[str, int, int], int] = {}
        self._backoff_s = 0.1

    async def __call__(self, message: KafkaMessage) -> None:  # the batch (decoder the_message)
        raw = message.raw_message if isinstance(message.raw_message, tuple) else (message.raw_message,)
        records = [Record(r.value or b"", r.key, r.topic, r.partition, r.offset) for r in raw]
        if not records:
            return
        correlation_id.set(_header(raw[0], "correlation_id"))
        pool = self._pool_getter()
        first = (records[0].topic, records[0].partition, records[0].offset)
        try:
            async with pool.acquire() as conn:
                await self.apply(conn, self.ledger, records)
        except RETRYABLE:
            log.warning("infrastructure error; the batch will be redelivered", exc_info=True,
                        extra={"stream": self.stream, "backoff_s": self._backoff_s})
            await asyncio.sleep(self._backoff_s)
            self._backoff_s = min(self._backoff_s * 2, 5.0)
            raise
        except Exception:
            attempts = self._failures.get(first, 0) + 1
            self._failures[first] = attempts
            if attempts < self.ledger.settings.max_delivery_attempts:
                log.exception("batch failed; it will be redelivered", extra={"stream": self.stream, "attempt": attempts})
                await asyncio.sleep(min(0.1 * 2**attempts, 5.0))
                raise
            log.error("batch failed %d times; applying it record by record", attempts, extra={"stream": self.stream})
            await apply_one_by_one(pool, self.ledger, records, self.apply, self.consumer)
            self._failures.pop(first, None)
        self._backoff_s = 0.1
        self._on_committed()
        observe_consumer_lag(message.consumer, raw)


def register_handlers(broker: KafkaBroker, *, settings: LedgerSettings, ledger: Ledger,
                      pool_getter: Callable[[], asyncpg.Pool], on_committed: Callable[[], None]) -> None:
    broker.publisher(settings.topic(POINTS_EVENTS), title="points.events",
                     description="Everything the ledger did to a customer's points, each with the balance after it; "
                                 "key customer_id", schema=Union[POINTS_EVENT_TYPES])  # type: ignore[valid-type]
    broker.publisher(settings.topic(POINTS_DLQ), title="points.dlq",
                     description="Inputs the ledger could not apply, with the reason", schema=DeadLetter)
    broker.publisher(settings.topic(LEDGER_ADJUSTMENTS), title="ledger.adjustments",
                     description="Manual adjustments accepted by the admin API, written in the transaction that "
                                 "applied them (never a refused one); event_id derives from adjustment_id; "
                                 "key customer_id. The ledger's own replayable input", schema=AdjustmentRecorded)
    broker.publisher(settings.topic(LEDGER_PROGRAMS), title="ledger.programs",
                     description="Every program version saved (file or admin API), with its effective time; key "
                                 "\"program\". Read whole by the ledger at start (not a subscription), so that a "
                                 "rebuild earns under the original versions", schema=ProgramVersionPublished)

    purchases = BatchConsumer(stream="purchases", consumer=PURCHASES_CONSUMER, apply=apply_purchases, ledger=ledger,
                              pool_getter=pool_getter, on_committed=on_committed)
    rewards = BatchConsumer(stream="rewards", consumer=REWARDS_CONSUMER, apply=apply_rewards, ledger=ledger,
                            pool_getter=pool_getter, on_committed=on_committed)
    adjustments = BatchConsumer(stream="adjustments", consumer=ADJUSTMENTS_CONSUMER, apply=apply_adjustments,
                                ledger=ledger, pool_getter=pool_getter, on_committed=on_committed)

    # Several consumers of purchases.recorded in one group and one process: each owns some
    # partitions (so, some customers), and while one batch waits for PostgreSQL another is
    # computed, which keeps both the interpreter and the database busy. A batch subscriber
    # cannot do this by itself (FastStream's max_workers does not apply to batches).
    for n in range(settings.purchases_consumers):
        def make_handler() -> Callable[..., Any]:
            async def on_purchases(body: Any) -> None:
                await purchases(body)
            on_purchases.__name__ = on_purchases.__qualname__ = f"on_purchases_{n}"
            return on_purchases

        broker.subscriber(
            settings.topic(PURCHASES_RECORDED), batch=True, ack_policy=AckPolicy.NACK_ON_ERROR, decoder=the_message,
            title=f"purchases.recorded#{n}",
            description="Sales, returns and claims: earn, reverse, earn on claim",
            **consumer_options(settings, service="ledger", purpose="purchases", bulk=True),
        )(make_handler())

    @broker.subscriber(
        settings.topic(REWARDS_EVENTS), batch=True, ack_policy=AckPolicy.NACK_ON_ERROR, decoder=the_message,
        title="rewards.events",
        description="The redemption saga: hold, post, void, refund",
        **consumer_options(settings, service="ledger", purpose="rewards"),
    )
    async def on_rewards(body: Any) -> None:
        await rewards(body)

    # The admin API applied each of these already and put its id in the inbox: here they are
    # no-ops. Read from offset 0 into an empty database (a rebuild), they apply the
    # adjustments again, with the same ids.
    @broker.subscriber(
        settings.topic(LEDGER_ADJUSTMENTS), batch=True, ack_policy=AckPolicy.NACK_ON_ERROR, decoder=the_message,
        # Its own title: the publisher above already names the channel "ledger.adjustments".
        # A bulk stream: nobody waits on it, so it may wait longer when idle (fewer idle fetches).
        title="ledger.adjustments#consumer",
        description="Manual adjustments: already applied by the admin API (inbox); applied again by a rebuild",
        **consumer_options(settings, service="ledger", purpose="adjustments", bulk=True),
    )
    async def on_adjustments(body: Any) -> None:
        await adjustments(body)
