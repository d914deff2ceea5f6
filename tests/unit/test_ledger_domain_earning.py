"""Earning rules of the ledger: the default program, stacking, rounding, returns."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.ledger.domain.accounts import ISSUANCE, Journal, new_program_accounts
from services.ledger.domain.books import CustomerBook
from services.ledger.domain.earning import calculate_earning, earn
from services.ledger.domain.errors import UnknownCurrency
from services.ledger.domain.returns import returned_points_after, reverse_return
from services.ledger.program import Campaign, Program
from shared.events.purchases import PurchaseLine, PurchasePayload

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
DEFAULT = Program()


def purchase(*lines: tuple[str, str, int, str, str], currency: str = "PLN", source: str = "pos",
             occurred_at: datetime = T0, purchase_id: str = "p1") -> PurchasePayload:
    """lines: (line_id, sku/category, quantity, unit_price, discount)."""
    return PurchasePayload(
        purchase_id=purchase_id, type="sale", source=source, store_id="s1", occurred_at=occurred_at,
        currency=currency, door="kafka", total=Decimal("0"),
        lines=[PurchaseLine(line_id=i, sku=s, category=s.split("-")[0], quantity=q, unit_price=Decimal(p),
                            discount=Decimal(d)) for i, s, q, p, d in lines],
    )


def points(program: Program, p: PurchasePayload, tier: str = "Bronze", first: bool = False) -> int:
    return calculate_earning(program, p, tier=program.tier_named(tier), first_purchase=first).points


def test_default_program_earns_one_point_per_full_pln_of_net_amount_floored_per_purchase():
    # 2 x 10.60 - 1.00 = 20.20 and 0.90: 21.10 PLN in all -> 21 points (not 20 + 0 per line).
    p = purchase(("1", "food-a", 2, "10.60", "1.00"), ("2", "food-b", 1, "0.90", "0"))
    assert points(DEFAULT, p) == 21


def test_tier_multipliers_of_the_default_program_apply_before_rounding():
    p = purchase(("1", "food-a", 1, "10.00", "0"))
    assert [points(DEFAULT, p, t) for t in ("Bronze", "Silver", "Gold")] == [10, 12, 15]


def test_default_tiers_need_1000_and_5000_qualifying_points():
    assert [DEFAULT.tier_for(q).name for q in (0, 999, 1000, 4999, 5000)] == [
        "Bronze", "Bronze", "Silver", "Silver", "Gold"]


def test_a_line_discounted_below_zero_earns_nothing_instead_of_negative_points():
    p = purchase(("1", "food-a", 1, "5.00", "9.00"), ("2", "food-b", 1, "3.00", "0"))
    assert points(DEFAULT, p) == 3


def test_other_currencies_convert_at_the_configured_rate_and_unknown_ones_are_refused():
    program = Program(currency_rates={"EUR": Decimal("4.30")})
    assert points(program, purchase(("1", "x-a", 1, "10.00", "0"), currency="EUR")) == 43
    with pytest.raises(UnknownCurrency):
        points(program, purchase(("1", "x-a", 1, "10.00", "0"), currency="USD"))


def test_a_sku_multiplier_overrides_the_category_multiplier_instead_of_stacking():
    program = Program(category_multipliers={"wine": Decimal("2")}, sku_multipliers={"wine-x": Decimal("3")})
    assert points(program, purchase(("1", "wine-x", 1, "10.00", "0"))) == 30
    assert points(program, purchase(("1", "wine-y", 1, "10.00", "0"))) == 20


def test_campaigns_apply_only_inside_their_window_and_channel_and_stack_with_each_other():
    c1 = Campaign(name="eshop week", multiplier=Decimal("2"), starts_at=T0 - timedelta(days=1),
                  ends_at=T0 + timedelta(days=1), channels=["eshop"])
    c2 = Campaign(name="food fest", multiplier=Decimal("1.5"), starts_at=T0 - timedelta(days=1),
                  ends_at=T0 + timedelta(days=1), categories=["food"])
    program = Program(campaigns=[c1, c2])
    line = ("1", "food-a", 1, "10.00", "0")
    assert points(program, purchase(line, source="eshop")) == 30
    assert points(program, purchase(line, source="pos")) == 15
    assert points(program, purchase(line, source="eshop", occurred_at=T0 + timedelta(days=2))) == 10
    assert points(program, purchase(("1", "toys-a", 1, "10.00", "0"), source="pos")) == 10


def test_first_purchase_bonus_and_daily_cap_come_last_in_the_stacking_order():
    program = Program(first_purchase_bonus_points=50, daily_cap_points=100)
    p = purchase(("1", "food-a", 1, "70.00", "0"))
    e = calculate_earning(program, p, tier=program.tiers[0], first_purchase=True, earned_today_points=0)
    assert (e.points, e.bonus_points, e.capped_points) == (100, 50, 20)
    e = calculate_earning(program, p, tier=program.tiers[0], first_purchase=False, earned_today_points=60)
    assert (e.points, e.capped_points) == (40, 30)


@given(
    st.lists(st.tuples(st.integers(1, 5), st.decimals("0.01", "500", places=2), st.decimals("0", "20", places=2)),
             min_size=1, max_size=6),
    st.sampled_from(["Bronze", "Silver", "Gold"]),
    st.booleans(),
)
def test_the_breakdown_adds_up_to_the_points_earned(lines, tier, first):
    program = Program(category_multipliers={"c1": Decimal("1.7")}, first_purchase_bonus_points=7)
    p = purchase(*[(str(i), f"c{i % 3}-x", q, str(price), str(disc)) for i, (q, price, disc) in enumerate(lines)])
    e = calculate_earning(program, p, tier=program.tier_named(tier), first_purchase=first)
    assert sum(Decimal(str(b["points"])) for b in e.breakdown) == e.points
    assert e.points >= 0


def _earned_book(program: Program, p: PurchasePayload):
    accounts = new_program_accounts()
    book = CustomerBook.new("c1", "Bronze")
    journal = Journal({**accounts, **book.accounts()})
    earn(book, journal, program, 1, purchase=p, now=T0)
    return book, journal, next(iter(book.lots.values()))


def test_partial_returns_take_back_exactly_the_points_of_the_lines_returned():
    p = purchase(("1", "food-a", 2, "10.50", "0"), ("2", "food-b", 1, "5.25", "0"))  # 26.25 -> 26
    book, journal, lot = _earned_book(DEFAULT, p)
    reversed_ = reverse_return(book, journal, DEFAULT, return_id="r1", lot=lot,
                               returned=[("1", "food-a", Decimal("10.50"))], now=T0)
    assert reversed_[0].amount_points == 26 - 15  # 15.75 kept -> 15
    reversed_ = reverse_return(book, journal, DEFAULT, return_id="r2", lot=lot,
                               returned=[("1", "food-a", Decimal("10.50")), ("2", "food-b", Decimal("5.25"))], now=T0)
    assert reversed_[0].amount_points == 15
    assert book.pending_points == 0 and lot.reversed_points == 26


def test_returning_two_of_three_units_takes_back_two_points_not_three():
    # 3 x 1.00 earns 3; 1 - 2/3 in decimals is 0.999..., which floored would keep 0 points
    book, journal, lot = _earned_book(DEFAULT, purchase(("1", "food-a", 3, "1.00", "0")))
    reversed_ = reverse_return(book, journal, DEFAULT, return_id="r1", lot=lot,
                               returned=[("1", "food-a", Decimal("2.00"))], now=T0)
    assert reversed_[0].amount_points == 2 and returned_points_after(lot) == 1


def test_the_same_return_applied_twice_reverses_once():
    book, journal, lot = _earned_book(DEFAULT, purchase(("1", "food-a", 1, "40.00", "0")))
    first = reverse_return(book, journal, DEFAULT, return_id="r1", lot=lot,
                           returned=[("1", "food-a", Decimal("40"))], now=T0)
    again = reverse_return(book, journal, DEFAULT, return_id="r1", lot=lot,
                           returned=[("1", "food-a", Decimal("40"))], now=T0)
    assert first[0].amount_points == 40 and again == []
    assert returned_points_after(lot) == 0


def test_a_return_of_points_already_spent_becomes_debt_that_the_next_earning_pays_first():
    from services.ledger.domain.expiry import mature
    from services.ledger.domain.redemptions import hold, post_hold
    import uuid

    book, journal, lot = _earned_book(DEFAULT, purchase(("1", "food-a", 1, "100.00", "0")))
    later = T0 + timedelta(days=15)
    mature(book, journal, lot, now=later)
    h = hold(book, journal, redemption_id=uuid.uuid4(), amount_points=80, expires_at=later)
    post_hold(book, journal, h)
    out = reverse_return(book, journal, DEFAULT, return_id="r1", lot=lot,
                         returned=[("1", "food-a", Decimal("100"))], now=later)
    assert (out[0].amount_points, out[0].debt_points_added) == (100, 80)
    assert (book.available_points, book.debt_points) == (0, 80)
    earn(book, journal, DEFAULT, 1, purchase=purchase(("1", "food-a", 1, "50.00", "0"), purchase_id="p2"), now=later)
    assert (book.pending_points, book.debt_points) == (0, 30)
    assert journal.accounts[ISSUANCE].debits_posted - journal.accounts[ISSUANCE].credits_posted == 150 - 100
