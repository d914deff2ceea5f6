"""Pure rules of rewards and redemptions: who may redeem what, what a ledger answer means
for a redemption, and when a redemption may be cancelled. No I/O; named errors."""

import secrets
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

RewardKind = Literal["coupon", "voucher", "physical"]
RedemptionStatus = Literal["requested", "fulfilled", "failed", "cancelled"]
# What the ledger last told us about the points of a redemption.
LedgerStatus = Literal["pending", "held", "rejected", "redeemed", "released"]
# Where a physical reward is after the saga fulfilled it. Kept apart from the status: a
# shipped redemption is still 'fulfilled' (the saga's word); only awaiting_shipment is
# derived, the other two are stored with the shipment.
ShipmentState = Literal["awaiting_shipment", "shipped", "delivered"]

IN_FLIGHT: frozenset[str] = frozenset({"requested"})
TERMINAL: frozenset[str] = frozenset({"fulfilled", "failed", "cancelled"})
# Redemptions that count against a per-customer limit: the ones that did or may still
# give the reward. Failed and cancelled ones give the slot back.
COUNTED_FOR_LIMIT: tuple[str, ...] = ("requested", "fulfilled")


class RewardsError(Exception):
    """Base of the named domain errors; `code` is what an API client sees."""

    code = "rewards_error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidReward(RewardsError):
    code = "invalid_reward"


class RewardNotFound(RewardsError):
    code = "reward_not_found"


class RewardNotAvailable(RewardsError):
    code = "reward_not_available"


class TierTooLow(RewardsError):
    code = "tier_too_low"


class CustomerLimitReached(RewardsError):
    code = "customer_limit_reached"


class IdempotencyKeyReused(RewardsError):
    code = "idempotency_key_reused"


class RedemptionNotFound(RewardsError):
    code = "redemption_not_found"


class CancellationNotAllowed(RewardsError):
    code = "cancellation_not_allowed"


class AlreadyShipped(RewardsError):
    """The item is on its way: no cancellation, and no second, different shipment."""

    code = "already_shipped"


class ShipmentNotAllowed(RewardsError):
    """Only a fulfilled physical redemption ships, and only a shipped one is delivered;
    `reason` says which rule refused (not_physical, not_fulfilled, not_shipped)."""

    code = "shipment_not_allowed"


class InvalidShipment(RewardsError):
    code = "invalid_shipment"


class DeliveryAddressNotAllowed(RewardsError):
    code = "delivery_address_not_allowed"


@dataclass(frozen=True, slots=True)
class Reward:
    reward_id: str
    name: str
    description: str
    cost_points: int
    kind: RewardKind
    active: bool
    voucher_value: Decimal | None = None
    voucher_currency: str | None = None
    # None: unlimited. For coupons the pool is the real limit; stock caps it further if set.
    stock_remaining: int | None = None
    per_customer_limit: int | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    min_tier: str | None = None
    coupons_available: int | None = None


@dataclass(frozen=True, slots=True)
class CustomerStanding:
    """What we last learned from the ledger (points.events BalanceAfter). It may lag: it is
    shown to the customer, and used for tier rules, but the ledger's hold decides points."""

    available_points: int = 0
    tier: str | None = None
    known: bool = False


@dataclass(frozen=True, slots=True)
class Redemption:
    redemption_id: uuid.UUID
    customer_id: str
    reward_id: str
    idempotency_key: str
    cost_points: int
    kind: RewardKind
    status: RedemptionStatus
    ledger_status: LedgerStatus
    correlation_id: str
    requested_at: datetime
    failure_reason: str | None = None
    code: str | None = None
    hold_expires_at: datetime | None = None
    fulfilled_at: datetime | None = None
    finished_at: datetime | None = None
    # Physical rewards only (migration 0002): where to send it, and the shipment once sent.
    delivery_address: dict[str, Any] | None = None
    shipment_state: Literal["shipped", "delivered"] | None = None
    carrier: str | None = None
    tracking_number: str | None = None
    tracking_url: str | None = None
    shipped_at: datetime | None = None
    shipped_by: str | None = None
    delivered_at: datetime | None = None
    delivered_by: str | None = None


