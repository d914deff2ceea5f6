"""Pure rules of the rewards service: eligibility, limits, the saga's decisions, cancellation."""

import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from services.rewards import domain
from services.rewards.domain import CustomerStanding, Redemption, Reward

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
TIERS = ["basic", "silver", "gold", "platinum"]


def a_reward(**changes) -> Reward:
    base = Reward(reward_id="mug", name="Mug", description="", cost_points=100, kind="physical", active=True,
                  stock_remaining=5)
    return replace(base, **changes)


def a_redemption(**changes) -> Redemption:
    base = Redemption(
        redemption_id=uuid.uuid4(), customer_id="c1", reward_id="mug", idempotency_key="k1", cost_points=100,
        kind="physical", status="requested", ledger_status="pending", correlation_id="corr", requested_at=NOW,
    )
    return replace(base, **changes)


GOLD = CustomerStanding(available_points=500, tier="gold", known=True)


def check(reward: Reward, standing: CustomerStanding = GOLD, counted: int = 0, now: datetime = NOW) -> None:
    domain.check_redeemable(reward, standing=standing, counted_redemptions=counted, now=now, tier_order=TIERS)


def test_an_active_reward_in_its_window_is_redeemable():
    check(a_reward(valid_from=NOW - timedelta(days=1), valid_until=NOW + timedelta(days=1)))


def test_an_inactive_reward_is_not_redeemable():
    with pytest.raises(domain.RewardNotAvailable) as exc:
        check(a_reward(active=False))
    assert exc.value.details["reason"] == "inactive"


def test_a_reward_before_its_window_is_not_yet_valid():
    with pytest.raises(domain.RewardNotAvailable) as exc:
        check(a_reward(valid_from=NOW + timedelta(seconds=1)))
    assert exc.value.details["reason"] == "not_yet_valid"


def test_a_reward_is_expired_from_the_end_of_its_window_on():
    with pytest.raises(domain.RewardNotAvailable) as exc:
        check(a_reward(valid_until=NOW))
    assert exc.value.details["reason"] == "expired"


def test_a_minimum_tier_admits_that_tier_and_higher_only():
    check(a_reward(min_tier="gold"), standing=GOLD)
    check(a_reward(min_tier="silver"), standing=GOLD)
    with pytest.raises(domain.TierTooLow):
        check(a_reward(min_tier="platinum"), standing=GOLD)


def test_a_customer_the_ledger_never_reported_has_no_tier():
    with pytest.raises(domain.TierTooLow):
        check(a_reward(min_tier="basic"), standing=CustomerStanding())
    check(a_reward(min_tier=None), standing=CustomerStanding())


def test_tier_names_compare_case_insensitively_and_unknown_ranks_lowest():
    assert domain.tier_rank("GOLD", TIERS) == 2
    assert domain.tier_rank("diamond", TIERS) == -1
    assert domain.tier_rank(None, TIERS) == -1


def test_the_per_customer_limit_counts_live_redemptions():
    check(a_reward(per_customer_limit=2), counted=1)
    with pytest.raises(domain.CustomerLimitReached):
        check(a_reward(per_customer_limit=2), counted=2)


def test_points_are_not_checked_at_request_time_the_ledger_decides():
    # The projection may lag behind the ledger: a customer shown 0 points may have earned since.
    check(a_reward(cost_points=10_000), standing=CustomerStanding(available_points=0, tier="gold", known=True))


def test_affordable_compares_the_last_known_balance_with_the_cost():
    assert domain.is_affordable(a_reward(cost_points=500), GOLD)
    assert not domain.is_affordable(a_reward(cost_points=501), GOLD)


