"""Folding a batch of events into per-customer facts (services/churn/service.py Facts) and
scoring customers (services/churn/scoring.py), without I/O."""

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

from pydantic import TypeAdapter

from services.churn import handlers, scoring
from services.churn.settings import ChurnSettings
from services.churn.service import Facts
from shared.events.engagement import SurveyAnswered
from shared.events.points import PointsEarned
from shared.events.purchases import PurchaseRecorded, ReturnRecorded
from tests.support.churn_inputs import points_earned, purchase, survey_answered

NOW = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
SETTINGS = ChurnSettings(category_margin_rates='{"drinks": "0.50"}', margin_rate=Decimal("0.20"))


def fold(events) -> Facts:
    facts = Facts(SETTINGS, NOW - timedelta(days=7))
    tables = {**handlers.PURCHASES, **handlers.POINTS, **handlers.ENGAGEMENT}  # the dispatch tables
    for e in events:
        tables[e.type](facts, e)
    return facts


def sale(customer, at, amount, category="grocery", **kw):
    return PurchaseRecorded.model_validate(purchase(customer, at, amount, category=category, **kw))


def test_two_purchases_on_one_day_make_one_purchase_day_and_a_return_subtracts():
    day = NOW - timedelta(days=3)
    ret = ReturnRecorded.model_validate(purchase("c1", NOW - timedelta(hours=1), "10.00", kind="return"))
    facts = fold([sale("c1", day, "40.00"), sale("c1", day + timedelta(hours=2), "20.00", category="drinks"), ret])
    d = facts.deltas["c1"]
    assert (d.purchases, d.returns, d.gross, d.returned) == (2, 1, Decimal("60.00"), Decimal("10.00"))
    assert facts.days == {("c1", day.date()): [2, Decimal("60.00")]}
    # margins by category: 40 x 0.20 + 20 x 0.50, minus the returned grocery line 10 x 0.20
    assert d.margin == Decimal("16.0000")
    assert facts.categories[("c1", "grocery")] == [Decimal("30.00"), Decimal("6.0000")]
    assert facts.bought == {"c1"} and facts.news == {"c1"}


def test_imported_and_old_events_change_the_state_but_are_not_news():
    facts = fold([sale("old", NOW - timedelta(days=30), "5.00"), sale("imp", NOW, "5.00", history=True)])
    assert set(facts.deltas) == {"old", "imp"} and facts.news == set()
    assert facts.deltas["imp"].history == 1


def test_the_latest_balance_wins_and_the_latest_survey_answer_is_kept():
    later = PointsEarned.model_validate(points_earned("c1", NOW, 300, tier="Silver"))
    earlier = PointsEarned.model_validate(points_earned("c1", NOW - timedelta(hours=1), 100))
    answers = [SurveyAnswered.model_validate(survey_answered("c1", NOW - timedelta(hours=h), nps)) for h, nps in
               ((1, 9), (5, 2))]
    facts = fold([later, earlier, *answers])
    assert facts.points["c1"][:3] == (300, 5, "Silver")
    assert facts.counters["c1"][2] == 9


def test_unknown_engagement_types_are_skipped_not_refused():
    from shared.pipeline import Record

    [sub] = [s for s in handlers.subscriptions(type("Ctx", (), {"settings": SETTINGS})()) if "engagement" in s.topic]
    assert sub.decode(Record(b'{"type": "JourneyStarted"}', headers=(("type", b"JourneyStarted"),))) is None
    assert sub.decode(Record(b'{"type": "JourneyStarted", "x": 1}')) is None


def row(customer, days, first, last, spend, segment=None):
    return {"customer_id": customer, "purchase_days": days, "first_purchase_day": first, "last_purchase_day": last,
            "net_spend": Decimal(spend), "margin": Decimal(spend) * Decimal("0.3"), "redemptions": 0,
            "purchases": days, "segment": segment, "segment_changes": 0 if segment is None else 1}


def test_scores_without_snapshot_or_fit_are_empty_but_rank_by_historical_margin():
    [s] = scoring.score([row("c1", 3, date(2026, 10, 1), date(2026, 11, 20), "100.00")], now=NOW, snapshot=None,
                        fit=None, policy=scoring.ValuePolicy(90, 365, Decimal("0.3"), Decimal(1), Decimal(2), 0.1))
    assert s.recency_days == 11 and s.segment is None and s.p_alive is None and s.ltv is None
    assert s.rank_value == Decimal("30.00")


def test_segments_come_from_the_snapshot_and_a_change_is_counted():
    snap = scoring.Snapshot(1, NOW, 5, [5, 10, 20, 40], [1, 2, 3, 4], [50, 100, 200, 400], None, 10.0)
    rows = [row("champ", 9, date(2026, 1, 1), date(2026, 11, 30), "900.00", segment="Loyal"),
            row("gone", 1, date(2026, 1, 1), date(2026, 1, 1), "20.00", segment="Lost")]
    champ, gone = scoring.score(rows, now=NOW, snapshot=snap, fit=None,
                                policy=scoring.ValuePolicy(90, 365, Decimal("0.3"), Decimal(1), Decimal(2), 0.1))
    assert (champ.recency_score, champ.frequency_score, champ.segment) == (5, 5, "Champions")
    assert champ.segment_changed and champ.segment_changes == 2
    assert gone.segment == "Lost" and not gone.segment_changed and gone.segment_changes == 1
