"""Departing customers: what preceded a customer's loss, and how often each factor appears
among lost customers against retained ones. Pure: no I/O.

The factors (thresholds in the churn settings, defaults here):
- low_satisfaction: the last survey answer was a detractor (nps <= 6) or dissatisfied (csat <= 2);
- open_complaint: a complaint opened and not resolved;
- high_returns: returned value / bought value >= returns_ratio (0.2);
- unredeemed_points: a points balance >= unredeemed_points (500) left unspent;
- tier_lost: the customer's tier went down;
- failed_redemption: a redemption failed or was cancelled;
- no_recent_contact: no touchpoint from engagement for >= no_contact_days (90), or never;
- quadrant_<name>: the customer's loyalty-matrix quadrant.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class FactorThresholds:
    returns_ratio: Decimal = Decimal("0.2")
    unredeemed_points: int = 500
    no_contact_days: int = 90


@dataclass(frozen=True, slots=True)
class CustomerFacts:
    """What was known of a customer at a moment (their loss, or now for a retained one)."""

    at: datetime
    last_nps: int | None = None
    last_csat: int | None = None
    open_complaints: int = 0
    bought: Decimal = Decimal(0)
    returned: Decimal = Decimal(0)
    points_balance: int = 0
    tier_lost: bool = False
    failed_redemptions: int = 0
    last_contact_at: datetime | None = None
    quadrant: str | None = None


@dataclass(frozen=True, slots=True)
class FactorComparison:
    factor: str
    lost_count: int
    lost_share: float | None
    retained_count: int
    retained_share: float | None
    ratio: float | None  # lost_share / retained_share: > 1 means the factor comes before leaving


def returns_ratio(facts: CustomerFacts) -> Decimal | None:
    return facts.returned / facts.bought if facts.bought > 0 else None


def factors(facts: CustomerFacts, thresholds: FactorThresholds = FactorThresholds()) -> frozenset[str]:
    found = set()
    if (facts.last_nps is not None and facts.last_nps <= 6) or (facts.last_csat is not None and facts.last_csat <= 2):
        found.add("low_satisfaction")
    if facts.open_complaints > 0:
        found.add("open_complaint")
    ratio = returns_ratio(facts)
    if ratio is not None and ratio >= thresholds.returns_ratio:
        found.add("high_returns")
    if facts.points_balance >= thresholds.unredeemed_points:
        found.add("unredeemed_points")
    if facts.tier_lost:
        found.add("tier_lost")
    if facts.failed_redemptions > 0:
        found.add("failed_redemption")
    if facts.last_contact_at is None or (facts.at - facts.last_contact_at).days >= thresholds.no_contact_days:
        found.add("no_recent_contact")
    if facts.quadrant:
        found.add(f"quadrant_{facts.quadrant}")
    return frozenset(found)


FACTOR_ORDER = ("low_satisfaction", "open_complaint", "high_returns", "unredeemed_points", "tier_lost",
                "failed_redemption", "no_recent_contact", "quadrant_true_friend", "quadrant_butterfly",
                "quadrant_barnacle", "quadrant_stranger")


def compare(lost: Sequence[frozenset[str]], retained: Sequence[frozenset[str]]) -> list[FactorComparison]:
    """Each factor's frequency among lost and retained customers, most telling first."""
    rows = []
    for factor in FACTOR_ORDER:
        n_lost = sum(1 for f in lost if factor in f)
        n_kept = sum(1 for f in retained if factor in f)
        lost_share = n_lost / len(lost) if lost else None
        kept_share = n_kept / len(retained) if retained else None
        ratio = lost_share / kept_share if lost_share is not None and kept_share else None
        rows.append(FactorComparison(factor, n_lost, lost_share, n_kept, kept_share, ratio))
    return sorted(rows, key=lambda r: (-(r.ratio if r.ratio is not None else (float("inf") if r.lost_count else 0)),
                                       FACTOR_ORDER.index(r.factor)))