@dataclass(frozen=True, slots=True)
class Shipment:
    """What a back office records when it hands a physical reward to a carrier."""

    carrier: str
    tracking_number: str | None
    tracking_url: str | None
    # None: now. Given explicitly, it must match on a repeat to be the same shipment.
    shipped_at: datetime | None
    actor: str


# ---- catalog -------------------------------------------------------------------------------


def check_reward_definition(reward: Reward, *, tier_order: list[str]) -> None:
    if reward.min_tier is not None and tier_rank(reward.min_tier, tier_order) < 0:
        raise InvalidReward(f"min_tier must be one of {tier_order}", field="min_tier")
    if reward.cost_points <= 0:
        raise InvalidReward("cost_points must be a positive integer", field="cost_points")
    if reward.kind == "voucher":
        if reward.voucher_value is None or reward.voucher_value <= 0 or not reward.voucher_currency:
            raise InvalidReward("a voucher needs a positive voucher_value and a voucher_currency", field="voucher_value")
    elif reward.voucher_value is not None:
        raise InvalidReward("only a voucher has a voucher_value", field="voucher_value")
    if reward.stock_remaining is not None and reward.stock_remaining < 0:
        raise InvalidReward("stock cannot be negative", field="stock")
    if reward.per_customer_limit is not None and reward.per_customer_limit <= 0:
        raise InvalidReward("per_customer_limit must be positive (or null for no limit)", field="per_customer_limit")
    if reward.valid_from and reward.valid_until and reward.valid_until <= reward.valid_from:
        raise InvalidReward("valid_until must be after valid_from", field="valid_until")


def tier_rank(tier: str | None, tier_order: list[str]) -> int:
    """Position of a tier from the lowest (0); -1 for an unknown or missing tier."""
    if tier is None:
        return -1
    try:
        return [t.lower() for t in tier_order].index(tier.lower())
    except ValueError:
        return -1


def unavailable_reason(reward: Reward, *, now: datetime) -> str | None:
    if not reward.active:
        return "inactive"
    if reward.valid_from is not None and now < reward.valid_from:
        return "not_yet_valid"
    if reward.valid_until is not None and now >= reward.valid_until:
        return "expired"
    return None


def meets_tier(reward: Reward, standing: CustomerStanding, tier_order: list[str]) -> bool:
    if reward.min_tier is None:
        return True
    return tier_rank(standing.tier, tier_order) >= tier_rank(reward.min_tier, tier_order) >= 0


def in_stock(reward: Reward) -> bool:
    if reward.stock_remaining is not None and reward.stock_remaining <= 0:
        return False
    if reward.kind == "coupon" and (reward.coupons_available or 0) <= 0:
        return False
    return True


def is_affordable(reward: Reward, standing: CustomerStanding) -> bool:
    return standing.available_points >= reward.cost_points


def check_redeemable(
    reward: Reward, *, standing: CustomerStanding, counted_redemptions: int, now: datetime, tier_order: list[str]
) -> None:
    """The rules checked when a redemption is requested. Points are not among them: the
    projection may lag, and the ledger's hold is the one authority on points. Stock is not
    either: it is reserved once, after the hold, where it cannot race."""
    reason = unavailable_reason(reward, now=now)
    if reason is not None:
        raise RewardNotAvailable(f"reward {reward.reward_id} is not available: {reason}", reason=reason)
    if not meets_tier(reward, standing, tier_order):
        raise TierTooLow(
            f"reward {reward.reward_id} needs tier {reward.min_tier}",
            min_tier=reward.min_tier,
            tier=standing.tier,
        )
    if reward.per_customer_limit is not None and counted_redemptions >= reward.per_customer_limit:
        raise CustomerLimitReached(
            f"at most {reward.per_customer_limit} redemption(s) of {reward.reward_id} per customer",
            per_customer_limit=reward.per_customer_limit,
        )


def check_delivery_address(reward: Reward, address: dict[str, Any] | None) -> None:
    """Only a physical reward is sent anywhere: an address for a code is a client mistake
    (and personal data we have no reason to keep)."""
    if address is not None and reward.kind != "physical":
        raise DeliveryAddressNotAllowed(f"reward {reward.reward_id} is a {reward.kind}: nothing is shipped",
                                        kind=reward.kind)


