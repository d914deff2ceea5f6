"""Engagement's pure rules with a fake clock: journeys started by events, the respect rules
at send time (consent, caps, quiet hours, survey cap, staleness), and a property test over
bursts of touchpoints: nobody ever exceeds the cap or gets a message in quiet hours, and a
capped or quiet-hour touchpoint is deferred, not dropped, while its window allows."""

import heapq
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engagement import domain as d
from services.engagement import tokens
from services.engagement.journeys import (
    Step,
    format_duration,
    load_file,
    parse_document,
    parse_duration,
)

JOURNEYS = load_file(Path(d.__file__).parent / "journeys.yaml")
WARSAW = d.zone("Europe/Warsaw", "UTC")
RULES = d.Respect()
NOON = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)  # 13:00 in Warsaw
CAPPED = Step(name="note", template="usage_note", valid_for="7d")
SURVEY = Step(name="survey", template="survey", valid_for="7d", survey=True)


def facts(event_type: str, **kw) -> d.Facts:
    return d.Facts(event_id=uuid.uuid4(), event_type=event_type, customer_id="c1", occurred_at=NOON, **kw)


def started(event_type: str, **kw) -> list[str]:
    return sorted(j.name for j in d.journeys_started(JOURNEYS, facts(event_type, **kw)))


def test_a_first_sale_starts_the_welcome_and_the_after_sale_journey():
    assert started("PurchaseRecorded", first_purchase=True, basket=Decimal(10)) == ["after_sale", "welcome"]
    assert started("PurchaseRecorded", first_purchase=False) == ["after_sale"]


def test_history_never_starts_a_journey():
    assert started("PurchaseRecorded", first_purchase=True, history=True) == []
    assert started("PointsEarned", history=True) == []


def test_tier_direction_follows_the_tier_order():
    assert started("TierChanged", from_tier="Bronze", tier="Gold") == ["tier_up"]
    assert started("TierChanged", from_tier="Gold", tier="Silver") == ["tier_down"]


def test_win_back_only_for_customers_worth_it():
    assert started("CustomerAtRisk", quadrant="true_friend", ltv=Decimal(500)) == ["win_back"]
    assert started("CustomerAtRisk", quadrant="butterfly", ltv=Decimal(500)) == []
    assert started("CustomerAtRisk", quadrant="true_friend", ltv=Decimal(50)) == []


def test_steps_are_due_from_the_triggers_business_time_with_a_stable_idempotency_key():
    f = facts("PurchaseRecorded")
    plan = d.plan(JOURNEYS.by_name("after_sale"), f)
    assert [(p.step.name, p.due_at - NOON) for p in plan] == [("usage_note", timedelta(days=2)),
                                                              ("survey", timedelta(days=15))]
    assert [p.timer_id for p in plan] == [p.timer_id for p in d.plan(JOURNEYS.by_name("after_sale"), f)]


def decide(now, step=CAPPED, history=None, consent=True, valid_until=None, tz=WARSAW):
    return d.decide(now=now, step=step, valid_until=valid_until or now + timedelta(days=3), consent=consent,
                    reachable=True, tz=tz, history=history or d.History(), rules=RULES)


def test_no_consent_is_a_skip_never_a_deferral():
    assert decide(NOON, consent=False) == d.Decision("skip", "no_consent")


def test_quiet_hours_defer_to_eight_in_the_customers_time_zone():
    late = datetime(2026, 12, 7, 21, 30, tzinfo=UTC)  # 22:30 in Warsaw
    decision = decide(late)
    assert decision.kind == "defer" and decision.reason == "quiet_hours"
    assert decision.until.astimezone(WARSAW).hour == 8 and decision.until.astimezone(WARSAW).day == 8
    assert decide(late, tz=d.zone("America/New_York", "UTC")).kind == "send"  # 16:30 there


def test_the_frequency_cap_defers_to_sixteen_hours_after_the_last_capped_message():
    decision = decide(NOON, history=d.History(capped_sent=[NOON - timedelta(hours=10)]))
    assert decision == d.Decision("defer", "frequency_cap", NOON + timedelta(hours=6))
    # 16 h after a message at 10:00 UTC is 03:00 in Warsaw: on to the end of the quiet hours
    decision = decide(NOON, history=d.History(capped_sent=[NOON - timedelta(hours=2)]))
    assert decision == d.Decision("defer", "frequency_cap", datetime(2026, 12, 8, 7, 0, tzinfo=UTC))


def test_a_deferral_beyond_the_validity_window_is_a_skip():
    decision = decide(NOON, history=d.History(capped_sent=[NOON]), valid_until=NOON + timedelta(hours=1))
    assert decision.kind == "skip" and decision.reason == "expired_while_deferred:frequency_cap"


