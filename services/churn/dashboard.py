"""GET /dashboard: one server-rendered page for marketing and customer care (Jinja2, inline
SVG charts, no JavaScript): the four indicators month by month, the RFM grid, the loyalty
matrix, the cohort triangle, the departure factors and the at-risk customers ranked by value.
Every chart is drawn from the payloads the JSON endpoints serve (reports_api)."""

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from pydantic import SecretStr

from services.churn import charts, indicators, matrix, reports, reports_api
from services.churn import reports_repository as repo
from services.churn.charts import MatrixCell, Series
from services.churn.dashboard_auth import (
    COOKIE,
    SESSION_TTL_S,
    authorise,
    session_value,
)
from services.churn.reports_settings import ReportsSettings
from shared.admin import ADMIN_REFUSALS, AdminKeyRefused, check_admin_key

TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                        autoescape=select_autoescape(["html"]))

FACTOR_LABELS = {
    "low_satisfaction": "Low last satisfaction", "open_complaint": "Open complaint", "high_returns": "High returns",
    "unredeemed_points": "Points left unredeemed", "tier_lost": "Tier lost", "failed_redemption":
    "Failed/cancelled redemption", "no_recent_contact": "No recent contact", "quadrant_true_friend":
    "Quadrant: true friend", "quadrant_butterfly": "Quadrant: butterfly", "quadrant_barnacle": "Quadrant: barnacle",
    "quadrant_stranger": "Quadrant: stranger",
}
AT_RISK_ROWS = 25


def pct(value: float | None) -> float | None:
    return None if value is None else round(value * 100, 1)


def indicator_charts(payload: dict[str, Any]) -> dict[str, Markup]:
    months = payload["months"]
    labels = [m["period"] for m in months]
    return {
        "retention": Markup(charts.line_chart(
            "Retention and churn rate by month", labels,
            [Series("retention", [pct(m["retention_rate"]) for m in months]),
             Series("churn", [pct(m["churn_rate"]) for m in months])], y_label="share of customers at start",
            unit="%", y_max=100)),
        "loyalty": Markup(charts.line_chart(
            "Loyalty index (repeat-purchase rate) by month", labels,
            [Series("loyalty index", [pct(m["loyalty_index"]) for m in months])],
            y_label="repeat buyers among active", unit="%", y_max=100)),
        "satisfaction": Markup(charts.line_chart(
            "Satisfaction by month", labels,
            [Series("CSAT (share of 4-5)", [pct(m["satisfaction"]["csat"]) for m in months]),
             Series("NPS", [m["satisfaction"]["nps"] for m in months])], y_label="CSAT % / NPS points",
            y_min=-100, y_max=100, empty_message="No survey answers yet")),
    }


def rfm_chart(rows: list[asyncpg.Record]) -> Markup:
    counts = {(r["recency_score"], r["frequency_score"]): r["customers"] for r in rows}
    cells = [[counts.get((rs, fs), 0) for fs in range(1, 6)] for rs in range(5, 0, -1)]
    return Markup(charts.heat_map("RFM grid: customers by recency x frequency score", [f"R{r}" for r in range(5, 0, -1)],
                                  [f"F{f}" for f in range(1, 6)], cells, x_label="frequency score (5 = most often)",
                                  y_label="recency score (5 = most recent)",
                                  empty_message="No RFM scores yet (computed on a schedule)"))


def matrix_chart(payload: dict[str, Any]) -> Markup:
    q = {row["quadrant"]: row for row in payload["quadrants"]}

    def cell(key: str) -> MatrixCell:
        row = q[key]
        return MatrixCell(key, row["label"], row["customers"],
                          [f"revenue {row['revenue']} {payload['currency']}", f"margin {row['margin']} {payload['currency']}"])

    return Markup(charts.loyalty_matrix(
        "Loyalty matrix", top_left=cell("butterfly"), top_right=cell("true_friend"), bottom_left=cell("stranger"),
        bottom_right=cell("barnacle"), x_label="loyalty (expected duration)", y_label="profitability"))


def cohort_chart(payload: dict[str, Any]) -> Markup:
    rows = [(c["month"], c["customers"], c["shares"]) for c in payload["cohorts"]]
    return Markup(charts.cohort_triangle("Cohorts: share of each first-purchase month still buying", rows))