def check_same_request(existing: Redemption, *, reward_id: str,
                       delivery_address: dict[str, Any] | None = None) -> None:
    """An Idempotency-Key names one request: replaying it for another reward, or to another
    delivery address (the replay would silently ship to the first one), is a client bug."""
    if existing.reward_id != reward_id:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used for another reward",
            redemption_id=str(existing.redemption_id),
            reward_id=existing.reward_id,
        )
    if (existing.delivery_address or None) != (delivery_address or None):
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used with another delivery address",
            redemption_id=str(existing.redemption_id),
        )


# ---- the saga ------------------------------------------------------------------------------

HoldDecision = Literal["reserve", "refuse", "ignore"]


def on_points_held(redemption: Redemption, *, hold_expires_at: datetime, now: datetime, margin_s: int) -> tuple[HoldDecision, str | None]:
    """What to do when the ledger reports a hold.

    reserve: try to reserve stock and code, then fulfil or fail.
    refuse: fail (or re-fail) so that the ledger voids the hold; with the reason.
    ignore: the redemption is already fulfilled; a repeated hold changes nothing.
    """
    if redemption.status == "requested":
        if hold_expires_at - timedelta(seconds=margin_s) <= now:
            # The ledger may void the hold on its own at any moment: a reward given now
            # could end up unpaid.
            return "refuse", "hold_expired"
        return "reserve", None
    if redemption.status == "fulfilled":
        return "ignore", None
    # failed or cancelled while the hold was on its way (e.g. recovery gave up): the
    # ledger must void it; re-emitting the failure is harmless (idempotent by redemption_id).
    return "refuse", redemption.failure_reason or "redemption_closed"


def on_hold_rejected(redemption: Redemption, *, reason: str) -> bool:
    """True when the rejection ends the redemption. A 'duplicate_redemption' rejection is
    the ledger's answer to a re-sent request whose first answer is on its way: not final."""
    return redemption.status == "requested" and reason != "duplicate_redemption"


def reservation_failure(reward: Reward | None, *, now: datetime) -> str | None:
    """Checked again at reservation time: the catalog may have changed during the hold."""
    if reward is None:
        return "reward_not_found"
    reason = unavailable_reason(reward, now=now)
    return f"reward_{reason}" if reason else None


def fulfil(redemption: Redemption, *, code: str | None, hold_expires_at: datetime, now: datetime) -> Redemption:
    """The redemption once its reward is reserved under the ledger's hold."""
    return replace(redemption, status="fulfilled", ledger_status="held", code=code, hold_expires_at=hold_expires_at,
                   fulfilled_at=now, finished_at=now)


def fail(redemption: Redemption, *, reason: str, ledger_status: LedgerStatus, now: datetime,
         hold_expires_at: datetime | None = None) -> Redemption:
    """The redemption once it cannot be fulfilled (the ledger voids any hold)."""
    return replace(redemption, status="failed", failure_reason=reason, ledger_status=ledger_status,
                   hold_expires_at=hold_expires_at or redemption.hold_expires_at, finished_at=now)


def should_give_up(redemption: Redemption, *, now: datetime, hold_timeout_s: int) -> bool:
    """A request unanswered for as long as a hold would live is failed: any hold the ledger
    did take is voided by the RedemptionFailed, and none can outlive it anyway."""
    return redemption.status == "requested" and now - redemption.requested_at >= timedelta(seconds=hold_timeout_s)


def check_cancellable(redemption: Redemption, *, now: datetime, window_s: int) -> None:
    if redemption.shipment_state is not None:
        raise AlreadyShipped("the item has been shipped: it can no longer be cancelled",
                             status=redemption.status, shipment_state=redemption.shipment_state)
    if redemption.status == "requested":
        raise CancellationNotAllowed("the redemption is still in progress; retry shortly", status=redemption.status)
    if redemption.status != "fulfilled":
        raise CancellationNotAllowed(f"a {redemption.status} redemption cannot be cancelled", status=redemption.status)
    assert redemption.fulfilled_at is not None, "a fulfilled redemption has fulfilled_at"
    if now - redemption.fulfilled_at > timedelta(seconds=window_s):
        raise CancellationNotAllowed(
            f"the cancellation window ({window_s} s after fulfilment) has closed", status=redemption.status
        )


# ---- fulfilment of physical rewards ----------------------------------------------------------


