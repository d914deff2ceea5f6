"""HTTP API of the churn service. Every route takes the admin key (X-Admin-Key): profiles are
personal data and the rest is back office."""

import base64
import binascii
import json
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.churn import domain, evaluation, queries
from services.churn.alerts import risk_from_row
from services.churn.service import ChurnContext
from shared.admin import admin_key_dependency
from shared.events import Money, utcnow

CustomerId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str, bytes: lambda b: b.decode("utf-8", "replace")})
        return JSONResponse({"error": "invalid_request", "detail": "the request does not match the API",
                             "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"error": "http_error", "detail": str(exc.detail)}
        if "reason" in detail:  # shared/admin.py refusals
            detail = {"error": detail["reason"], "detail": detail.get("msg", "")}
        return JSONResponse(detail, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status)


class ErrorOut(BaseModel):
    """Every refusal: a stable `error` code and a human `detail` (422s add `errors`)."""

    model_config = ConfigDict(extra="allow")

    error: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorOut, "description": text} for status, text in (
    (401, "Missing or wrong X-Admin-Key"), (404, "Unknown customer"),
    (409, "Another instance is doing this right now"), (422, "The request does not match the API"),
    (503, "The admin API is disabled (CHURN_ADMIN_API_KEY unset)"))}


class ReasonOut(BaseModel):
    signal: str
    detail: str
    value: float | None = None
    threshold: float | None = None


class RhythmOut(BaseModel):
    median_interval_days: float | None
    intervals: int
    interval_days: float
    source: str
    overdue_after_days: float
    lost_after_days: float


class RiskOut(BaseModel):
    state: str
    episode: int
    since: datetime | None
    reasons: list[ReasonOut]


class ProfileOut(BaseModel):
    customer_id: str
    currency: str | None
    first_purchase_at: datetime | None
    last_purchase_at: datetime | None
    days_since_last_purchase: float | None
    purchase_days: int
    purchases: int
    returns: int
    gross_spend: Money
    returned_spend: Money
    net_spend: Money
    margin: Money
    average_order_value: Money | None
    returns_ratio: float | None
    rhythm: RhythmOut
    recency_days: int | None
    recency_score: int | None
    frequency_score: int | None
    monetary_score: int | None
    segment: str | None
    quadrant: str | None = None  # the loyalty matrix's (reports, issue 13)
    p_alive: float | None
    expected_purchases: float | None
    expected_purchases_days: int
    expected_spend: Money | None
    ltv: Money | None
    ltv_horizon_days: int
    value_score: int | None
    priority: str
    fit_version: int | None
    snapshot_version: int | None
    points_available: int | None
    points_pending: int | None
    tier: str | None
    redemptions: int
    last_nps: int | None
    last_csat: int | None
    complaints_open: int
    risk: RiskOut
    categories: list[dict[str, Any]]


def _cursor(value: Decimal, customer_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([str(value), customer_id]).encode()).decode()


def _parse_cursor(cursor: str) -> tuple[Decimal, str]:
    try:
        value, customer_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return Decimal(value), str(customer_id)
    except (ValueError, TypeError, InvalidOperation, binascii.Error, UnicodeDecodeError):
        raise ApiError(422, "invalid_cursor", "the cursor is not one this API gave") from None


