"""The life of one service process: migrate, connect, relay, consume; then stop cleanly.

A service declares what it reads (`subscribe`, with a `Subscription` of shared/pipeline.py),
its lanes (`lane`) and its periodic jobs (`every`); the runtime runs them.
`ServiceRuntime.start()` is called from the ASGI lifespan, never at import time.
Graceful shutdown order: stop consuming (in-flight batches finish and commit, or are
abandoned uncommitted and redelivered), then drain the outbox, then close connections.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from faststream.kafka import KafkaBroker

from shared.consumer import ConsumerLoop, Lane
from shared.db import create_pool, migrate
from shared.inbox import inbox_retention_job
from shared.kafka import create_broker, create_producer
from shared.outbox import OutboxRelay
from shared.periodic import every
from shared.pipeline import Pipeline, Subscription
from shared.settings import ServiceSettings
from shared.topics import ALL_TOPICS, ensure_topics

log = logging.getLogger(__name__)


class ServiceRuntime:
    def __init__(
        self,
        settings: ServiceSettings,
        *,
        service: str,
        schema: str,
        migrations_dir: Path,
        description: str,
        topics: tuple[str, ...] = ALL_TOPICS,
    ) -> None:
        self.settings = settings
        self.service = service
        self.schema = schema
        self.migrations_dir = migrations_dir
        self.topics = topics
        self.broker: KafkaBroker = create_broker(settings, client_id=service, description=description)
        self.pool: asyncpg.Pool | None = None
        self.relay: OutboxRelay | None = None
        self._producer = None
        self._background: list[asyncio.Task[None]] = []
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._readiness_checks: dict[str, Callable[[], Awaitable[bool]]] = {}
        self.pipeline = Pipeline(lambda: self.pool, producer=service, on_committed=self._wake_relay,
                                 max_attempts=settings.max_delivery_attempts)
        self.subscriptions: list[Subscription] = []
        self.lanes: dict[str, Lane] = {}
        self.consumers: list[ConsumerLoop] = []
        # Where a refused input from a door without a topic (HTTP, webhooks) goes back to when
        # an operator replays it: door name -> topic (shared/deadletters.py).
        self.dead_letter_doors: dict[str, str] = {}
        self._periodic: list[tuple[float, str, Callable[[], Awaitable[object]], float | None]] = []

    def _wake_relay(self) -> None:
        if self.relay is not None:
            self.relay.wake()

    def lane(self, name: str, *, bulk: bool = False, fetch_max_wait_ms: int | None = None,
             instances: int = 1, max_records: int | None = None) -> Lane:
        """Declare a lane: the subscriptions in it share one consumer (per instance) and one
        group, `<prefix>.<service>.<lane>`. A `bulk` lane (nobody waits on it) takes the longer
        fetch wait of the settings, a latency lane the short one. `max_records` bounds a batch
        (default consumer_batch_max_records): larger for a stream nobody waits on (history)."""
        s = self.settings
        wait = fetch_max_wait_ms if fetch_max_wait_ms is not None else (
            s.consumer_bulk_fetch_max_wait_ms if bulk else s.consumer_fetch_max_wait_ms)
        lane = Lane(name, fetch_max_wait_ms=wait, instances=instances,
                    max_records=max_records or s.consumer_batch_max_records,
                    idle_after_ms=s.consumer_idle_after_ms,
                    idle_poll_ms=s.consumer_bulk_idle_poll_ms if bulk else s.consumer_idle_poll_ms)
        self.lanes[name] = lane
        return lane

    def wake_lane(self, name: str) -> None:
        """A record is expected on this lane soon (the answer to a request just sent): its
        consumers leave idle mode now instead of at their next idle poll."""
        for consumer in self.consumers:
            if consumer.lane.name == name:
                consumer.wake()

    def subscribe(self, subscription: Subscription) -> None:
        """Read `subscription.topic` through the pipeline, in the subscription's lane (declared
        with `lane`, or a latency lane of that name by default). Also described in AsyncAPI."""
        if subscription.lane not in self.lanes:
            self.lane(subscription.lane)
        if any(s.topic == subscription.topic for s in self.subscriptions):
            raise ValueError(f"{subscription.topic} is subscribed twice")
        self.subscriptions.append(subscription)
        _describe(self.broker, subscription, group_id=self.settings.group_id(self.service, subscription.lane))

    def every(self, interval_s: float, name: str, job: Callable[[], Awaitable[object]], *,
              first_delay_s: float | None = None) -> None:
        """A periodic job (shared/periodic.py), started once the service is up: at once, or
        after `first_delay_s` (a job that also runs at start some other way)."""
        self._periodic.append((interval_s, name, job, first_delay_s))

    def on_start(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run after the database, outbox and consumers are up (e.g. a loader)."""
        self._on_start.append(hook)

    def on_stop(self, hook: Callable[[], Awaitable[None]]) -> None:
        self._on_stop.append(hook)

    def add_readiness_check(self, name: str, check: Callable[[], Awaitable[bool]]) -> None:
        """A check of the service's own, reported by /readyz next to the database and the
        broker (ready only if every check is true; one that raises counts as false)."""
        self._readiness_checks[name] = check

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        self._background.append(asyncio.create_task(coro, name=name))

    async def start(self) -> None:
        s = self.settings
        await migrate(s.database_url, schema=self.schema, migrations_dir=self.migrations_dir)
        self.pool = await create_pool(
            s.database_url, schema=self.schema, min_size=s.database_pool_min, max_size=s.database_pool_max
        )
        await ensure_topics(s, self.topics)
        self._producer = create_producer(s, client_id=f"{self.service}-outbox")
        await self._producer.start()
        self.relay = OutboxRelay(
            self.pool, self._producer, batch_size=s.outbox_batch_size, poll_interval_ms=s.outbox_poll_interval_ms
        )
        self.relay.start()
        if any(not getattr(sub, "_described_only", False) for sub in self.broker.subscribers):
            # The broker only describes the topics (AsyncAPI): consuming is shared/consumer.py's.
            raise RuntimeError("consume through runtime.subscribe, not FastStream subscribers")
        await self._start_consumers()
        for hook in self._on_start:
            await hook()
        retention = inbox_retention_job(s, lambda: self.pool)  # every service sweeps its inbox
        for interval_s, name, job, first_delay_s in self._periodic + ([(*retention, None)] if retention else []):
            self.spawn(every(interval_s, name, job, first_delay_s=first_delay_s), name)
        log.info("service started", extra={"service": self.service})

    async def _start_consumers(self) -> None:
        self.pipeline.stopping = False
        for lane in self.lanes.values():
            subs = [sub for sub in self.subscriptions if sub.lane == lane.name]
            if not subs:
                continue
            for n in range(lane.instances):
                self.consumers.append(ConsumerLoop(
                    self.settings, group_id=self.settings.group_id(self.service, lane.name),
                    client_id=f"{self.service}-{lane.name}-{n}", lane=lane, subscriptions=subs,
                    pipeline=self.pipeline))
        # All at once: each joins its group in the background (no group waits for another).
        await asyncio.gather(*(c.start() for c in self.consumers))

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        for hook in self._on_stop:
            await hook()
        await asyncio.gather(*(c.stop() for c in self.consumers), return_exceptions=True)
        self.consumers = []
        if self.relay is not None:
            await self.relay.stop()
        if self._producer is not None:
            await self._producer.stop()
        if self.pool is not None:
            await self.pool.close()
        log.info("service stopped", extra={"service": self.service})

    async def readiness(self) -> dict[str, bool]:
        checks = {"database": False, "broker": False}
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.fetchval("SELECT 1"), timeout=2)
                checks["database"] = True
            except Exception:
                pass
        try:
            if self.consumers:
                checks["broker"] = await self.consumers[0].ready()
            elif self._producer is not None and self.topics:  # a service that consumes nothing
                await asyncio.wait_for(self._producer.partitions_for(self.settings.topic(self.topics[0])), timeout=2)
                checks["broker"] = True
        except Exception:
            pass
        for name, check in self._readiness_checks.items():
            try:
                checks[name] = bool(await check())
            except Exception:
                checks[name] = False
        return checks


def _describe(broker: KafkaBroker, subscription: Subscription, *, group_id: str) -> None:
    """Put a subscription in the AsyncAPI document (a FastStream subscriber that is never
    started: shared/consumer.py does the consuming), with the schema of its events."""

    async def consume(body) -> None:  # pragma: no cover - never called
        raise AssertionError("described only")

    consume.__annotations__ = {"body": subscription.schema if subscription.schema is not None else bytes,
                               "return": None}
    consume.__name__ = consume.__qualname__ = f"consume_{subscription.topic.replace('.', '_')}"
    described = broker.subscriber(subscription.topic, group_id=group_id, title=f"{subscription.topic}#consumer",
                                  description=subscription.description or f"read by {subscription.consumer}")
    described(consume)
    described._described_only = True  # type: ignore[attr-defined]
