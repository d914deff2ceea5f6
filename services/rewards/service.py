"""What the rewards use cases share: their context (settings, pool, clock, the waiters of
redemption outcomes) and the rewards.events they emit. The use cases, one module each:
catalog.py, redemptions.py (requests, cancellation, recovery), shipping.py, consuming.py
(points.events). Each owns its transaction (the shared pipeline's for points.events): open,
load, decide with domain rules, write state and outbox together, commit; then wake the relay
and the waiters."""

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import asyncpg

from services.rewards import domain, metrics
from services.rewards.domain import Redemption
from services.rewards.repository import RewardsRepository
from services.rewards.settings import RewardsSettings
from shared.events import derived_event_id, envelope, utcnow
from shared.events.rewards import (
    RedemptionCancelled,
    RedemptionCancelledPayload,
    RedemptionFailed,
    RedemptionFailedPayload,
    RedemptionFulfilled,
    RedemptionFulfilledPayload,
    RedemptionRequested,
    RedemptionRequestedPayload,
)
from shared.outbox import OutboxMessage
from shared.topics import REWARDS_EVENTS

log = logging.getLogger(__name__)

PRODUCER = "rewards"
POINTS_CONSUMER = "rewards.points-events"
# Failure reasons used as a metric label; anything else (a reason the ledger invents later)
# is counted as 'other' to keep the label's cardinality bounded.
KNOWN_REASONS = frozenset({
    "insufficient_points", "account_unknown", "invalid_amount", "out_of_stock", "coupon_pool_empty",
    "hold_expired", "ledger_timeout", "reward_not_found", "reward_inactive", "reward_expired",
    "reward_not_yet_valid", "redemption_closed", "customer_cancelled",
})


class Clock(Protocol):
    def __call__(self) -> datetime: ...


class OutcomeWaiters:
    """In-process futures keyed by redemption_id, resolved after the commit that decided
    the outcome. The consumer's resolution is only a shortcut: with several instances the
    ledger's answer may be consumed by another one, so `poll_once` (one query for all the
    waiters, however many) also resolves the ones whose outcome is in the database."""

    def __init__(self) -> None:
        # The result is the finished redemption when the resolver has it (no re-read needed),
        # or None when only its status is known.
        self._futures: dict[uuid.UUID, set[asyncio.Future[Redemption | None]]] = {}

    def register(self, redemption_id: uuid.UUID) -> asyncio.Future[Redemption | None]:
        fut: asyncio.Future[Redemption | None] = asyncio.get_running_loop().create_future()
        self._futures.setdefault(redemption_id, set()).add(fut)
        return fut

    def discard(self, redemption_id: uuid.UUID, fut: asyncio.Future[Redemption | None]) -> None:
        futs = self._futures.get(redemption_id)
        if futs is not None:
            futs.discard(fut)
            if not futs:
                del self._futures[redemption_id]

    def resolve(self, redemption_ids: Sequence[uuid.UUID]) -> None:
        for rid in redemption_ids:
            for fut in self._futures.pop(rid, ()):
                if not fut.done():
                    fut.set_result(None)

    def finish(self, redemptions: Sequence[Redemption]) -> None:
        for r in redemptions:
            for fut in self._futures.pop(r.redemption_id, ()):
                if not fut.done():
                    fut.set_result(r)

    def waiting(self) -> list[uuid.UUID]:
        return list(self._futures)

    async def poll_once(self, pool: asyncpg.Pool) -> int:
        """Resolve the waiters whose redemption is no longer in flight; returns how many."""
        ids = self.waiting()
        if not ids:
            return 0
        async with pool.acquire() as conn:
            statuses = await RewardsRepository(conn).statuses(redemption_ids=ids)
        done = [rid for rid, status in statuses.items() if status not in domain.IN_FLIGHT]
        self.resolve(done)
        return len(done)

    def __len__(self) -> int:
        return len(self._futures)


@dataclass
class RewardsContext:
    """The dependencies every use case gets (the composition root builds it)."""

    settings: RewardsSettings
    pool_getter: Callable[[], asyncpg.Pool]
    wake_relay: Callable[[], None]
    waiters: OutcomeWaiters = field(default_factory=OutcomeWaiters)
    now: Clock = utcnow

    @property
    def pool(self) -> asyncpg.Pool:
        return self.pool_getter()

    def topic(self, name: str) -> str:
        return self.settings.topic(name)


