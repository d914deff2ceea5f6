"""The redemption saga's requests: redeem, wait for the outcome, read, cancel; the recovery of
redemptions the ledger has not answered."""

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.rewards import domain, metrics
from services.rewards.domain import Redemption
from services.rewards.repository import RewardsRepository
from services.rewards.service import (
    BatchOutcome,
    RewardsContext,
    cancelled_event,
    failed_event,
    redemptions_finished,
    requested_event,
)
from shared.db import transaction
from shared.outbox import OutboxMessage, enqueue

log = logging.getLogger(__name__)

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
            redemption=redemption, event=requested_event(ctx, redemption, cause="request", now=now))
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
        await enqueue(conn, [cancelled_event(ctx, r, reason=reason, now=now)])
    ctx.wake_relay()
    metrics.record_outcome("cancelled", reason)
    return cancelled


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
                messages.append(failed_event(ctx, r, reason="ledger_timeout", now=now, cause="gave-up"))
            else:
                attempt = await repo.mark_requested_again(redemption_id=r.redemption_id, now=now)
                messages.append(requested_event(ctx, r, cause=f"resend-{attempt}", now=now))
                resent += 1
        await enqueue(conn, messages)
    if resent:
        metrics.RECOVERY_ACTIONS.labels("resent").inc(resent)
    if finished:
        metrics.RECOVERY_ACTIONS.labels("given_up").inc(len(finished))
    redemptions_finished(ctx, BatchOutcome(finished=finished))
    if messages:
        ctx.wake_relay()
    if resent or finished:
        log.info("recovered unanswered redemptions", extra={"resent": resent, "given_up": len(finished)})
    return RecoveryReport(resent=resent, given_up=len(finished))
