"""Fulfilment of physical rewards (admin): ship, deliver, the fulfilment queue and its gauges."""

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from services.rewards import domain, metrics
from services.rewards.domain import Redemption
from services.rewards.repository import QueueEntry, RewardsRepository
from services.rewards.service import PRODUCER, RewardsContext, saga_event_id
from shared.events import envelope
from shared.events.rewards import (
    RedemptionDelivered,
    RedemptionDeliveredPayload,
    RedemptionShipped,
    RedemptionShippedPayload,
)
from shared.outbox import OutboxMessage, enqueue
from shared.topics import REWARDS_EVENTS

log = logging.getLogger(__name__)

def _shipped_event(ctx: RewardsContext, r: Redemption) -> OutboxMessage:
    assert r.carrier is not None and r.shipped_at is not None
    event = envelope(
        RedemptionShipped,
        # One shipment per redemption: a derived id, so that nothing downstream can count it twice.
        event_id=saga_event_id("RedemptionShipped", r.redemption_id, "shipped"),
        occurred_at=r.shipped_at,
        producer=PRODUCER,
        correlation_id=r.correlation_id,
        customer_id=r.customer_id,
        payload=RedemptionShippedPayload(
            redemption_id=r.redemption_id, reward_id=r.reward_id, cost_points=r.cost_points, carrier=r.carrier,
            tracking_number=r.tracking_number, tracking_url=r.tracking_url, shipped_at=r.shipped_at,
        ),
    )
    return OutboxMessage.event(ctx.topic(REWARDS_EVENTS), event, key=r.customer_id)


def _delivered_event(ctx: RewardsContext, r: Redemption) -> OutboxMessage:
    assert r.delivered_at is not None
    event = envelope(
        RedemptionDelivered,
        event_id=saga_event_id("RedemptionDelivered", r.redemption_id, "delivered"),
        occurred_at=r.delivered_at,
        producer=PRODUCER,
        correlation_id=r.correlation_id,
        customer_id=r.customer_id,
        payload=RedemptionDeliveredPayload(
            redemption_id=r.redemption_id, reward_id=r.reward_id, cost_points=r.cost_points,
            delivered_at=r.delivered_at,
        ),
    )
    return OutboxMessage.event(ctx.topic(REWARDS_EVENTS), event, key=r.customer_id)


@dataclass(frozen=True, slots=True)
class ShipmentResult:
    redemption: Redemption
    changed: bool  # False: the same call was already applied (nothing new recorded or emitted)


async def ship_redemption(
    ctx: RewardsContext, *, redemption_id: uuid.UUID, shipment: domain.Shipment
) -> ShipmentResult:
    """Record the shipment of a fulfilled physical redemption and emit RedemptionShipped, in
    one transaction. The row lock orders it with a customer's cancellation: whichever comes
    second sees the other's outcome."""
    return await _change_shipment(
        ctx, redemption_id, lambda r: domain.ship(r, shipment, now=ctx.now()), _shipped_event, "shipped")


async def deliver_redemption(
    ctx: RewardsContext, *, redemption_id: uuid.UUID, delivered_at: datetime | None, actor: str
) -> ShipmentResult:
    return await _change_shipment(
        ctx, redemption_id, lambda r: domain.deliver(r, delivered_at=delivered_at, actor=actor, now=ctx.now()),
        _delivered_event, "delivered")


async def _change_shipment(
    ctx: RewardsContext, redemption_id: uuid.UUID, decide: Callable[[Redemption], Redemption | None],
    event: Callable[[RewardsContext, Redemption], OutboxMessage], counted_as: str,
) -> ShipmentResult:
    async with ctx.pool.acquire() as conn, conn.transaction():
        repo = RewardsRepository(conn)
        current = await repo.get_redemption(redemption_id=redemption_id, for_update=True)
        if current is None:
            raise domain.RedemptionNotFound(f"redemption {redemption_id} not found")
        changed = decide(current)
        if changed is None:
            return ShipmentResult(current, changed=False)
        await repo.save_shipment(redemption=changed)
        await enqueue(conn, [event(ctx, changed)])
    ctx.wake_relay()
    metrics.SHIPMENTS.labels(counted_as).inc()
    log.info("redemption %s", counted_as, extra={"redemption_id": str(redemption_id)})
    return ShipmentResult(changed, changed=True)


async def get_redemption(ctx: RewardsContext, *, redemption_id: uuid.UUID) -> Redemption:
    async with ctx.pool.acquire() as conn:
        r = await RewardsRepository(conn).get_redemption(redemption_id=redemption_id)
    if r is None:
        raise domain.RedemptionNotFound(f"redemption {redemption_id} not found")
    return r


async def shipment_queue(
    ctx: RewardsContext, *, state: domain.ShipmentState, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[QueueEntry]:
    async with ctx.pool.acquire() as conn:
        return await RewardsRepository(conn).shipment_queue(state=state, after=after, limit=limit)


async def sample_shipment_queue(ctx: RewardsContext) -> None:
    async with ctx.pool.acquire() as conn:
        counts = await RewardsRepository(conn).shipment_counts()
    metrics.AWAITING_SHIPMENT.set(counts.awaiting)
    oldest = counts.oldest_fulfilled_at
    metrics.AWAITING_SHIPMENT_OLDEST.set(max((ctx.now() - oldest).total_seconds(), 0.0) if oldest else 0.0)