# ---- the redemption saga ---------------------------------------------------------------------


def saga_event_id(kind: str, redemption_id: uuid.UUID, cause: str) -> uuid.UUID:
    return derived_event_id(PRODUCER, kind, str(redemption_id), cause)


def requested_event(ctx: RewardsContext, r: Redemption, *, cause: str, now: datetime) -> OutboxMessage:
    event = envelope(
        RedemptionRequested,
        event_id=saga_event_id("RedemptionRequested", r.redemption_id, cause),
        occurred_at=now,
        producer=PRODUCER,
        correlation_id=r.correlation_id,
        customer_id=r.customer_id,
        payload=RedemptionRequestedPayload(
            redemption_id=r.redemption_id, reward_id=r.reward_id, cost_points=r.cost_points,
            hold_timeout_s=ctx.settings.hold_timeout_s,
        ),
    )
    return OutboxMessage.event(ctx.topic(REWARDS_EVENTS), event, key=r.customer_id)


def fulfilled_event(ctx: RewardsContext, r: Redemption, *, code: str | None, now: datetime, cause: str) -> OutboxMessage:
    event = envelope(
        RedemptionFulfilled,
        event_id=saga_event_id("RedemptionFulfilled", r.redemption_id, "fulfilled"),
        occurred_at=now,
        producer=PRODUCER,
        correlation_id=r.correlation_id,
        causation_id=cause,
        customer_id=r.customer_id,
        payload=RedemptionFulfilledPayload(
            redemption_id=r.redemption_id, reward_id=r.reward_id, cost_points=r.cost_points, kind=r.kind,
            code=code, fulfilled_at=now,
        ),
    )
    return OutboxMessage.event(ctx.topic(REWARDS_EVENTS), event, key=r.customer_id)


def failed_event(ctx: RewardsContext, r: Redemption, *, reason: str, now: datetime, cause: str) -> OutboxMessage:
    event = envelope(
        RedemptionFailed,
        event_id=saga_event_id("RedemptionFailed", r.redemption_id, cause),
        occurred_at=now,
        producer=PRODUCER,
        correlation_id=r.correlation_id,
        causation_id=cause,
        customer_id=r.customer_id,
        payload=RedemptionFailedPayload(
            redemption_id=r.redemption_id, reward_id=r.reward_id, cost_points=r.cost_points, reason=reason,
        ),
    )
    return OutboxMessage.event(ctx.topic(REWARDS_EVENTS), event, key=r.customer_id)


def cancelled_event(ctx: RewardsContext, r: Redemption, *, reason: str, now: datetime) -> OutboxMessage:
    event = envelope(
        RedemptionCancelled,
        event_id=saga_event_id("RedemptionCancelled", r.redemption_id, "cancelled"),
        occurred_at=now,
        producer=PRODUCER,
        correlation_id=r.correlation_id,
        customer_id=r.customer_id,
        payload=RedemptionCancelledPayload(
            redemption_id=r.redemption_id, reward_id=r.reward_id, cost_points=r.cost_points, reason=reason,
            was_fulfilled=True,
        ),
    )
    return OutboxMessage.event(ctx.topic(REWARDS_EVENTS), event, key=r.customer_id)


@dataclass
class BatchOutcome:
    """What a committed batch changed, for the waiters and the metrics."""

    finished: list[Redemption] = field(default_factory=list)


def redemptions_finished(ctx: RewardsContext, outcome: BatchOutcome) -> None:
    now = ctx.now()
    for r in outcome.finished:
        metrics.record_outcome(r.status, _reason_label(r.failure_reason))
        metrics.REDEMPTION_LATENCY.labels(r.status).observe(max((now - r.requested_at).total_seconds(), 0.0))
    ctx.waiters.finish(outcome.finished)


def _reason_label(reason: str | None) -> str | None:
    if reason is None:
        return None
    return reason if reason in KNOWN_REASONS else "other"
