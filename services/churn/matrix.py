"""The loyalty matrix (Reinartz & Kumar, "The Mismanagement of Customer Loyalty", HBR 2002):
profitability x loyalty, split at cut points (default: the medians). Pure: no I/O.

- profitability: the customer's LTV where a model fit gives one, else the realised margin;
- loyalty: the expected relationship duration, P(alive) x purchase rate (purchase days per
  month) where a fit gives P(alive), else the observed purchase rate x an activity flag.
A value strictly above its cut point is "high". TREATMENTS says what the program does with
each quadrant (the churn README, "Loyalty matrix", repeats it).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from statistics import median
from typing import Literal

Quadrant = Literal["true_friend", "butterfly", "barnacle", "stranger"]
QUADRANTS: tuple[Quadrant, ...] = ("true_friend", "butterfly", "barnacle", "stranger")

LABELS: dict[Quadrant, str] = {
    "true_friend": "True friends", "butterfly": "Butterflies", "barnacle": "Barnacles", "stranger": "Strangers",
}

# Reinartz & Kumar's advice, as the program applies it.
TREATMENTS: dict[Quadrant, str] = {
    "true_friend": "Profitable and loyal: reward consistently (recognition, tier benefits), communicate "
                   "regularly but not intrusively; protect them first when they drift.",
    "butterfly": "Profitable but short-lived: make the most of them while they buy (full-price offers, "
                 "time-limited campaigns) and stop investing once they stop.",
    "barnacle": "Loyal but unprofitable (the discount seekers): measure share of wallet; up- and cross-sell "
                "where it is low, hold cost to serve down where it is small. No extra discounts.",
    "stranger": "Neither: no relationship investment; make each transaction profitable on its own.",
}


@dataclass(frozen=True, slots=True)
class CustomerValue:
    customer_id: str
    profitability: Decimal
    loyalty: float
    revenue: Decimal
    margin: Decimal


@dataclass(frozen=True, slots=True)
class CutPoints:
    profitability: Decimal
    loyalty: float


@dataclass(frozen=True, slots=True)
class QuadrantSummary:
    quadrant: Quadrant
    label: str
    customers: int
    revenue: Decimal
    margin: Decimal
    treatment: str


def median_cuts(customers: Sequence[CustomerValue]) -> CutPoints:
    if not customers:
        return CutPoints(Decimal(0), 0.0)
    return CutPoints(Decimal(median(c.profitability for c in customers)), float(median(c.loyalty for c in customers)))


def quadrant_of(profitability: Decimal, loyalty: float, cuts: CutPoints) -> Quadrant:
    profitable, loyal = profitability > cuts.profitability, loyalty > cuts.loyalty
    if profitable:
        return "true_friend" if loyal else "butterfly"
    return "barnacle" if loyal else "stranger"


def assign(customers: Sequence[CustomerValue], cuts: CutPoints) -> dict[str, Quadrant]:
    return {c.customer_id: quadrant_of(c.profitability, c.loyalty, cuts) for c in customers}


def summarise(customers: Sequence[CustomerValue], cuts: CutPoints) -> list[QuadrantSummary]:
    totals = {q: [0, Decimal(0), Decimal(0)] for q in QUADRANTS}
    for c in customers:
        row = totals[quadrant_of(c.profitability, c.loyalty, cuts)]
        row[0] += 1
        row[1] += c.revenue
        row[2] += c.margin
    return [QuadrantSummary(q, LABELS[q], n, revenue, margin, TREATMENTS[q])
            for q, (n, revenue, margin) in totals.items()]


def ranked(customers: Sequence[CustomerValue], quadrant: Quadrant, cuts: CutPoints) -> list[CustomerValue]:
    """A quadrant's customers, most profitable first (ties by customer id, for stable pages)."""
    members = [c for c in customers if quadrant_of(c.profitability, c.loyalty, cuts) == quadrant]
    return sorted(members, key=lambda c: (-c.profitability, c.customer_id))
