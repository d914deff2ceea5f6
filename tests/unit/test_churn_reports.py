"""The churn service's reports, pure: indicators, matrix quadrants, cohorts, departure factors."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from services.churn import cohorts, departures, indicators, matrix
from services.churn.indicators import SurveyAnswer


def d(text: str) -> date:
    return date.fromisoformat(text)


def test_retention_counts_customers_active_at_start_and_still_active_at_the_end():
    days = {
        "kept": [d("2026-01-10"), d("2026-03-05")],  # active at start of March, bought again
        "lapsing": [d("2025-09-03")],  # active on 28 Feb (178 days), lapses in March
        "new": [d("2026-03-20")],
        "back": [d("2025-01-02"), d("2026-03-15")],  # inactive at start, returns: counted in N
        "gone": [d("2024-05-01")],
    }
    row = indicators.indicators_for_period(days, [], first_day=d("2026-03-01"), last_day=d("2026-03-31"),
                                           active_window_days=180)
    assert (row.customers_at_start, row.customers_at_end, row.new_customers, row.lost_customers) == (2, 3, 2, 1)
    assert row.retention_rate == (3 - 2) / 2 and row.churn_rate == 1 / 2
    assert row.repeat_customers == 1 and row.loyalty_index == 1 / 3  # only "kept" bought twice within 180 days


def test_rates_are_none_without_customers_at_the_start():
    row = indicators.indicators_for_period({"a": [d("2026-03-02")]}, [], first_day=d("2026-03-01"),
                                           last_day=d("2026-03-31"), active_window_days=180)
    assert row.retention_rate is None and row.churn_rate is None and row.loyalty_index == 0.0


def test_satisfaction_csat_share_of_four_and_five_and_nps_promoters_minus_detractors():
    answers = [SurveyAnswer(d("2026-03-01"), csat=5, nps=10), SurveyAnswer(d("2026-03-02"), csat=4, nps=9),
               SurveyAnswer(d("2026-03-03"), csat=2, nps=3), SurveyAnswer(d("2026-03-04"), csat=3, nps=8),
               SurveyAnswer(d("2026-03-05"), nps=0), SurveyAnswer(d("2026-04-01"), csat=1, nps=0)]
    s = indicators.satisfaction([a for a in answers if a.answered_on.month == 3])
    assert (s.csat, s.csat_answers) == (0.5, 4)
    assert (s.nps, s.nps_answers) == (100.0 * (2 - 2) / 5, 5)
    empty = indicators.satisfaction([])
    assert empty.csat is None and empty.nps is None and empty.csat_answers == 0


def test_monthly_and_rolling_periods_cover_calendar_months():
    rows = indicators.monthly_indicators({"a": [d("2025-12-31")]}, [], from_month=d("2025-11-01"),
                                         to_month=d("2026-02-01"), active_window_days=40)
    assert [r.period for r in rows] == ["2025-11", "2025-12", "2026-01", "2026-02"]
    assert [r.customers_at_end for r in rows] == [0, 1, 1, 0]  # 40 days: active to 8 Feb
    rolling = indicators.rolling_indicators({"a": [d("2025-12-31")]}, [], to_month=d("2026-02-01"),
                                            window_months=12, active_window_days=30)
    assert (rolling.first_day, rolling.last_day) == (d("2025-03-01"), d("2026-02-28"))
    assert rolling.period == "2025-03..2026-02" and rolling.new_customers == 0 and rolling.customers_at_end == 0


def _value(cid: str, profit: str, loyalty: float) -> matrix.CustomerValue:
    return matrix.CustomerValue(cid, Decimal(profit), loyalty, Decimal(profit) * 4, Decimal(profit))


def test_matrix_quadrants_at_cut_points_name_reinartz_and_kumar():
    cuts = matrix.CutPoints(Decimal(100), 0.5)
    assert matrix.quadrant_of(Decimal(101), 0.6, cuts) == "true_friend"
    assert matrix.quadrant_of(Decimal(101), 0.5, cuts) == "butterfly"  # at the cut is low
    assert matrix.quadrant_of(Decimal(100), 0.9, cuts) == "barnacle"
    assert matrix.quadrant_of(Decimal(5), 0.1, cuts) == "stranger"


def test_matrix_summary_adds_up_and_ranks_a_quadrant():
    customers = [_value("a", "500", 0.9), _value("b", "300", 0.8), _value("c", "400", 0.1),
                 _value("d", "10", 0.7), _value("e", "20", 0.2)]
    cuts = matrix.median_cuts(customers)
    assert cuts == matrix.CutPoints(Decimal(300), 0.7)
    summary = {s.quadrant: s for s in matrix.summarise(customers, cuts)}
    assert sum(s.customers for s in summary.values()) == len(customers)
    assert summary["true_friend"].customers == 1 and summary["true_friend"].revenue == Decimal(2000)
    assert summary["butterfly"].customers == 1 and summary["barnacle"].customers == 1
    assert summary["stranger"].customers == 2 and summary["stranger"].margin == Decimal(30)
    assert all(s.treatment for s in summary.values())
    two = [_value("x", "10", 0.1), _value("y", "20", 0.1)]
    assert [c.customer_id for c in matrix.ranked(two, "stranger", matrix.CutPoints(Decimal(50), 0.5))] == ["y", "x"]


def test_cohorts_share_of_each_first_month_buying_later():
    days = {"a": [d("2026-01-05"), d("2026-02-01"), d("2026-03-09")], "b": [d("2026-01-20"), d("2026-03-01")],
            "c": [d("2026-02-14")], "future": [d("2026-05-01")]}
    rows = cohorts.cohorts(days, as_of=d("2026-03-31"))
    assert [(r.month, r.customers, r.buying) for r in rows] == [("2026-01", 2, [2, 1, 2]), ("2026-02", 1, [1, 0])]
    assert rows[0].shares == [1.0, 0.5, 1.0]


NOW = datetime(2026, 3, 1, tzinfo=UTC)


def test_departure_factors_from_what_preceded_the_loss():
    facts = departures.CustomerFacts(at=NOW, last_nps=4, open_complaints=1, bought=Decimal(100),
                                     returned=Decimal(25), points_balance=800, tier_lost=True, failed_redemptions=1,
                                     last_contact_at=NOW - timedelta(days=120), quadrant="barnacle")
    assert departures.factors(facts) == {"low_satisfaction", "open_complaint", "high_returns", "unredeemed_points",
                                         "tier_lost", "failed_redemption", "no_recent_contact", "quadrant_barnacle"}
    calm = departures.CustomerFacts(at=NOW, last_nps=9, last_csat=5, bought=Decimal(100), returned=Decimal(5),
                                    points_balance=499, last_contact_at=NOW - timedelta(days=89))
    assert departures.factors(calm) == frozenset()


def test_departure_comparison_ratios_rank_the_factors_that_come_before_leaving():
    lost = [frozenset({"open_complaint", "no_recent_contact"}), frozenset({"open_complaint"}), frozenset()]
    kept = [frozenset({"no_recent_contact"}), frozenset(), frozenset(), frozenset({"open_complaint"})]
    rows = {r.factor: r for r in departures.compare(lost, kept)}
    assert (rows["open_complaint"].lost_count, rows["open_complaint"].retained_count) == (2, 1)
    assert rows["open_complaint"].ratio == (2 / 3) / (1 / 4)
    assert rows["no_recent_contact"].ratio == (1 / 3) / (1 / 4)
    assert rows["tier_lost"].ratio is None and rows["tier_lost"].lost_share == 0.0
    assert departures.compare(lost, kept)[0].factor == "open_complaint"


def test_a_tier_is_lost_only_down_the_program_order():
    from services.churn.signals import tier_went_down

    order = ["Bronze", "Silver", "Gold"]
    assert tier_went_down("Gold", "silver", order) and tier_went_down("Silver", "Bronze", order)
    assert not tier_went_down("Bronze", "Gold", order)
    assert not tier_went_down("Platinum", "Bronze", order)  # unknown tier: never counted as a loss
