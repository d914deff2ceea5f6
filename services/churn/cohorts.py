"""Cohorts: customers by month of first purchase x the share of them buying in each later
month (month 0 is the first-purchase month, always 100 %). Pure: no I/O."""

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date

from services.churn.indicators import month_label, month_start


def _month_index(month: date) -> int:
    return month.year * 12 + month.month - 1


@dataclass(frozen=True, slots=True)
class Cohort:
    month: str
    customers: int
    buying: list[int]  # buying[k]: cohort members with a purchase in month k after the first
    shares: list[float]


def cohorts(purchase_days: Mapping[str, Iterable[date]], *, as_of: date) -> list[Cohort]:
    """One row per first-purchase month up to `as_of`'s month; row k+1 has one cell fewer."""
    last = _month_index(month_start(as_of))
    members: dict[int, list[set[int]]] = defaultdict(list)
    for days in purchase_days.values():
        months = {_month_index(d) for d in days if _month_index(d) <= last}
        if months:
            members[min(months)].append(months)
    rows = []
    for first in sorted(members):
        group = members[first]
        buying = [sum(1 for m in group if first + k in m) for k in range(last - first + 1)]
        rows.append(Cohort(month_label(date(first // 12, first % 12 + 1, 1)), len(group), buying,
                           [b / len(group) for b in buying]))
    return rows
