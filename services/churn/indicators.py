"""The four key indicators of the customer relationship (satisfaction, retention, loyalty,
churn), computed from per-customer purchase days and survey answers. Pure: no I/O.

Definitions (also in the churn README, "Indicators"):
- A customer is *active* at the end of day D when they have a purchase day d <= D with
  D - d < active_window_days (default 180): they bought within the window.
- For a period [first day, last day]: S = customers active at the end of the day before it,
  E = active at the end of its last day, N = those in E not in S (first-time buyers and
  returning lapsed customers).
- retention = (E - N) / S; churn = lost / S, lost = customers in S not in E
  (so retention + churn = 1 by construction; both None when S = 0).
- loyalty index = the repeat-purchase rate of E: the share of the period's active customers
  who bought on at least two distinct days within the active window ending at the period end.
- satisfaction: CSAT = share of csat answers 4 or 5 (scale 1-5); NPS = % promoters (9-10)
  minus % detractors (0-6) of nps answers; with the number of answers; None without answers.
"""

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta


@dataclass(frozen=True, slots=True)
class SurveyAnswer:
    answered_on: date
    csat: int | None = None
    nps: int | None = None


@dataclass(frozen=True, slots=True)
class Satisfaction:
    csat: float | None  # share of 4-5 answers, 0..1
    csat_answers: int
    nps: float | None  # -100..100
    nps_answers: int


@dataclass(frozen=True, slots=True)
class PeriodIndicators:
    period: str  # "2026-03" for a month, "2025-04..2026-03" for a window
    first_day: date
    last_day: date
    customers_at_start: int  # S
    customers_at_end: int  # E
    new_customers: int  # N
    lost_customers: int
    retention_rate: float | None
    churn_rate: float | None
    repeat_customers: int
    loyalty_index: float | None
    satisfaction: Satisfaction


def month_start(day: date) -> date:
    return day.replace(day=1)


def add_months(month: date, n: int) -> date:
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def month_end(month: date) -> date:
    return add_months(month, 1) - timedelta(days=1)


def months_between(first: date, last: date) -> list[date]:
    """First days of every month from `first`'s month to `last`'s, both included."""
    months, month = [], month_start(first)
    while month <= month_start(last):
        months.append(month)
        month = add_months(month, 1)
    return months


def month_label(month: date) -> str:
    return f"{month.year:04d}-{month.month:02d}"


def _active(days: Sequence[date], at_end_of: date, window_days: int) -> bool:
    i = bisect_right(days, at_end_of)
    return i > 0 and (at_end_of - days[i - 1]).days < window_days


def _purchase_days_within(days: Sequence[date], at_end_of: date, window_days: int) -> int:
    low = at_end_of - timedelta(days=window_days - 1)
    return bisect_right(days, at_end_of) - bisect_right(days, low - timedelta(days=1))


def satisfaction(answers: Iterable[SurveyAnswer]) -> Satisfaction:
    answers = list(answers)
    csat = [a.csat for a in answers if a.csat is not None]
    nps = [a.nps for a in answers if a.nps is not None]
    promoters = sum(1 for v in nps if v >= 9)
    detractors = sum(1 for v in nps if v <= 6)
    return Satisfaction(
        csat=sum(1 for v in csat if v >= 4) / len(csat) if csat else None,
        csat_answers=len(csat),
        nps=100.0 * (promoters - detractors) / len(nps) if nps else None,
        nps_answers=len(nps),
    )


def indicators_for_period(purchase_days: Mapping[str, Sequence[date]], answers: Sequence[SurveyAnswer], *,
                          first_day: date, last_day: date, active_window_days: int,
                          label: str | None = None) -> PeriodIndicators:
    """The four indicators over [first_day, last_day]; `purchase_days` sorted per customer."""
    before = first_day - timedelta(days=1)
    at_start = at_end = new = lost = repeat = 0
    for days in purchase_days.values():
        was = _active(days, before, active_window_days)
        now = _active(days, last_day, active_window_days)
        at_start += was
        at_end += now
        new += now and not was
        lost += was and not now
        repeat += now and _purchase_days_within(days, last_day, active_window_days) >= 2
    return PeriodIndicators(
        period=label or f"{first_day.isoformat()}..{last_day.isoformat()}",
        first_day=first_day, last_day=last_day,
        customers_at_start=at_start, customers_at_end=at_end, new_customers=new, lost_customers=lost,
        retention_rate=(at_end - new) / at_start if at_start else None,
        churn_rate=lost / at_start if at_start else None,
        repeat_customers=repeat,
        loyalty_index=repeat / at_end if at_end else None,
        satisfaction=satisfaction([a for a in answers if first_day <= a.answered_on <= last_day]),
    )


def monthly_indicators(purchase_days: Mapping[str, Sequence[date]], answers: Sequence[SurveyAnswer], *,
                       from_month: date, to_month: date, active_window_days: int) -> list[PeriodIndicators]:
    return [indicators_for_period(purchase_days, answers, first_day=m, last_day=month_end(m),
                                  active_window_days=active_window_days, label=month_label(m))
            for m in months_between(from_month, to_month)]


def rolling_indicators(purchase_days: Mapping[str, Sequence[date]], answers: Sequence[SurveyAnswer], *,
                       to_month: date, window_months: int, active_window_days: int) -> PeriodIndicators:
    """The indicators over the `window_months` calendar months ending with `to_month`."""
    first = add_months(month_start(to_month), -(window_months - 1))
    last = month_end(to_month)
    return indicators_for_period(purchase_days, answers, first_day=first, last_day=last,
                                 active_window_days=active_window_days,
                                 label=f"{month_label(first)}..{month_label(to_month)}")
