"""HTTP API of the churn service's reports (admin key or a dashboard session): the four
indicators, the loyalty matrix and its customers, profitability, cohorts, departures. The
dashboard renders its charts from these same payloads (`*_payload` functions)."""

import re
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Path, Query

from services.churn import indicators, matrix, reports
from services.churn import reports_repository as repo
from services.churn.api import ERRORS
from services.churn.reports_settings import ReportsSettings

MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
MAX_MONTHS = 120


def money(value: Decimal | None) -> str | None:
    return None if value is None else format(Decimal(value).quantize(Decimal("0.01")), "f")


def rate(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def parse_month(text: str | None, name: str, default: date) -> date:
    if text is None:
        return default
    m = MONTH.match(text)
    if not m:
        raise HTTPException(422, detail={"error": "invalid_month", "detail": f"{name} must be YYYY-MM, got {text!r}"})
    return date(int(m[1]), int(m[2]), 1)


def month_range(from_text: str | None, to_text: str | None, now: datetime, window: int) -> tuple[date, date]:
    to_month = parse_month(to_text, "to", indicators.month_start(now.date()))
    from_month = parse_month(from_text, "from", indicators.add_months(to_month, -(window - 1)))
    if from_month > to_month:
        raise HTTPException(422, detail={"error": "invalid_range", "detail": "from must not be after to"})
    if len(indicators.months_between(from_month, to_month)) > MAX_MONTHS:
        raise HTTPException(422, detail={"error": "range_too_long", "detail": f"at most {MAX_MONTHS} months"})
    return from_month, to_month


def period_payload(p: indicators.PeriodIndicators) -> dict[str, Any]:
    s = p.satisfaction
    return {
        "period": p.period, "first_day": p.first_day.isoformat(), "last_day": p.last_day.isoformat(),
        "customers_at_start": p.customers_at_start, "customers_at_end": p.customers_at_end,
        "new_customers": p.new_customers, "lost_customers": p.lost_customers,
        "retention_rate": rate(p.retention_rate), "churn_rate": rate(p.churn_rate),
        "repeat_customers": p.repeat_customers, "loyalty_index": rate(p.loyalty_index),
        "satisfaction": {"csat": rate(s.csat), "csat_answers": s.csat_answers, "nps": rate(s.nps),
                         "nps_answers": s.nps_answers,
                         "status": "ok" if s.csat_answers or s.nps_answers else "no_data"},
    }


async def indicators_payload(conn: asyncpg.Connection, settings: ReportsSettings, from_month: date,
                             to_month: date) -> dict[str, Any]:
    months, rolling = await reports.indicators_report(conn, settings, from_month=from_month, to_month=to_month)
    return {"active_window_days": settings.active_window_days, "months": [period_payload(m) for m in months],
            "rolling": {"window_months": settings.rolling_window_months, **period_payload(rolling)}}


def matrix_payload(report: reports.MatrixReport, currency: str) -> dict[str, Any]:
    return {
        "customers": report.customers, "currency": currency,
        "cut_points": {"profitability": money(report.cuts.profitability), "loyalty": round(report.cuts.loyalty, 6),
                       "source": "medians" if report.cuts_are_medians else "settings"},
        "quadrants": [{"quadrant": q.quadrant, "label": q.label, "customers": q.customers, "revenue": money(q.revenue),
                       "margin": money(q.margin), "treatment": q.treatment} for q in report.quadrants],
    }


def value_payload(c: matrix.CustomerValue) -> dict[str, Any]:
    return {"customer_id": c.customer_id, "profitability": money(c.profitability), "loyalty": round(c.loyalty, 6),
            "revenue": money(c.revenue), "margin": money(c.margin)}


async def departures_payload(conn: asyncpg.Connection, settings: ReportsSettings, now: datetime) -> dict[str, Any]:
    lost, retained, rows = await reports.departures_report(conn, settings, now=now)
    return {"lost_customers": lost, "retained_customers": retained,
            "factors": [{"factor": r.factor, "lost_count": r.lost_count, "lost_share": rate(r.lost_share),
                         "retained_count": r.retained_count, "retained_share": rate(r.retained_share),
                         "ratio": rate(r.ratio)} for r in rows]}


async def cohorts_payload(conn: asyncpg.Connection, now: datetime) -> dict[str, Any]:
    rows = await reports.cohorts_report(conn, as_of=now.date())
    return {"as_of": now.date().isoformat(),
            "cohorts": [{"month": c.month, "customers": c.customers, "buying": c.buying,
                         "shares": [rate(s) for s in c.shares]} for c in rows]}


async def profitability_payload(conn: asyncpg.Connection, by: str) -> dict[str, Any]:
    rows = await repo.profitability(conn, by=by)
    return {"by": by, "rows": [{"key": r["key"], "customers": r["customers"], "revenue": money(r["revenue"]),
                                "margin": money(r["margin"]),
                                "margin_rate": rate(float(r["margin"] / r["revenue"])) if r["revenue"] else None}
                               for r in rows]}


def create_reports_router(*, pool: Callable[[], asyncpg.Pool], settings: ReportsSettings,
                          authorised: Callable[..., Awaitable[None]], clock: Callable[[], datetime]) -> APIRouter:
    router = APIRouter(tags=["reports"], dependencies=[Depends(authorised)], responses=ERRORS)

    @router.get("/v1/indicators", summary="The four key indicators, month by month and over a rolling window")
    async def get_indicators(from_: Annotated[str | None, Query(alias="from", description="YYYY-MM")] = None,
                             to: Annotated[str | None, Query(description="YYYY-MM")] = None) -> dict[str, Any]:
        first, last = month_range(from_, to, clock(), settings.rolling_window_months)
        async with pool().acquire() as conn:
            return await indicators_payload(conn, settings, first, last)

    @router.get("/v1/matrix", summary="The loyalty matrix: customers, revenue, margin and treatment per quadrant")
    async def get_matrix() -> dict[str, Any]:
        async with pool().acquire() as conn:
            return matrix_payload(await reports.matrix_report(conn, settings, now=clock()), settings.currency)

    @router.get("/v1/matrix/{quadrant}/customers", summary="A quadrant's customers, most profitable first")
    async def get_quadrant(quadrant: Annotated[matrix.Quadrant, Path()],
                           limit: Annotated[int, Query(ge=1, le=500)] = 50,
                           offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        async with pool().acquire() as conn:
            report = await reports.matrix_report(conn, settings, now=clock())
        members = matrix.ranked(report.values, quadrant, report.cuts)
        page = members[offset:offset + limit]
        return {"quadrant": quadrant, "total": len(members), "offset": offset, "limit": limit,
                "next_offset": offset + limit if offset + limit < len(members) else None,
                "customers": [value_payload(c) for c in page]}

    @router.get("/v1/profitability", summary="Customers, revenue and margin by product category, segment or quadrant")
    async def get_profitability(by: Literal["category", "segment", "quadrant"] = "category") -> dict[str, Any]:
        async with pool().acquire() as conn:
            return await profitability_payload(conn, by)

    @router.get("/v1/cohorts", summary="Customers by month of first purchase x share still buying in later months")
    async def get_cohorts() -> dict[str, Any]:
        async with pool().acquire() as conn:
            return await cohorts_payload(conn, clock())

    @router.get("/v1/departures", summary="How often each factor preceded a loss, against retained customers")
    async def get_departures() -> dict[str, Any]:
        async with pool().acquire() as conn:
            return await departures_payload(conn, settings, clock())

    return router