def test_stock_and_coupon_pool_decide_in_stock():
    assert domain.in_stock(a_reward(stock_remaining=None))
    assert not domain.in_stock(a_reward(stock_remaining=0))
    assert not domain.in_stock(a_reward(kind="coupon", stock_remaining=None, coupons_available=0))
    assert domain.in_stock(a_reward(kind="coupon", stock_remaining=None, coupons_available=3))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"cost_points": 0}, "cost_points"),
        ({"kind": "voucher"}, "voucher_value"),
        ({"kind": "voucher", "voucher_value": Decimal("5"), "voucher_currency": None}, "voucher_value"),
        ({"voucher_value": Decimal("5"), "voucher_currency": "EUR"}, "voucher_value"),
        ({"per_customer_limit": 0}, "per_customer_limit"),
        ({"valid_from": NOW, "valid_until": NOW}, "valid_until"),
        ({"min_tier": "diamond"}, "min_tier"),
    ],
)
def test_invalid_reward_definitions_are_refused(changes, field):
    with pytest.raises(domain.InvalidReward) as exc:
        domain.check_reward_definition(a_reward(**changes), tier_order=TIERS)
    assert exc.value.details["field"] == field


def test_a_voucher_with_a_value_and_currency_is_valid():
    domain.check_reward_definition(
        a_reward(kind="voucher", voucher_value=Decimal("10.00"), voucher_currency="EUR"), tier_order=TIERS
    )


def test_an_idempotency_key_replayed_for_another_reward_is_refused():
    existing = a_redemption(reward_id="mug")
    domain.check_same_request(existing, reward_id="mug")
    with pytest.raises(domain.IdempotencyKeyReused):
        domain.check_same_request(existing, reward_id="hat")


def test_an_idempotency_key_replayed_to_another_delivery_address_is_refused():
    address = {"name": "A. Nowak", "line1": "ul. Długa 1", "city": "Gdańsk", "postal_code": "80-001", "country": "PL"}
    existing = a_redemption(reward_id="mug", delivery_address=address)
    domain.check_same_request(existing, reward_id="mug", delivery_address=dict(address))  # the same: a replay
    for other in (None, {**address, "line1": "ul. Krótka 2"}):
        with pytest.raises(domain.IdempotencyKeyReused):
            domain.check_same_request(existing, reward_id="mug", delivery_address=other)


# ---- the saga ----------------------------------------------------------------------------------


def test_a_hold_for_a_requested_redemption_is_reserved():
    assert domain.on_points_held(a_redemption(), hold_expires_at=NOW + timedelta(minutes=5), now=NOW,
                                 margin_s=15) == ("reserve", None)


def test_a_hold_about_to_expire_is_refused_so_no_reward_goes_unpaid():
    assert domain.on_points_held(a_redemption(), hold_expires_at=NOW + timedelta(seconds=10), now=NOW,
                                 margin_s=15) == ("refuse", "hold_expired")


def test_a_hold_for_a_failed_redemption_is_refused_again_so_the_ledger_voids_it():
    failed = a_redemption(status="failed", failure_reason="ledger_timeout")
    assert domain.on_points_held(failed, hold_expires_at=NOW + timedelta(minutes=5), now=NOW,
                                 margin_s=15) == ("refuse", "ledger_timeout")


def test_a_repeated_hold_for_a_fulfilled_redemption_changes_nothing():
    fulfilled = a_redemption(status="fulfilled", fulfilled_at=NOW)
    assert domain.on_points_held(fulfilled, hold_expires_at=NOW + timedelta(minutes=5), now=NOW,
                                 margin_s=15)[0] == "ignore"


def test_a_hold_rejection_fails_a_requested_redemption():
    assert domain.on_hold_rejected(a_redemption(), reason="insufficient_points")


def test_a_duplicate_redemption_rejection_is_not_final():
    # The ledger's answer to a re-sent request: the first answer is on its way.
    assert not domain.on_hold_rejected(a_redemption(), reason="duplicate_redemption")


def test_a_rejection_after_the_outcome_changes_nothing():
    assert not domain.on_hold_rejected(a_redemption(status="fulfilled", fulfilled_at=NOW),
                                       reason="insufficient_points")


