"""Use cases of the rewards service. Each owns its transaction: open, load, decide with
domain rules, write state and outbox together, commit; then wake the relay and the waiters."""

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Annotated, Any, Protocol, Union

import asyncpg
from pydantic import Field, TypeAdapter, ValidationError

from services.rewards import domain, metrics
from services.rewards.domain import Redemption, Reward
from services.rewards.repository import QueueEntry, RewardsRepository, StandingRow
from services.rewards.settings import RewardsSettings
from shared.db import transaction
from shared.events import derived_event_id, envelope, utcnow
from shared.events.points import (
    POINTS_EVENT_TYPES,
    PointsHeld,
    PointsHoldRejected,
    PointsRedeemed,
    PointsReleased,
)
from shared.events.rewards import (
    RedemptionCancelled,
    RedemptionCancelledPayload,
    RedemptionDelivered,
    RedemptionDeliveredPayload,
    RedemptionFailed,
    RedemptionFailedPayload,
    RedemptionFulfilled,
    RedemptionFulfilledPayload,
    RedemptionRequested,
    RedemptionRequestedPayload,
    RedemptionShipped,
    RedemptionShippedPayload,
)
from shared.outbox import OutboxMessage, enqueue
from shared.pipeline import Batch, Record, Refused, dead_letter_message, json_errors
from shared.topics import REWARDS_DLQ, REWARDS_EVENTS

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


# ---- catalog (admin) -------------------------------------------------------------------------


async def create_reward(ctx: RewardsContext, reward: Reward) -> Reward:
    domain.check_reward_definition(reward, tier_order=ctx.settings.tiers())
    async with ctx.pool.acquire() as conn, conn.transaction():
        repo = RewardsRepository(conn)
        if not await repo.insert_reward(reward=reward):
            raise domain.InvalidReward(f"reward {reward.reward_id} exists already", field="reward_id")
        created = await repo.get_reward(reward_id=reward.reward_id)
    assert created is not None
    _publish_stock(created)
    return created


async def update_reward(ctx: RewardsContext, reward_id: str, changes: dict[str, Any]) -> Reward:
    async with ctx.pool.acquire() as conn, conn.transaction():
        repo = RewardsRepository(conn)
        current = await repo.get_reward(reward_id=reward_id, for_update=True)
        if current is None:
            raise domain.RewardNotFound(f"reward {reward_id} not found")
        updated = replace(current, **changes)
        domain.check_reward_definition(updated, tier_order=ctx.settings.tiers())
        await repo.update_reward(reward=updated)
        stored = await repo.get_reward(reward_id=reward_id)
    assert stored is not None
    _publish_stock(stored)
    return stored


async def get_reward(ctx: RewardsContext, reward_id: str) -> Reward:
    async with ctx.pool.acquire() as conn:
        reward = await RewardsRepository(conn).get_reward(reward_id=reward_id)
    if reward is None:
        raise domain.RewardNotFound(f"reward {reward_id} not found")
    return reward


async def list_rewards(ctx: RewardsContext, *, active_only: bool = False) -> list[Reward]:
    async with ctx.pool.acquire() as conn:
        return await RewardsRepository(conn).list_rewards(active_only=active_only)


async def upload_coupon_codes(ctx: RewardsContext, reward_id: str, codes: Sequence[str]) -> tuple[int, Reward]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        repo = RewardsRepository(conn)
        reward = await repo.get_reward(reward_id=reward_id, for_update=True)
        if reward is None:
            raise domain.RewardNotFound(f"reward {reward_id} not found")
        if reward.kind != "coupon":
            raise domain.InvalidReward(f"reward {reward_id} is a {reward.kind}, not a coupon", field="kind")
        added = await repo.add_coupon_codes(reward_id=reward_id, codes=codes)
        stored = await repo.get_reward(reward_id=reward_id)
    assert stored is not None
    _publish_stock(stored)
    return added, stored


def _publish_stock(reward: Reward) -> None:
    metrics.set_stock(
        reward.reward_id, kind=reward.kind, stock_remaining=reward.stock_remaining,
        coupons_available=reward.coupons_available or 0,
    )