# A back office's clock may run ahead of ours: a shipping or delivery time this far in our
# future is taken as given, further is a mistake.
CLOCK_SKEW = timedelta(minutes=5)


def shipment_state(redemption: Redemption) -> ShipmentState | None:
    """None for what is never shipped: coupons, vouchers, and physical redemptions that did
    not (or no longer) give the item."""
    if redemption.shipment_state is not None:
        return redemption.shipment_state
    if redemption.kind == "physical" and redemption.status == "fulfilled":
        return "awaiting_shipment"
    return None


def _check_shippable(redemption: Redemption) -> None:
    if redemption.kind != "physical":
        raise ShipmentNotAllowed(f"a {redemption.kind} redemption is not shipped", reason="not_physical",
                                 kind=redemption.kind)
    if redemption.status != "fulfilled":
        raise ShipmentNotAllowed(f"a {redemption.status} redemption cannot be shipped: only a fulfilled one",
                                 reason="not_fulfilled", status=redemption.status)


def is_same_shipment(redemption: Redemption, shipment: Shipment) -> bool:
    return (redemption.carrier == shipment.carrier and redemption.tracking_number == shipment.tracking_number
            and redemption.tracking_url == shipment.tracking_url
            and (shipment.shipped_at is None or redemption.shipped_at == shipment.shipped_at))


def ship(redemption: Redemption, shipment: Shipment, *, now: datetime) -> Redemption | None:
    """The redemption once shipped, or None when this very shipment is already recorded
    (a retried call: nothing changes, nothing is emitted again)."""
    _check_shippable(redemption)
    if redemption.shipment_state is not None:
        if is_same_shipment(redemption, shipment):
            return None
        raise AlreadyShipped(
            "the redemption was already shipped with another carrier or tracking number",
            shipment_state=redemption.shipment_state, carrier=redemption.carrier,
            tracking_number=redemption.tracking_number,
        )
    shipped_at = shipment.shipped_at or now
    if shipped_at > now + CLOCK_SKEW:
        raise InvalidShipment("shipped_at cannot be in the future", field="shipped_at")
    assert redemption.fulfilled_at is not None, "a fulfilled redemption has fulfilled_at"
    if shipped_at < redemption.fulfilled_at:
        raise InvalidShipment("shipped_at cannot be before the redemption was fulfilled", field="shipped_at",
                              fulfilled_at=redemption.fulfilled_at.isoformat())
    return replace(redemption, shipment_state="shipped", carrier=shipment.carrier,
                   tracking_number=shipment.tracking_number, tracking_url=shipment.tracking_url,
                   shipped_at=shipped_at, shipped_by=shipment.actor)


def deliver(redemption: Redemption, *, delivered_at: datetime | None, actor: str, now: datetime) -> Redemption | None:
    """The redemption once delivered, or None when it is already (a retried call)."""
    _check_shippable(redemption)
    if redemption.shipment_state == "delivered":
        return None
    if redemption.shipment_state != "shipped":
        raise ShipmentNotAllowed("the item has not been shipped yet", reason="not_shipped",
                                 shipment_state=shipment_state(redemption))
    at = delivered_at or now
    assert redemption.shipped_at is not None
    if at > now + CLOCK_SKEW:
        raise InvalidShipment("delivered_at cannot be in the future", field="delivered_at")
    if at < redemption.shipped_at:
        raise InvalidShipment("delivered_at cannot be before shipped_at", field="delivered_at",
                              shipped_at=redemption.shipped_at.isoformat())
    return replace(redemption, shipment_state="delivered", delivered_at=at, delivered_by=actor)


def restocks_on_cancel(kind: RewardKind) -> bool:
    """A cancelled physical item or voucher goes back to stock; a coupon code the customer
    has already seen is burnt, never handed to someone else."""
    return kind in ("physical", "voucher")


# Crockford-like alphabet without 0/O, 1/I/L: codes are read aloud and typed at tills.
_CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"


def new_voucher_code(*, groups: int = 4, group_len: int = 4) -> str:
    """An unguessable voucher code (~79 bits), e.g. 'V-7KQ2-M9XD-3HTP-ZC4R'."""
    chars = [secrets.choice(_CODE_ALPHABET) for _ in range(groups * group_len)]
    return "V-" + "-".join("".join(chars[i : i + group_len]) for i in range(0, len(chars), group_len))