def test_reservation_rechecks_the_catalog():
    assert domain.reservation_failure(None, now=NOW) == "reward_not_found"
    assert domain.reservation_failure(a_reward(active=False), now=NOW) == "reward_inactive"
    assert domain.reservation_failure(a_reward(valid_until=NOW), now=NOW) == "reward_expired"
    assert domain.reservation_failure(a_reward(), now=NOW) is None


def test_an_unanswered_request_is_given_up_after_a_hold_lifetime():
    r = a_redemption(requested_at=NOW - timedelta(seconds=300))
    assert domain.should_give_up(r, now=NOW, hold_timeout_s=300)
    assert not domain.should_give_up(r, now=NOW - timedelta(seconds=1), hold_timeout_s=300)
    assert not domain.should_give_up(replace(r, status="fulfilled", fulfilled_at=NOW), now=NOW, hold_timeout_s=300)


# ---- cancellation ------------------------------------------------------------------------------


def test_a_fulfilled_redemption_can_be_cancelled_within_the_window():
    domain.check_cancellable(a_redemption(status="fulfilled", fulfilled_at=NOW - timedelta(seconds=60)), now=NOW,
                             window_s=60)


def test_the_cancellation_window_closes():
    with pytest.raises(domain.CancellationNotAllowed):
        domain.check_cancellable(a_redemption(status="fulfilled", fulfilled_at=NOW - timedelta(seconds=61)),
                                 now=NOW, window_s=60)


@pytest.mark.parametrize("status", ["requested", "failed", "cancelled"])
def test_only_a_fulfilled_redemption_can_be_cancelled(status):
    with pytest.raises(domain.CancellationNotAllowed):
        domain.check_cancellable(a_redemption(status=status, fulfilled_at=NOW), now=NOW, window_s=60)


def test_a_cancelled_coupon_is_burnt_but_items_and_vouchers_go_back_to_stock():
    assert not domain.restocks_on_cancel("coupon")
    assert domain.restocks_on_cancel("physical")
    assert domain.restocks_on_cancel("voucher")


def test_voucher_codes_are_unambiguous_and_distinct():
    codes = {domain.new_voucher_code() for _ in range(1000)}
    assert len(codes) == 1000
    sample = next(iter(codes))
    assert len(sample) == len("V-XXXX-XXXX-XXXX-XXXX")
    assert not set(sample[2:].replace("-", "")) & set("01OIL")


# ---- fulfilment of physical rewards ----------------------------------------------------------

FULFILLED_AT = NOW - timedelta(hours=2)
PARCEL = domain.Shipment(carrier="DHL", tracking_number="JD0001", tracking_url="https://dhl.example/JD0001",
                         shipped_at=None, actor="warehouse-1")


def a_fulfilled_item(**changes) -> Redemption:
    return a_redemption(status="fulfilled", ledger_status="redeemed", fulfilled_at=FULFILLED_AT,
                        finished_at=FULFILLED_AT, **changes)


def test_a_fulfilled_physical_redemption_awaits_shipment_and_nothing_else_has_a_shipment():
    assert domain.shipment_state(a_fulfilled_item()) == "awaiting_shipment"
    assert domain.shipment_state(a_fulfilled_item(kind="coupon")) is None
    assert domain.shipment_state(a_redemption(status="requested")) is None
    assert domain.shipment_state(a_redemption(status="cancelled", fulfilled_at=FULFILLED_AT)) is None


def test_shipping_records_the_carrier_tracking_time_and_actor_and_keeps_the_saga_status():
    shipped = domain.ship(a_fulfilled_item(), PARCEL, now=NOW)
    assert shipped is not None
    assert (shipped.status, shipped.ledger_status) == ("fulfilled", "redeemed")
    assert (shipped.shipment_state, shipped.carrier, shipped.tracking_number, shipped.shipped_at,
            shipped.shipped_by) == ("shipped", "DHL", "JD0001", NOW, "warehouse-1")
    assert domain.shipment_state(shipped) == "shipped"


