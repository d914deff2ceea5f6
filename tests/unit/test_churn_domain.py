"""The churn service's pure rules: purchase days and rhythm, the risk state machine with its
episodes (hysteresis, cool-down, lost), recovery, priority."""

from datetime import date, datetime, timedelta, timezone

from services.churn import domain
from services.churn.domain import Risk, RiskPolicy

NOW = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
POLICY = RiskPolicy(overdue_factor=2.0, lost_factor=4.0, p_alive_threshold=0.3, cooldown_days=14)
TEN_DAYS = domain.Rhythm(10.0, "own", 3)


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def test_several_purchases_on_one_day_are_one_purchase_day_and_order_does_not_matter():
    days = [date(2026, 1, 10), date(2026, 1, 1), date(2026, 1, 10), date(2026, 1, 4)]
    assert domain.purchase_intervals(days) == [3, 6]
    assert domain.median_interval([3, 6, 100]) == 6.0


def test_the_rhythm_is_the_customers_own_only_with_enough_intervals():
    assert domain.rhythm(7.0, 3, min_intervals=3, base_median_days=20, default_days=30) == domain.Rhythm(7.0, "own", 3)
    assert domain.rhythm(7.0, 2, min_intervals=3, base_median_days=20, default_days=30).source == "base"
    assert domain.rhythm(None, 0, min_intervals=3, base_median_days=None, default_days=30) == domain.Rhythm(
        30, "default", 0)
    # a customer buying twice a day still has a rhythm of at least a day
    assert domain.rhythm(0.0, 5, min_intervals=3, base_median_days=None, default_days=30).interval_days == 1.0


def test_an_overdue_customer_enters_at_risk_once_with_the_reason_and_values():
    t = domain.evaluate_risk(Risk(), now=NOW, last_purchase_at=ago(25), rhythm_=TEN_DAYS, p_alive=None, policy=POLICY)
    assert t is not None and t.kind == "CustomerAtRisk" and t.risk.state == "at_risk" and t.risk.episode == 1
    [reason] = t.reasons
    assert (reason.signal, reason.value, reason.threshold) == ("overdue", 25.0, 20.0)
    again = domain.evaluate_risk(t.risk, now=NOW + timedelta(hours=1), last_purchase_at=ago(25), rhythm_=TEN_DAYS,
                                 p_alive=0.01, policy=POLICY)
    assert again is None  # hysteresis: nothing until the customer leaves the state


def test_a_customer_within_their_rhythm_is_left_alone_unless_the_model_says_otherwise():
    assert domain.evaluate_risk(Risk(), now=NOW, last_purchase_at=ago(19), rhythm_=TEN_DAYS, p_alive=0.9,
                                policy=POLICY) is None
    t = domain.evaluate_risk(Risk(), now=NOW, last_purchase_at=ago(5), rhythm_=TEN_DAYS, p_alive=0.1, policy=POLICY)
    assert t.kind == "CustomerAtRisk" and [r.signal for r in t.reasons] == ["low_p_alive"]


def test_at_risk_becomes_lost_past_the_longer_threshold_in_the_same_episode():
    at_risk = domain.evaluate_risk(Risk(), now=ago(20), last_purchase_at=ago(45), rhythm_=TEN_DAYS, p_alive=None,
                                   policy=POLICY).risk
    lost = domain.evaluate_risk(at_risk, now=NOW, last_purchase_at=ago(45), rhythm_=TEN_DAYS, p_alive=None,
                                policy=POLICY)
    assert lost.kind == "CustomerLost" and lost.risk.episode == 1 and lost.risk.state == "lost"
    assert lost.reasons[0].signal == "lost_threshold" and lost.reasons[0].threshold == 40.0
    assert domain.evaluate_risk(lost.risk, now=NOW, last_purchase_at=ago(45), rhythm_=TEN_DAYS, p_alive=None,
                                policy=POLICY) is None


def test_a_customer_first_seen_long_gone_is_lost_straight_away_with_one_alert():
    t = domain.evaluate_risk(Risk(), now=NOW, last_purchase_at=ago(400), rhythm_=TEN_DAYS, p_alive=None,
                             policy=POLICY)
    assert t.kind == "CustomerLost" and t.risk.episode == 1
    assert {r.signal for r in t.reasons} == {"overdue", "lost_threshold"}


def test_a_purchase_after_the_episode_began_recovers_and_an_older_one_does_not():
    at_risk = domain.evaluate_risk(Risk(), now=NOW, last_purchase_at=ago(30), rhythm_=TEN_DAYS, p_alive=None,
                                   policy=POLICY).risk
    assert domain.purchase_recovers(at_risk, now=NOW, last_purchase_at=ago(30)) is None  # e.g. an imported older one
    t = domain.purchase_recovers(at_risk, now=NOW, last_purchase_at=NOW)
    assert t.kind == "CustomerRecovered" and t.risk.state == "active" and t.risk.episode == 1
    assert t.risk.left_at == NOW and t.reasons[0].signal == "purchased_again"
    assert domain.purchase_recovers(t.risk, now=NOW, last_purchase_at=NOW) is None


def test_after_recovering_a_new_episode_waits_for_the_cool_down():
    recovered = Risk("active", 1, left_at=ago(10))
    assert domain.evaluate_risk(recovered, now=NOW, last_purchase_at=ago(25), rhythm_=TEN_DAYS, p_alive=None,
                                policy=POLICY) is None
    later = domain.evaluate_risk(recovered, now=NOW + timedelta(days=5), last_purchase_at=ago(25), rhythm_=TEN_DAYS,
                                 p_alive=None, policy=POLICY)
    assert later.kind == "CustomerAtRisk" and later.risk.episode == 2


def test_no_purchase_no_risk():
    assert domain.evaluate_risk(Risk(), now=NOW, last_purchase_at=None, rhythm_=TEN_DAYS, p_alive=0.0,
                                policy=POLICY) is None


def test_alerts_are_ranked_by_value_not_silenced():
    assert [domain.priority(s) for s in (5, 4, 3, 2, 1, None)] == ["high", "high", "medium", "low", "low", "medium"]