def create_routers(ctx: ChurnContext) -> list[APIRouter]:
    s = ctx.settings
    admin = Depends(admin_key_dependency(lambda: s.admin_api_key, setting="CHURN_ADMIN_API_KEY"))
    router = APIRouter(prefix="/v1", dependencies=[admin], tags=["churn"], responses=ERRORS)

    @router.get("/customers/{customer_id}/profile", response_model=ProfileOut,
                summary="What the service knows of one customer: RFM, rhythm, models, LTV, risk and its reasons")
    async def profile(customer_id: CustomerId) -> ProfileOut:
        row = await queries.customer(ctx.pool(), customer_id)
        if row is None:
            raise ApiError(404, "customer_not_found", "no event of this customer was seen")
        categories = await queries.categories(ctx.pool(), customer_id)
        return _profile(ctx, row, categories)

    @router.get("/segments", summary="Customers, net spend and LTV per RFM segment, with how many are at risk")
    async def segments() -> dict[str, Any]:
        return {"segments": await queries.segments(ctx.pool()), "as_of": utcnow()}

    @router.get("/at-risk", summary="At-risk and lost customers, highest value first (LTV, else historical margin)")
    async def at_risk(min_ltv: Annotated[Decimal | None, Query(ge=0, le=10**12)] = None,
                      limit: Annotated[int, Query(ge=1, le=500)] = 50,
                      cursor: Annotated[str | None, Query(max_length=512)] = None) -> dict[str, Any]:
        after = _parse_cursor(cursor) if cursor else None
        rows = await queries.at_risk(ctx.pool(), min_ltv=min_ltv, limit=limit + 1, after=after)
        more = len(rows) > limit
        rows = rows[:limit]
        items = [{"customer_id": r["customer_id"], "state": r["state"], "episode": r["episode"],
                  "since": r["entered_at"], "ltv": _str(r["ltv"]), "rank_value": _str(r["rank_value"]),
                  "segment": r["segment"], "priority": domain.priority(r["value_score"]),
                  "reasons": json.loads(r["reasons"]) if isinstance(r["reasons"], str) else r["reasons"],
                  "last_purchase_at": r["last_purchase_at"]} for r in rows]
        last = rows[-1] if rows else None
        return {"items": items,
                "next_cursor": _cursor(last["rank_value"], last["customer_id"]) if more and last else None}

    admin_router = APIRouter(prefix="/v1/admin", dependencies=[admin], tags=["admin"], responses=ERRORS)

    @admin_router.post("/models/fit", status_code=201, summary="Fit the models on the whole base now (stored as a new version), "
                                              "then refresh the RFM snapshot and rescore the base")
    async def fit() -> dict[str, Any]:
        result = await evaluation.refresh_base(ctx, trigger="admin")
        if result is None:
            raise ApiError(409, "busy", "another instance is fitting or evaluating; try again shortly")
        return result

    @admin_router.get("/models", summary="Fit history, newest first")
    async def fits(limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
        return {"items": await queries.fits(ctx.pool(), limit=limit)}

    @admin_router.post("/rfm/refresh", status_code=201, summary="Recompute the RFM quintile boundaries now, then rescore the base")
    async def refresh_rfm() -> dict[str, Any]:
        result = await evaluation.refresh_base(ctx, trigger="admin", fit=False)
        if result is None:
            raise ApiError(409, "busy", "another instance is refreshing; try again shortly")
        return result

    @admin_router.post("/evaluations", status_code=201, summary="Evaluate the whole base now (or finish an interrupted run)")
    async def evaluate() -> dict[str, Any]:
        result = await evaluation.run_evaluation(ctx, trigger="admin")
        if result is None:
            raise ApiError(409, "busy", "another instance is evaluating; try again shortly")
        return result

    return [router, admin_router]


def _str(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def _profile(ctx: ChurnContext, r: Any, categories: list[dict[str, Any]]) -> ProfileOut:
    s = ctx.settings
    now = utcnow()
    rhythm = ctx.rhythm(r)
    risk = risk_from_row(r)
    days_since = round(domain.days_between(r["last_purchase_at"], now), 2) if r["last_purchase_at"] else None
    return ProfileOut(
        customer_id=r["customer_id"], currency=r["currency"], first_purchase_at=r["first_purchase_at"],
        last_purchase_at=r["last_purchase_at"], days_since_last_purchase=days_since, purchase_days=r["purchase_days"],
        purchases=r["purchases"], returns=r["returns"], gross_spend=r["gross_spend"],
        returned_spend=r["returned_spend"], net_spend=r["net_spend"], margin=r["margin"].quantize(Decimal("0.01")),
        average_order_value=(r["net_spend"] / r["purchases"]).quantize(Decimal("0.01")) if r["purchases"] else None,
        returns_ratio=float(r["returned_spend"] / r["gross_spend"]) if r["gross_spend"] else None,
        rhythm=RhythmOut(median_interval_days=r["median_interval_days"], intervals=r["intervals"],
                         interval_days=rhythm.interval_days, source=rhythm.source,
                         overdue_after_days=s.overdue_factor * rhythm.interval_days,
                         lost_after_days=s.lost_factor * rhythm.interval_days),
        recency_days=r["recency_days"], recency_score=r["recency_score"], frequency_score=r["frequency_score"],
        monetary_score=r["monetary_score"], segment=r["segment"], quadrant=r.get("quadrant"), p_alive=r["p_alive"],
        expected_purchases=r["expected_purchases"], expected_purchases_days=s.expected_purchases_days,
        expected_spend=r["expected_spend"], ltv=r["ltv"], ltv_horizon_days=s.ltv_horizon_days,
        value_score=r["value_score"], priority=domain.priority(r["value_score"]), fit_version=r["fit_version"],
        snapshot_version=r["snapshot_version"], points_available=r["points_available"],
        points_pending=r["points_pending"], tier=r["tier"], redemptions=r["redemptions"], last_nps=r["last_nps"],
        last_csat=r["last_csat"], complaints_open=r["complaints_open"],
        risk=RiskOut(state=risk.state, episode=risk.episode, since=risk.entered_at,
                     reasons=[ReasonOut(signal=x.signal, detail=x.detail, value=x.value, threshold=x.threshold)
                              for x in risk.reasons]),
        categories=categories)