def departure_chart(payload: dict[str, Any]) -> Markup:
    factors = [f for f in payload["factors"] if f["lost_count"] or f["retained_count"]]
    return Markup(charts.bar_chart(
        "Factors before leaving: lost vs retained customers", [FACTOR_LABELS[f["factor"]] for f in factors],
        [Series("lost", [pct(f["lost_share"]) for f in factors]),
         Series("retained", [pct(f["retained_share"]) for f in factors])], x_label="share of customers", unit="%",
        x_max=100, empty_message="No departures recorded yet"))


def _reasons(value: Any) -> list[str]:
    items = json.loads(value) if isinstance(value, str) else (value or [])
    return [item.get("detail") or item.get("signal", "") for item in items]


async def dashboard_context(conn: asyncpg.Connection, settings: ReportsSettings, now: datetime) -> dict[str, Any]:
    to_month = indicators.month_start(now.date())
    from_month = indicators.add_months(to_month, -23)
    ind = await reports_api.indicators_payload(conn, settings, from_month, to_month)
    mat = reports_api.matrix_payload(await reports.matrix_report(conn, settings, now=now), settings.currency)
    coh = await reports_api.cohorts_payload(conn, now)
    dep = await reports_api.departures_payload(conn, settings, now)
    prof = await reports_api.profitability_payload(conn, "category")
    risk_counts = await repo.risk_counts(conn)
    at_risk = [{"customer_id": r["customer_id"], "value": reports_api.money(r["rank_value"]),
                "segment": r["segment"], "quadrant": matrix.LABELS.get(r["quadrant"], "—") if r["quadrant"] else "—",
                "since": r["entered_at"].date().isoformat() if r["entered_at"] else "—",
                "last_purchase": r["last_purchase_day"].isoformat() if r["last_purchase_day"] else "—",
                "reasons": _reasons(r["reasons"])}
               for r in await repo.at_risk(conn, limit=AT_RISK_ROWS, offset=0)]
    return {
        "now": now, "currency": settings.currency, "indicators": ind, "rolling": ind["rolling"],
        "recent_months": list(reversed(ind["months"][-12:])), "charts": {
            **indicator_charts(ind), "rfm": rfm_chart(await repo.rfm_grid(conn)), "matrix": matrix_chart(mat),
            "cohorts": cohort_chart(coh), "departures": departure_chart(dep)},
        "matrix": mat, "departures": dep, "factor_labels": FACTOR_LABELS, "profitability": prof,
        "at_risk": at_risk, "at_risk_count": risk_counts.get("at_risk", 0), "lost_count": risk_counts.get("lost", 0),
        "pct": pct,
    }


def create_dashboard_router(*, pool: Callable[[], asyncpg.Pool], settings: ReportsSettings,
                            admin_key: Callable[[], str | SecretStr | None], clock: Callable[[], datetime],
                            secure_cookie: bool = False) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def login_page(message: str | None, status: int) -> HTMLResponse:
        return HTMLResponse(TEMPLATES.get_template("login.html").render(message=message), status_code=status)

    @router.get("/dashboard")
    async def dashboard(request: Request) -> Response:
        refused = authorise(request, admin_key())
        if refused is not None:
            if refused.status == 503:
                return login_page(refused.msg, 503)
            return RedirectResponse("/dashboard/login", status_code=303)
        async with pool().acquire() as conn:
            context = await dashboard_context(conn, settings, clock())
        return HTMLResponse(TEMPLATES.get_template("dashboard.html").render(**context))

    @router.get("/dashboard/login")
    async def login_form() -> HTMLResponse:
        return login_page(None, 200)

    @router.post("/dashboard/login")
    async def login(key: Annotated[str, Form(max_length=512)]) -> Response:
        try:
            check_admin_key(key, admin_key(), setting="CHURN_ADMIN_API_KEY")
        except AdminKeyRefused as refused:
            ADMIN_REFUSALS.labels(refused.reason).inc()
            return login_page("That key is not the admin key." if refused.status == 401 else refused.msg,
                              refused.status)
        response = RedirectResponse("/dashboard", status_code=303)
        response.set_cookie(COOKIE, session_value(admin_key()), max_age=SESSION_TTL_S, httponly=True,
                            samesite="strict", secure=secure_cookie, path="/")
        return response

    @router.post("/dashboard/logout")
    async def logout() -> Response:
        response = RedirectResponse("/dashboard/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    return router
