"""Use cases of the churn service's reports: read what the repository gives, compute with
the pure modules (indicators, matrix, cohorts, departures), and the two scheduled jobs that
write (the quadrant refresh, the departure record). Every figure the JSON endpoints, the
dashboard and the gauges show comes from here."""

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal

import asyncpg

from services.churn import cohorts, departures, indicators, matrix
from services.churn import reports_repository as repo
from services.churn.reports_settings import ReportsSettings


@dataclass(frozen=True, slots=True)
class MatrixReport:
    cuts: matrix.CutPoints
    cuts_are_medians: bool
    customers: int
    quadrants: list[matrix.QuadrantSummary]
    values: list[matrix.CustomerValue]


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


async def indicators_report(conn: asyncpg.Connection, settings: ReportsSettings, *, from_month: date,
                            to_month: date) -> tuple[list[indicators.PeriodIndicators], indicators.PeriodIndicators]:
    """Month by month from `from_month` to `to_month`, and the rolling window ending with `to_month`."""
    window_first = indicators.add_months(to_month, -(settings.rolling_window_months - 1))
    first = min(from_month, window_first)
    last_day = indicators.month_end(to_month)
    days = await repo.purchase_days(conn, up_to=last_day)
    answers = await repo.survey_answers(conn, since=_midnight(first),
                                        until=_midnight(indicators.add_months(to_month, 1)))
    # Pure Python over every customer's purchase days (~2.7 s for 100k customers and 25 months
    # here): in a worker thread, so the service's consumers keep their event loop meanwhile.
    months = await asyncio.to_thread(indicators.monthly_indicators, days, answers, from_month=from_month,
                                     to_month=to_month, active_window_days=settings.active_window_days)
    rolling = await asyncio.to_thread(indicators.rolling_indicators, days, answers, to_month=to_month,
                                      window_months=settings.rolling_window_months,
                                      active_window_days=settings.active_window_days)
    return months, rolling


async def matrix_report(conn: asyncpg.Connection, settings: ReportsSettings, *, now: datetime) -> MatrixReport:
    values = await repo.customer_values(conn, as_of=now.date(), active_window_days=settings.active_window_days)
    medians = matrix.median_cuts(values)
    cuts = matrix.CutPoints(
        settings.matrix_profitability_cut if settings.matrix_profitability_cut is not None else medians.profitability,
        settings.matrix_loyalty_cut if settings.matrix_loyalty_cut is not None else medians.loyalty)
    configured = settings.matrix_profitability_cut is not None or settings.matrix_loyalty_cut is not None
    return MatrixReport(cuts, not configured, len(values), matrix.summarise(values, cuts), values)


async def refresh_quadrants(pool: asyncpg.Pool, settings: ReportsSettings, *, now: datetime) -> MatrixReport:
    """Assign every customer their quadrant (scheduled; idempotent, the last run wins)."""
    async with pool.acquire() as conn, conn.transaction():
        report = await matrix_report(conn, settings, now=now)
        rows = [(c.customer_id, matrix.quadrant_of(c.profitability, c.loyalty, report.cuts), c.profitability,
                 c.loyalty) for c in report.values]
        await repo.write_quadrants(conn, rows, now)
    return report


def _facts(row: asyncpg.Record, at: datetime) -> departures.CustomerFacts:
    return departures.CustomerFacts(
        at=at, last_nps=row["last_nps"], last_csat=row["last_csat"], open_complaints=row["complaints_open"],
        bought=row["gross_spend"], returned=row["returned_spend"], points_balance=row["points"],
        tier_lost=row["tier_lost_at"] is not None and row["tier_lost_at"] <= at,
        failed_redemptions=row["failed_redemptions"], last_contact_at=row["last_contact_at"],
        quadrant=row["quadrant"])


def _facts_json(facts: departures.CustomerFacts) -> str:
    ratio = departures.returns_ratio(facts)
    return json.dumps({
        "last_nps": facts.last_nps, "last_csat": facts.last_csat, "open_complaints": facts.open_complaints,
        "returns_ratio": None if ratio is None else format(ratio.quantize(Decimal("0.0001")), "f"),
        "points_unredeemed": facts.points_balance, "tier_lost": facts.tier_lost,
        "failed_redemptions": facts.failed_redemptions,
        "days_since_last_contact": None if facts.last_contact_at is None else (facts.at - facts.last_contact_at).days,
        "quadrant": facts.quadrant})


async def record_departures(pool: asyncpg.Pool, settings: ReportsSettings, *, now: datetime) -> int:
    """Record what preceded each loss not recorded yet (scheduled shortly after the
    CustomerLost transition; a lost customer's facts hardly move while they are gone)."""
    async with pool.acquire() as conn, conn.transaction():
        rows = []
        for row in await repo.unrecorded_departures(conn):
            at = row["entered_at"] or now
            facts = _facts(row, at)
            rows.append((row["customer_id"], row["episode"], at,
                         sorted(departures.factors(facts, settings.thresholds())), _facts_json(facts)))
        await repo.write_departures(conn, rows, now)
    return len(rows)


async def departures_report(conn: asyncpg.Connection, settings: ReportsSettings, *, now: datetime,
                            since: datetime | None = None) -> tuple[int, int, list[departures.FactorComparison]]:
    lost = [frozenset(f) for f in await repo.departure_factors(conn, since=since)]
    retained = [departures.factors(_facts(r, now), settings.thresholds())
                for r in await repo.retained_facts(conn, as_of=now.date(),
                                                   active_window_days=settings.active_window_days)]
    return len(lost), len(retained), departures.compare(lost, retained)


async def cohorts_report(conn: asyncpg.Connection, *, as_of: date) -> list[cohorts.Cohort]:
    days = await repo.purchase_days(conn, up_to=as_of)
    return await asyncio.to_thread(cohorts.cohorts, days, as_of=as_of)