def test_the_same_shipment_again_changes_nothing_whoever_sends_it():
    shipped = domain.ship(a_fulfilled_item(), PARCEL, now=NOW)
    assert shipped is not None
    assert domain.ship(shipped, replace(PARCEL, actor="someone-else"), now=NOW + timedelta(minutes=1)) is None
    assert domain.ship(shipped, replace(PARCEL, shipped_at=NOW), now=NOW + timedelta(minutes=1)) is None


@pytest.mark.parametrize("change", [{"carrier": "UPS"}, {"tracking_number": "JD0002"}, {"tracking_url": None},
                                   {"shipped_at": NOW - timedelta(minutes=1)}])
def test_a_different_shipment_of_a_shipped_redemption_is_refused(change):
    shipped = domain.ship(a_fulfilled_item(), PARCEL, now=NOW)
    assert shipped is not None
    with pytest.raises(domain.AlreadyShipped) as exc:
        domain.ship(shipped, replace(PARCEL, **change), now=NOW)
    assert exc.value.details["tracking_number"] == "JD0001"


@pytest.mark.parametrize("redemption, reason", [
    (a_fulfilled_item(kind="coupon", code="C-1"), "not_physical"),
    (a_fulfilled_item(kind="voucher", code="V-1"), "not_physical"),
    (a_redemption(status="requested"), "not_fulfilled"),
    (a_redemption(status="failed", failure_reason="out_of_stock"), "not_fulfilled"),
    (a_redemption(status="cancelled", fulfilled_at=FULFILLED_AT), "not_fulfilled"),
])
def test_only_a_fulfilled_physical_redemption_ships(redemption, reason):
    with pytest.raises(domain.ShipmentNotAllowed) as exc:
        domain.ship(redemption, PARCEL, now=NOW)
    assert exc.value.details["reason"] == reason


def test_a_shipping_time_in_the_future_or_before_the_fulfilment_is_refused():
    with pytest.raises(domain.InvalidShipment):
        domain.ship(a_fulfilled_item(), replace(PARCEL, shipped_at=NOW + timedelta(hours=1)), now=NOW)
    with pytest.raises(domain.InvalidShipment):
        domain.ship(a_fulfilled_item(), replace(PARCEL, shipped_at=FULFILLED_AT - timedelta(seconds=1)), now=NOW)


def test_delivery_follows_shipment_once():
    with pytest.raises(domain.ShipmentNotAllowed) as exc:
        domain.deliver(a_fulfilled_item(), delivered_at=None, actor="courier-api", now=NOW)
    assert exc.value.details["reason"] == "not_shipped"
    shipped = domain.ship(a_fulfilled_item(), PARCEL, now=NOW - timedelta(hours=1))
    assert shipped is not None
    delivered = domain.deliver(shipped, delivered_at=None, actor="courier-api", now=NOW)
    assert delivered is not None and (delivered.shipment_state, delivered.delivered_at) == ("delivered", NOW)
    assert domain.deliver(delivered, delivered_at=None, actor="courier-api", now=NOW) is None
    with pytest.raises(domain.InvalidShipment):
        domain.deliver(shipped, delivered_at=shipped.shipped_at - timedelta(seconds=1), actor="x", now=NOW)


def test_a_shipped_item_cannot_be_cancelled_even_within_the_window():
    item = a_fulfilled_item()
    domain.check_cancellable(item, now=NOW, window_s=86_400)  # allowed before shipping
    shipped = domain.ship(item, PARCEL, now=NOW)
    assert shipped is not None
    with pytest.raises(domain.AlreadyShipped):
        domain.check_cancellable(shipped, now=NOW, window_s=86_400)


def test_a_delivery_address_is_for_physical_rewards_only():
    address = {"recipient": "A", "line1": "x", "city": "y", "postal_code": "1", "country": "PL"}
    domain.check_delivery_address(a_reward(kind="physical"), address)
    domain.check_delivery_address(a_reward(kind="coupon"), None)
    with pytest.raises(domain.DeliveryAddressNotAllowed):
        domain.check_delivery_address(a_reward(kind="voucher", voucher_value=Decimal("5"), voucher_currency="EUR"),
                                      address)
