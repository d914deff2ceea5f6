"""Prometheus gauges of the reports: aggregates only (never a customer id in a label).
Sampled on a schedule from the same use cases as the JSON endpoints. Segment and risk-state
counts are the service's own gauges (metrics.py: churn_customers, churn_customers_by_risk_state)."""

from datetime import datetime

import asyncpg
from prometheus_client import Gauge

from services.churn import indicators, reports
from services.churn.matrix import QUADRANTS
from services.churn.reports_settings import ReportsSettings

INDICATOR = Gauge("churn_relationship_indicator",
                  "Key indicators of the customer relationship, as a ratio 0..1 (nps: -100..100)",
                  ["indicator", "window"])
ANSWERS = Gauge("churn_relationship_survey_answers", "Survey answers behind the satisfaction index", ["kind", "window"])
CUSTOMERS = Gauge("churn_relationship_customers", "Customers counted by the indicators (S, E, N, lost)",
                  ["count", "window"])
QUADRANT = Gauge("churn_relationship_quadrant_customers", "Customers per loyalty-matrix quadrant", ["quadrant"])
DEPARTURES = Gauge("churn_relationship_departures_recorded", "Departures recorded (lost episodes studied)")


def _set(name: str, window: str, value: float | None) -> None:
    # No data (no customers at the start, no answers) is NaN, not 0: a rule must not read it as a collapse.
    INDICATOR.labels(name, window).set(float("nan") if value is None else value)


def _period(window: str, p: indicators.PeriodIndicators) -> None:
    _set("retention_rate", window, p.retention_rate)
    _set("churn_rate", window, p.churn_rate)
    _set("loyalty_index", window, p.loyalty_index)
    _set("csat", window, p.satisfaction.csat)
    _set("nps", window, p.satisfaction.nps)
    ANSWERS.labels("csat", window).set(p.satisfaction.csat_answers)
    ANSWERS.labels("nps", window).set(p.satisfaction.nps_answers)
    for count, value in (("start", p.customers_at_start), ("end", p.customers_at_end), ("new", p.new_customers),
                         ("lost", p.lost_customers)):
        CUSTOMERS.labels(count, window).set(value)


async def sample(pool: asyncpg.Pool, settings: ReportsSettings, *, now: datetime) -> None:
    async with pool.acquire() as conn:
        this_month = indicators.month_start(now.date())
        months, rolling = await reports.indicators_report(conn, settings, from_month=this_month, to_month=this_month)
        _period("month", months[-1])
        _period("rolling", rolling)
        counts = {q.quadrant: q.customers for q in (await reports.matrix_report(conn, settings, now=now)).quadrants}
        for q in QUADRANTS:
            QUADRANT.labels(q).set(counts.get(q, 0))
        DEPARTURES.set(await conn.fetchval("SELECT count(*) FROM departures"))
