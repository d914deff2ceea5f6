"""The life of one service process: migrate, connect, relay, consume; then stop cleanly.

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

from shared.db import create_pool, migrate
from shared.kafka import coalesce_commits, create_broker, create_producer
from shared.outbox import OutboxRelay
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

    def on_start(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run after the database, outbox and broker are up (e.g. a scheduler)."""
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
        await self.broker.start()
        coalesce_commits(self.broker, s.consumer_commit_interval_ms)
        for hook in self._on_start:
            await hook()
        log.info("service started", extra={"service": self.service})

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        for hook in self._on_stop:
            await hook()
        await self.broker.stop()
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
            checks["broker"] = await self.broker.ping(timeout=2)
        except Exception:
            pass
        for name, check in self._readiness_checks.items():
            try:
                checks[name] = bool(await check())
            except Exception:
                checks[name] = False
        return checks
