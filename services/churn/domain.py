"""Pure rules of the churn service: purchase days and rhythm, overdue and lost, the risk
state machine with its episodes (hysteresis, cool-down), alert priority. No I/O here."""

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from statistics import median
from typing import Literal

RiskState = Literal["active", "at_risk", "lost"]
AlertKind = Literal["CustomerAtRisk", "CustomerRecovered", "CustomerLost"]
Priority = Literal["high", "medium", "low"]
RhythmSource = Literal["own", "base", "default"]

DAY_S = 86_400.0


def purchase_intervals(days: list[date]) -> list[int]:
    """Days between consecutive purchase days (sorted, distinct: several purchases on one
    day are one purchase day, as the buy-till-you-die models count them)."""
    ordered = sorted(set(days))
    return [(b - a).days for a, b in zip(ordered, ordered[1:])]


def median_interval(intervals: list[int]) -> float | None:
    return float(median(intervals)) if intervals else None


@dataclass(frozen=True, slots=True)
class Rhythm:
    """How many days this customer usually leaves between purchase days, and from where."""

    interval_days: float
    source: RhythmSource
    intervals: int


def rhythm(own_median_days: float | None, intervals: int, *, min_intervals: int,
           base_median_days: float | None, default_days: float) -> Rhythm:
    """The customer's own median interval once they have `min_intervals` intervals; before
    that the base's median interval (the typical customer's rhythm), else a default."""
    if own_median_days is not None and intervals >= min_intervals:
        return Rhythm(max(own_median_days, 1.0), "own", intervals)
    if base_median_days is not None:
        return Rhythm(max(base_median_days, 1.0), "base", intervals)
    return Rhythm(default_days, "default", intervals)


@dataclass(frozen=True, slots=True)
class RiskPolicy:
    overdue_factor: float
    lost_factor: float
    p_alive_threshold: float
    cooldown_days: float


@dataclass(frozen=True, slots=True)
class Reason:
    """One signal behind a transition (shared/events/churn.py AlertReason)."""

    signal: Literal["overdue", "low_p_alive", "lost_threshold", "purchased_again"]
    detail: str
    value: float | None = None
    threshold: float | None = None


@dataclass(frozen=True, slots=True)
class Risk:
    """A customer's risk state. `episode` counts at-risk episodes (1, 2, ...); an episode
    starts on entering at_risk (or lost directly) and ends with a purchase (recovered).
    `entry_last_purchase_at` is the last purchase known when the episode started: only a
    purchase after it ends the episode (an imported older purchase does not)."""

    state: RiskState = "active"
    episode: int = 0
    entered_at: datetime | None = None
    entry_last_purchase_at: datetime | None = None
    left_at: datetime | None = None
    reasons: tuple[Reason, ...] = ()


@dataclass(frozen=True, slots=True)
class Transition:
    kind: AlertKind
    risk: Risk  # the state after it
    reasons: tuple[Reason, ...] = field(default=())


def days_between(earlier: datetime, later: datetime) -> float:
    return (later - earlier).total_seconds() / DAY_S


def overdue_signals(*, days_since_last: float, rhythm_: Rhythm, p_alive: float | None,
                    policy: RiskPolicy) -> list[Reason]:
    """What says this customer may be leaving: overdue against their rhythm, or the model's
    probability of being active below the threshold."""
    reasons = []
    limit = policy.overdue_factor * rhythm_.interval_days
    if days_since_last > limit:
        reasons.append(Reason(
            "overdue", f"{days_since_last:.1f} days since the last purchase, over {policy.overdue_factor:g} x "
                       f"the {rhythm_.source} median interval of {rhythm_.interval_days:g} days",
            round(days_since_last, 2), round(limit, 2)))
    if p_alive is not None and p_alive < policy.p_alive_threshold:
        reasons.append(Reason("low_p_alive", f"probability of being active {p_alive:.3f} is below "
                                             f"{policy.p_alive_threshold:g}", round(p_alive, 4),
                              policy.p_alive_threshold))
    return reasons


def lost_signal(*, days_since_last: float, rhythm_: Rhythm, policy: RiskPolicy) -> Reason | None:
    limit = policy.lost_factor * rhythm_.interval_days
    if days_since_last <= limit:
        return None
    return Reason("lost_threshold", f"{days_since_last:.1f} days since the last purchase, over "
                                    f"{policy.lost_factor:g} x the {rhythm_.source} median interval of "
                                    f"{rhythm_.interval_days:g} days", round(days_since_last, 2), round(limit, 2))


def evaluate_risk(risk: Risk, *, now: datetime, last_purchase_at: datetime | None, rhythm_: Rhythm,
                  p_alive: float | None, policy: RiskPolicy) -> Transition | None:
    """The time-driven transitions (the scheduled evaluation): active -> at_risk (or straight
    to lost when already past the longer threshold), at_risk -> lost. One transition per
    state entered: a customer already in a state gets nothing until they leave it
    (hysteresis), and a new episode waits `cooldown_days` after the last recovery."""
    if last_purchase_at is None:
        return None
    days_since = days_between(last_purchase_at, now)
    lost = lost_signal(days_since_last=days_since, rhythm_=rhythm_, policy=policy)
    if risk.state == "lost":
        return None
    if risk.state == "at_risk":
        if lost is None:
            return None
        reasons = (lost,)
        return Transition("CustomerLost", Risk("lost", risk.episode, risk.entered_at, risk.entry_last_purchase_at,
                                               risk.left_at, risk.reasons + reasons), reasons)
    if risk.left_at is not None and days_between(risk.left_at, now) < policy.cooldown_days:
        return None
    signals = overdue_signals(days_since_last=days_since, rhythm_=rhythm_, p_alive=p_alive, policy=policy)
    if lost is not None:
        reasons = tuple(signals) + (lost,)
        return Transition("CustomerLost", Risk("lost", risk.episode + 1, now, last_purchase_at, risk.left_at,
                                               reasons), reasons)
    if not signals:
        return None
    reasons = tuple(signals)
    return Transition("CustomerAtRisk", Risk("at_risk", risk.episode + 1, now, last_purchase_at, risk.left_at,
                                             reasons), reasons)


def purchase_recovers(risk: Risk, *, now: datetime, last_purchase_at: datetime | None) -> Transition | None:
    """An at-risk or lost customer who buys again (a purchase after the one known when the
    episode started) has recovered: the episode ends."""
    if risk.state == "active" or last_purchase_at is None:
        return None
    if risk.entry_last_purchase_at is not None and last_purchase_at <= risk.entry_last_purchase_at:
        return None
    reason = Reason("purchased_again", f"purchased again on {last_purchase_at.date().isoformat()} after being "
                                       f"{risk.state.replace('_', ' ')}")
    return Transition("CustomerRecovered", Risk("active", risk.episode, None, None, now, ()), (reason,))


def priority(value_score: int | None) -> Priority:
    """Alerts ranked by value: a customer in the top two value quintiles is high, the middle
    one medium, the rest low (still alerted: a lower priority, not silence)."""
    if value_score is None or value_score == 3:
        return "medium"
    return "high" if value_score >= 4 else "low"


def news_window_start(now: datetime, horizon_days: float) -> datetime:
    """Per-event alerts are emitted only for events that happened after this."""
    return now - timedelta(days=horizon_days)