def test_one_survey_per_thirty_days_and_stale_touchpoints_dropped():
    assert decide(NOON, step=SURVEY, history=d.History(last_survey_at=NOON - timedelta(days=10))).reason == "survey_cap"
    assert decide(NOON, valid_until=NOON - timedelta(seconds=1)) == d.Decision("skip", "stale")


def test_durations_read_back_what_they_write():
    for text in ("0s", "90s", "15m", "1h", "2d", "1w"):
        assert format_duration(parse_duration(text)) == text
    with pytest.raises(ValueError):
        parse_duration("two days")


def test_an_invalid_journeys_document_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="journey names repeat"):
        parse_document("journeys: [{name: a, trigger: {event: PointsEarned}, steps: [{name: s, template: t}]},"
                       " {name: a, trigger: {event: PointsEarned}, steps: [{name: s, template: t}]}]")


def test_signed_links_refuse_tampering_and_expiry():
    token = tokens.sign("k", "survey", {"s": "x"}, expires_at=NOON)
    assert tokens.verify("k", "survey", token, now=NOON)["s"] == "x"
    for bad, now in ((token, NOON + timedelta(seconds=1)), (token[:-2] + "AA", NOON)):
        with pytest.raises(tokens.BadToken):
            tokens.verify("k", "survey", bad, now=now)
    with pytest.raises(tokens.BadToken):
        tokens.verify("k", "unsubscribe", token, now=NOON)


# ---- the property: bursts of touchpoints through the respect rules with a fake clock ------

ZONES = ["Europe/Warsaw", "America/New_York", "Asia/Tokyo", "UTC"]
burst = st.tuples(st.integers(0, 3), st.integers(0, 60 * 24 * 20), st.integers(1, 6), st.booleans(),
                  st.integers(1, 10))  # customer, minute, how many, survey?, validity in days


@settings(max_examples=150, deadline=None)
@given(st.lists(burst, min_size=1, max_size=25), st.lists(st.sampled_from(ZONES), min_size=4, max_size=4))
def test_no_customer_ever_exceeds_the_cap_or_gets_a_message_in_quiet_hours(bursts, zones):
    start = datetime(2026, 3, 20, tzinfo=UTC)  # spans the spring DST change
    queue: list[tuple[datetime, int, int, Step, datetime]] = []
    n = 0
    for customer, minute, count, survey, valid_days in bursts:
        for _ in range(count):
            due = start + timedelta(minutes=minute)
            step = SURVEY if survey else CAPPED
            heapq.heappush(queue, (due, n, customer, step, due + timedelta(days=valid_days)))
            n += 1
    histories = {c: d.History() for c in range(4)}
    sent: dict[int, list[datetime]] = {c: [] for c in range(4)}
    while queue:
        now, i, customer, step, valid_until = heapq.heappop(queue)
        decision = d.decide(now=now, step=step, valid_until=valid_until, consent=True, reachable=True,
                            tz=d.zone(zones[customer], "UTC"), history=histories[customer], rules=RULES)
        if decision.kind == "send":
            d.record_sent(histories[customer], step, now)
            sent[customer].append(now)
        elif decision.kind == "defer":
            assert now < decision.until <= valid_until  # deferred within its window, not dropped
            heapq.heappush(queue, (decision.until, i, customer, step, valid_until))
        else:
            assert decision.reason in ("survey_cap", "stale") or decision.reason.startswith("expired_while_deferred")
    for customer, times in sent.items():
        tz = d.zone(zones[customer], "UTC")
        for t in times:
            assert not d.in_quiet_hours(t, tz, RULES), t.astimezone(tz)
        times.sort()
        for a, b in zip(times, times[1:]):
            assert b - a >= RULES.cap_interval
        for k, t in enumerate(times):
            assert len([u for u in times[k:] if u < t + timedelta(days=7)]) <= RULES.cap_per_week


def test_events_read_before_the_journeys_are_loaded_are_retried_not_dead_lettered():
    import asyncio

    from services.engagement.service import (
        Engagement,
        JourneyBook,
        JourneysNotLoaded,
        on_facts,
    )
    from shared.errors import is_transient

    engine = Engagement(settings=None, clock=lambda: NOON, journeys=JourneyBook(file=None), templates=None,
                        email=None, webhook=None)
    with pytest.raises(JourneysNotLoaded) as raised:
        asyncio.run(on_facts(None, engine, facts("PointsEarned"), lambda *_: None))
    assert is_transient(raised.value)