async def sample_stock_levels(ctx: RewardsContext) -> None:
    async with ctx.pool.acquire() as conn:
        levels = await RewardsRepository(conn).stock_levels()
    for level in levels:
        metrics.set_stock(level.reward_id, kind=level.kind, stock_remaining=level.stock_remaining,
                          coupons_available=level.coupons_available)


# ---- catalog (customer) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    reward: Reward
    affordable_now: bool
    eligible: bool
    # Why not eligible: tier_too_low, customer_limit_reached, out_of_stock (None when eligible).
    ineligible_reason: str | None
    redeemed_count: int


@dataclass(frozen=True, slots=True)
class CustomerCatalog:
    standing: domain.CustomerStanding
    entries: list[CatalogEntry]


async def catalog_for(ctx: RewardsContext, customer_id: str) -> CustomerCatalog:
    """The rewards a customer can see now (active, within their validity window)."""
    now = ctx.now()
    tiers = ctx.settings.tiers()
    async with ctx.pool.acquire() as conn:
        repo = RewardsRepository(conn)
        rewards = await repo.list_rewards(active_only=True)
        standing = await repo.get_standing(customer_id=customer_id)
        counts = await repo.counts_for_limit(customer_id=customer_id)
    entries = []
    for reward in rewards:
        if domain.unavailable_reason(reward, now=now) is not None:
            continue
        count = counts.get(reward.reward_id, 0)
        reason = None
        if not domain.meets_tier(reward, standing, tiers):
            reason = "tier_too_low"
        elif reward.per_customer_limit is not None and count >= reward.per_customer_limit:
            reason = "customer_limit_reached"
        elif not domain.in_stock(reward):
            reason = "out_of_stock"
        entries.append(CatalogEntry(reward=reward, affordable_now=domain.is_affordable(reward, standing),
                                    eligible=reason is None, ineligible_reason=reason, redeemed_count=count))
    return CustomerCatalog(standing=standing, entries=entries)


# ---- the redemption saga ---------------------------------------------------------------------


def _event_id(kind: str, redemption_id: uuid.UUID, cause: str) -> uuid.UUID:
    return derived_event_id(PRODUCER, kind, str(redemption_id), cause)


