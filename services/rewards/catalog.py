"""The catalog: rewards and coupon pools (admin), what a customer may redeem, stock gauges."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from services.rewards import domain, metrics
from services.rewards.domain import Reward
from services.rewards.repository import RewardsRepository
from services.rewards.service import RewardsContext

log = logging.getLogger(__name__)

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