def _requested_event(ctx: RewardsContext, r: Redemption, *, cause: str, now: datetime) -> OutboxMessage:
    event = envelope(
        RedemptionRequested,
        event_id=_event_id("RedemptionRequested", r.redemption_id, cause),
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


def _fulfilled_event(ctx: RewardsContext, r: Redemption, *, code: str | None, now: datetime, cause: str) -> OutboxMessage:
    event = envelope(
        RedemptionFulfilled,
        event_id=_event_id("RedemptionFulfilled", r.redemption_id, "fulfilled"),
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


def _failed_event(ctx: RewardsContext, r: Redemption, *, reason: str, now: datetime, cause: str) -> OutboxMessage:
    event = envelope(
        RedemptionFailed,
        event_id=_event_id("RedemptionFailed", r.redemption_id, cause),
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


def _cancelled_event(ctx: RewardsContext, r: Redemption, *, reason: str, now: datetime) -> OutboxMessage:
    event = envelope(
        RedemptionCancelled,
        event_id=_event_id("RedemptionCancelled", r.redemption_id, "cancelled"),
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


def customer_transaction(conn: asyncpg.Connection, *, customer_id: str) -> contextlib.AbstractAsyncContextManager[None]:
    """A transaction holding the customer's redemption lock (serialises one customer's
    requests: limit counting, idempotency keys), begun and locked in one round trip."""
    return transaction(conn, opening=RewardsRepository.customer_lock(customer_id))


@dataclass(frozen=True, slots=True)
class RequestResult:
    redemption: Redemption
    replayed: bool


async def request_redemption(
    ctx: RewardsContext, *, customer_id: str, reward_id: str, idempotency_key: str, correlation_id: str,
    delivery_address: dict[str, Any] | None = None,
) -> RequestResult:
    """Record the request and emit RedemptionRequested, or return the redemption this
    Idempotency-Key already created."""
    now = ctx.now()
    async with ctx.pool.acquire() as conn, customer_transaction(conn, customer_id=customer_id):
        repo = RewardsRepository(conn)
        context = await repo.request_context(customer_id=customer_id, idempotency_key=idempotency_key,
                                             reward_id=reward_id)
        if context.existing_id is not None:
            existing = await repo.get_redemption(redemption_id=context.existing_id)
            assert existing is not None
            domain.check_same_request(existing, reward_id=reward_id, delivery_address=delivery_address)
            return RequestResult(existing, replayed=True)
        reward = context.reward
        if reward is None:
            raise domain.RewardNotFound(f"reward {reward_id} not found")
        domain.check_redeemable(
            reward, standing=context.standing, counted_redemptions=context.counted_redemptions, now=now,
            tier_order=ctx.settings.tiers(),
        )
        domain.check_delivery_address(reward, delivery_address)
        redemption = Redemption(
            redemption_id=uuid.uuid4(), customer_id=customer_id, reward_id=reward_id,
            idempotency_key=idempotency_key, cost_points=reward.cost_points, kind=reward.kind, status="requested",
            ledger_status="pending", correlation_id=correlation_id, requested_at=now,
            delivery_address=delivery_address,
        )
        await repo.insert_redemption_with_event(
            redemption=redemption, event=_requested_event(ctx, redemption, cause="request", now=now))
    ctx.wake_relay()
    metrics.record_outcome("requested")
    return RequestResult(redemption, replayed=False)


async def wait_for_outcome(ctx: RewardsContext, redemption: Redemption) -> Redemption:
    """The redemption once it is no longer in flight, or as it is when the wait runs out.
    An outcome committed before the future was registered is caught by the waiters' poll."""
    if redemption.status not in domain.IN_FLIGHT:
        return redemption
    fut = ctx.waiters.register(redemption.redemption_id)
    finished: Redemption | None = None
    try:
        finished = await asyncio.wait_for(fut, timeout=ctx.settings.saga_wait_ms / 1000)
    except asyncio.TimeoutError:
        pass
    finally:
        ctx.waiters.discard(redemption.redemption_id, fut)
    if finished is not None:
        current = finished  # handed over by the commit that finished it: no second read
    else:
        async with ctx.pool.acquire() as conn:
            got = await RewardsRepository(conn).get_redemption(redemption_id=redemption.redemption_id)
        assert got is not None
        current = got
    metrics.SAGA_WAIT.labels("accepted" if current.status in domain.IN_FLIGHT else "answered").inc()
    return current


async def get_customer_redemption(ctx: RewardsContext, *, customer_id: str, redemption_id: uuid.UUID) -> Redemption:
    async with ctx.pool.acquire() as conn:
        r = await RewardsRepository(conn).get_customer_redemption(redemption_id=redemption_id, customer_id=customer_id)
    if r is None:
        raise domain.RedemptionNotFound(f"redemption {redemption_id} not found")
    return r


@dataclass(frozen=True, slots=True)
class RedemptionPage:
    redemptions: list[Redemption]
    more: bool  # older redemptions follow the page's last one


async def list_customer_redemptions(
    ctx: RewardsContext, *, customer_id: str, after: tuple[datetime, uuid.UUID] | None, limit: int,
    whole_requested_at: bool = False,
) -> RedemptionPage:
    """One page of the customer's redemptions, newest first, after the key (requested_at,
    redemption_id) of the previous page's last one. With `whole_requested_at`, a page whose
    last requested_at goes on past `limit` takes the rest of that instant's redemptions too
    (more than `limit`): the next page can then start at "requested_at < the last one" (the
    deprecated `before`) without skipping any."""
    async with ctx.pool.acquire() as conn:
        repo = RewardsRepository(conn)
        rows = await repo.list_customer_redemptions(customer_id=customer_id, after=after, limit=limit + 1)
        page, more = rows[:limit], len(rows) > limit
        if whole_requested_at and more and rows[limit].requested_at == page[-1].requested_at:
            last = page[-1]
            rest, more = await repo.rest_of_requested_at(customer_id=customer_id, requested_at=last.requested_at,
                                                         after_id=last.redemption_id)
            page += rest
    return RedemptionPage(page, more)


async def cancel_redemption(
    ctx: RewardsContext, *, customer_id: str, redemption_id: uuid.UUID, reason: str = "customer_cancelled"
) -> Redemption:
    now = ctx.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        repo = RewardsRepository(conn)
        r = await repo.get_customer_redemption(redemption_id=redemption_id, customer_id=customer_id, for_update=True)
        if r is None:
            raise domain.RedemptionNotFound(f"redemption {redemption_id} not found")
        domain.check_cancellable(r, now=now, window_s=ctx.settings.cancellation_window_s)
        cancelled = await repo.mark_cancelled(redemption_id=redemption_id, reason=reason, now=now)
        if domain.restocks_on_cancel(r.kind):
            await repo.return_stock(reward_id=r.reward_id)
        await enqueue(conn, [_cancelled_event(ctx, r, reason=reason, now=now)])
    ctx.wake_relay()
    metrics.record_outcome("cancelled", reason)
    return cancelled


# ---- fulfilment of physical rewards (admin) --------------------------------------------------


def _shipped_event(ctx: RewardsContext, r: Redemption) -> OutboxMessage:
    assert r.carrier is not None and r.shipped_at is not None
    event = envelope(
        RedemptionShipped,
        # One shipment per redemption: a derived id, so that nothing downstream can count it twice.
        event_id=_event_id("RedemptionShipped", r.redemption_id, "shipped"),
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
        event_id=_event_id("RedemptionDelivered", r.redemption_id, "delivered"),
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


# ---- the ledger's answers (points.events) ----------------------------------------------------

# Discriminated by `type`: each model's Literal type field is the tag.
_POINTS_EVENT: TypeAdapter[Any] = TypeAdapter(
    Annotated[Union[tuple(POINTS_EVENT_TYPES)], Field(discriminator="type")]  # type: ignore[valid-type]
)
_KNOWN_POINTS_TYPES = frozenset(cls.model_fields["type"].default for cls in POINTS_EVENT_TYPES)


def decode_points_record(record: Record) -> Any | None:
    """One points.events record: the event, None for a type this service has no use for
    (forward compatible), or Refused with why it can never be read."""
    try:
        data = json.loads(record.value)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Refused("invalid_json", [{"msg": str(exc)}]) from None
    if not isinstance(data, dict):
        raise Refused("not_an_object")
    if not isinstance(data.get("type"), str):
        raise Refused("invalid_event", [{"msg": "type must be a string"}])
    if data.get("type") not in _KNOWN_POINTS_TYPES:
        return None
    try:
        return _POINTS_EVENT.validate_python(data)
    except ValidationError as exc:
        raise Refused("invalid_event", json_errors(exc)) from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise Refused("invalid_event", [{"msg": f"{type(exc).__name__}: {exc}"}]) from None


def points_dead_letter(ctx: RewardsContext, record: Record, reason: str, errors: list[dict[str, Any]],
                       now: datetime) -> OutboxMessage:
    """rewards.dlq's shape: a record that failed on its own says why in its reason."""
    if reason == "processing_failed" and errors:
        reason = f"processing_failed: {errors[0].get('msg', '')}"[:500]
    return dead_letter_message(record, topic=ctx.topic(REWARDS_DLQ), door="points.events consumer",
                               producer=PRODUCER, reason=reason, errors=errors, now=now, consumer=PRODUCER)


def count_dead_letter(reason: str) -> None:
    metrics.POINTS_EVENTS_DEAD_LETTERED.labels(reason).inc()


@dataclass
class BatchOutcome:
    """What a committed batch changed, for the waiters and the metrics."""

    finished: list[Redemption] = field(default_factory=list)


def _after_commit(ctx: RewardsContext, outcome: BatchOutcome) -> None:
    now = ctx.now()
    for r in outcome.finished:
        metrics.record_outcome(r.status, _reason_label(r.failure_reason))
        metrics.REDEMPTION_LATENCY.labels(r.status).observe(max((now - r.requested_at).total_seconds(), 0.0))
    ctx.waiters.finish(outcome.finished)


def _reason_label(reason: str | None) -> str | None:
    if reason is None:
        return None
    return reason if reason in KNOWN_REASONS else "other"


async def apply_points_events(ctx: RewardsContext, batch: Batch[Any]) -> None:
    """The ledger's answers and balances, in the batch's one transaction: the standing
    projection, then each saga answer decided in order and the reservations they call for."""
    now = ctx.now()
    repo = RewardsRepository(batch.conn)
    events = batch.events
    saga = [e for e in events if type(e) in LEDGER_ANSWERS]
    locked = await repo.lock_answered(redemption_ids=[e.payload.redemption_id for e in saga],
                                      standings=_latest_standings(events))
    answers = _LedgerAnswers(ctx, repo, locked, now=now)
    for event in saga:
        await answers.apply(event)
    await answers.reserve_held()
    await repo.save_and_enqueue(redemptions=answers.changed(), messages=answers.messages)
    outcome = BatchOutcome(finished=answers.finished())

    def done() -> None:
        _after_commit(ctx, outcome)
        if answers.messages:  # written with the redemptions, not through batch.publish
            ctx.wake_relay()

    batch.after_commit(done)


def _latest_standings(events: Sequence[Any]) -> list[StandingRow]:
    latest: dict[str, StandingRow] = {}
    for e in events:
        balance = getattr(e.payload, "balance", None)
        if balance is None or not e.customer_id:
            continue
        latest[e.customer_id] = StandingRow(
            customer_id=e.customer_id, available_points=balance.available_points, held_points=balance.held_points,
            tier=balance.tier, qualifying_points=balance.qualifying_points, as_of=e.recorded_at,
        )
    return list(latest.values())


@dataclass(frozen=True, slots=True)
class _Held:
    """A redemption the ledger holds points for, waiting for its reservation."""

    redemption: Redemption
    hold_expires_at: datetime
    cause: str


# What a reservation gave: (the held redemption, its code, the failure reason or None).
Reservation = tuple[_Held, str | None, str | None]


class _LedgerAnswers:
    """One batch's ledger answers applied to its locked redemptions. Each answer is decided
    in order, in Python (domain.py); the reservations the holds call for are made together,
    a few statements per batch and reward instead of several per redemption, and every
    changed row is written back in one statement (RewardsRepository.save_redemptions)."""

    def __init__(self, ctx: RewardsContext, repo: RewardsRepository,
                 locked: dict[uuid.UUID, tuple[Redemption, Reward]], *, now: datetime) -> None:
        self.ctx, self.repo, self.now = ctx, repo, now
        self.initial = {rid: r for rid, (r, _) in locked.items()}
        self.current = dict(self.initial)
        self.messages: list[OutboxMessage] = []
        self._held_now: dict[uuid.UUID, _Held] = {}
        self._rewards: dict[str, Reward | None] = {reward.reward_id: reward for _, reward in locked.values()}

    async def apply(self, event: Any) -> None:
        rid = event.payload.redemption_id
        if rid not in self.current:
            # Not ours (another producer's redemption id) or a hold for a request this
            # database never committed: nothing to fulfil, and nothing we could void it for.
            log.warning("ledger answer for an unknown redemption", extra={"redemption_id": str(rid), "type": event.type})
            return
        if rid in self._held_now:
            await self.reserve_held()  # a second answer for it in this batch: decided on its outcome
        self._decide(self.current[rid], event)

    def _decide(self, r: Redemption, event: Any) -> None:
        LEDGER_ANSWERS[type(event)](self, r, event)

    def _held(self, r: Redemption, event: PointsHeld) -> None:
        """Points held: reserve (with the other holds of the batch), or refuse when the hold
        leaves too little time or the redemption is already decided."""
        hold_expires_at = event.payload.hold_expires_at
        decision, reason = domain.on_points_held(r, hold_expires_at=hold_expires_at, now=self.now,
                                                 margin_s=self.ctx.settings.hold_safety_margin_s)
        if decision == "reserve":
            self._held_now[r.redemption_id] = _Held(r, hold_expires_at, str(event.event_id))
        elif decision == "refuse":
            assert reason is not None
            if r.status == "requested":
                self._set(domain.fail(r, reason=reason, ledger_status="held", now=self.now,
                                      hold_expires_at=hold_expires_at))
            self.messages.append(_failed_event(self.ctx, r, reason=reason, now=self.now, cause=str(event.event_id)))

    def _rejected(self, r: Redemption, event: PointsHoldRejected) -> None:
        if domain.on_hold_rejected(r, reason=event.payload.reason):
            self._set(domain.fail(r, reason=str(event.payload.reason), ledger_status="rejected", now=self.now))

    def _redeemed(self, r: Redemption, event: PointsRedeemed) -> None:
        self._set(replace(r, ledger_status="redeemed"))

    def _released(self, r: Redemption, event: PointsReleased) -> None:
        if r.status == "fulfilled" and event.payload.phase == "void":
            # The ledger voided a hold we fulfilled (it expired first). Our
            # RedemptionFulfilled still reaches the ledger, which then takes the points
            # anyway (debt for what the balance no longer covers) and answers
            # PointsRedeemed, which sets ledger_status to redeemed.
            log.warning("ledger voided the hold of a fulfilled redemption; it redeems late",
                        extra={"redemption_id": str(r.redemption_id)})
        self._set(replace(r, ledger_status="released"))

    def _set(self, r: Redemption) -> None:
        self.current[r.redemption_id] = r

    async def reserve_held(self) -> None:
        """Reserve stock and code for the held redemptions: fulfil, or fail so the hold is
        voided. In the same transaction as the inbox claim of the PointsHeld: a crash before
        the commit leaves them requested and the PointsHeld redelivered."""
        if not self._held_now:
            return
        held = list(self._held_now.values())
        self._held_now.clear()
        for h, code, failure in await _reserve_all(self.repo, held, now=self.now, rewards=self._rewards):
            r, cause = h.redemption, h.cause
            if failure is not None:
                self._set(domain.fail(r, reason=failure, ledger_status="held", now=self.now,
                                      hold_expires_at=h.hold_expires_at))
                self.messages.append(_failed_event(self.ctx, r, reason=failure, now=self.now, cause=cause))
            else:
                self._set(domain.fulfil(r, code=code, hold_expires_at=h.hold_expires_at, now=self.now))
                self.messages.append(_fulfilled_event(self.ctx, r, code=code, now=self.now, cause=cause))

    def changed(self) -> list[Redemption]:
        return [r for rid, r in self.current.items() if r != self.initial[rid]]

    def finished(self) -> list[Redemption]:
        """The redemptions this batch took out of flight (their waiters get the answer)."""
        return [r for rid, r in self.current.items()
                if self.initial[rid].status in domain.IN_FLIGHT and r.status not in domain.IN_FLIGHT]


# What each of the ledger's answers does to its redemption; every other points.events type
# only updates the customer's standing (its balance).
LEDGER_ANSWERS: dict[type, Callable[[_LedgerAnswers, Redemption, Any], None]] = {
    PointsHeld: _LedgerAnswers._held,
    PointsHoldRejected: _LedgerAnswers._rejected,
    PointsRedeemed: _LedgerAnswers._redeemed,
    PointsReleased: _LedgerAnswers._released,
}


async def _reserve_all(repo: RewardsRepository, held: Sequence[_Held], *, now: datetime,
                       rewards: dict[str, Reward | None]) -> list[Reservation]:
    """Reservations for a batch of holds: the catalog rows read once, the limited stock of
    each reward locked once and taken once with the count, codes taken per reward at once."""
    missing = {h.redemption.reward_id for h in held} - rewards.keys()
    if missing:
        found = await repo.get_rewards(reward_ids=sorted(missing))
        rewards.update({reward_id: found.get(reward_id) for reward_id in missing})
    results: list[Reservation] = []
    by_reward: dict[str, list[_Held]] = {}
    for h in held:
        failure = domain.reservation_failure(rewards[h.redemption.reward_id], now=now)
        if failure is not None:
            results.append((h, None, failure))
        else:
            by_reward.setdefault(h.redemption.reward_id, []).append(h)
    limited = [reward_id for reward_id in by_reward if rewards[reward_id].stock_remaining is not None]  # type: ignore[union-attr]
    stock = await repo.lock_stock(reward_ids=limited) if limited else {}
    taken: dict[str, int] = {}
    for reward_id, group in by_reward.items():
        reward = rewards[reward_id]
        assert reward is not None
        reserved = await _reserve_for_reward(repo, reward, group, stock_left=stock.get(reward_id), now=now)
        results += reserved
        if reward_id in stock:
            taken[reward_id] = sum(1 for _, _, failure in reserved if failure is None)
    await repo.take_stock_units(units={reward_id: n for reward_id, n in taken.items() if n})
    return results


async def _reserve_for_reward(repo: RewardsRepository, reward: Reward, held: Sequence[_Held], *,
                              stock_left: int | None, now: datetime) -> list[Reservation]:
    """The holds of one reward, in batch order, as if reserved one after the other: a unit of
    stock each while it lasts (stock_left None: unlimited), then the code (coupon: from the
    pool while it lasts; voucher: generated). A coupon redemption left without a code takes
    no stock, so it fails coupon_pool_empty unless the stock is gone too."""
    served = list(held) if stock_left is None else list(held[:stock_left])
    if reward.kind == "coupon":
        codes = await repo.take_coupon_codes(reward_id=reward.reward_id,
                                             redemption_ids=[h.redemption.redemption_id for h in served],
                                             now=now) if served else {}
        reserved = [(h, codes[h.redemption.redemption_id]) for h in served if h.redemption.redemption_id in codes]
    elif reward.kind == "voucher":
        reserved = [(h, domain.new_voucher_code()) for h in served]
    else:
        reserved = [(h, None) for h in served]
    stock_gone = stock_left is not None and stock_left == len(reserved)
    refused = "out_of_stock" if stock_gone else "coupon_pool_empty"
    taken = {h.redemption.redemption_id for h, _ in reserved}
    return [(h, code, None) for h, code in reserved] + [(h, None, refused) for h in held
                                                        if h.redemption.redemption_id not in taken]


# ---- recovery --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    resent: int
    given_up: int


async def recover_unanswered(ctx: RewardsContext, *, limit: int = 500) -> RecoveryReport:
    """Resume redemptions the ledger has not answered: request them again (harmless, the
    ledger is idempotent by redemption_id), or give up after a hold's lifetime and emit
    RedemptionFailed so that any hold the ledger did take is voided. A hold that arrives
    and is not finished by a crash is redelivered by the broker and finished then."""
    now = ctx.now()
    resend_before = now - timedelta(seconds=ctx.settings.request_resend_after_s)
    finished: list[Redemption] = []
    messages: list[OutboxMessage] = []
    resent = 0
    async with ctx.pool.acquire() as conn, conn.transaction():
        repo = RewardsRepository(conn)
        for r, _attempts in await repo.lock_unanswered(requested_before=resend_before, limit=limit):
            if domain.should_give_up(r, now=now, hold_timeout_s=ctx.settings.hold_timeout_s):
                finished.append(await repo.mark_failed(redemption_id=r.redemption_id, reason="ledger_timeout",
                                                       ledger_status=r.ledger_status, now=now))
                messages.append(_failed_event(ctx, r, reason="ledger_timeout", now=now, cause="gave-up"))
            else:
                attempt = await repo.mark_requested_again(redemption_id=r.redemption_id, now=now)
                messages.append(_requested_event(ctx, r, cause=f"resend-{attempt}", now=now))
                resent += 1
        await enqueue(conn, messages)
    if resent:
        metrics.RECOVERY_ACTIONS.labels("resent").inc(resent)
    if finished:
        metrics.RECOVERY_ACTIONS.labels("given_up").inc(len(finished))
    _after_commit(ctx, BatchOutcome(finished=finished))
    if messages:
        ctx.wake_relay()
    if resent or finished:
        log.info("recovered unanswered redemptions", extra={"resent": resent, "given_up": len(finished)})
    return RecoveryReport(resent=resent, given_up=len(finished))
