"""HTTP API of the rewards service: the customer API (JWT bearer; the customer is the
token's subject) and the admin API for the catalog (X-Admin-Key)."""

import hmac
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.security import HTTPBearer
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from services.rewards import domain, metrics, service
from services.rewards.domain import Redemption, Reward
from services.rewards.service import RewardsContext
from services.rewards.token import InvalidToken, TokenVerifier
from shared import logging as shared_logging

# Domain errors and the status a client sees for them.
_STATUS = {
    domain.InvalidReward: 422,
    domain.RewardNotFound: 404,
    domain.RewardNotAvailable: 409,
    domain.TierTooLow: 403,
    domain.CustomerLimitReached: 409,
    domain.IdempotencyKeyReused: 422,
    domain.RedemptionNotFound: 404,
    domain.CancellationNotAllowed: 409,
}


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


class ErrorOut(BaseModel):
    """Every refusal: a stable `error` code, a human `detail`, and context fields."""

    model_config = ConfigDict(extra="allow")

    error: str
    detail: str


def _responses(*statuses: int) -> dict[int | str, dict]:
    text = {400: "The body is not parseable (e.g. not UTF-8)", 401: "Missing or invalid credentials",
            403: "Not allowed for this customer (e.g. tier too low)", 404: "Not found (or not yours)",
            409: "Conflicts with the current state (limit reached, not available, not cancellable)",
            422: "Invalid request: field errors (`errors`) or a refused definition (`field`)",
            503: "The admin API is disabled (no REWARDS_ADMIN_API_KEY)"}
    return {status: {"model": ErrorOut, "description": text[status]} for status in statuses}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str, bytes: lambda b: b.decode("utf-8", "replace")})
        return JSONResponse({"error": "invalid_request", "detail": "the request does not match the API", "errors": errors},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "bad_request" if exc.status_code == 400 else "http_error",
                             "detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(domain.RewardsError)
    async def _domain_error(_: Request, exc: domain.RewardsError) -> JSONResponse:
        status = _STATUS.get(type(exc), 400)
        return JSONResponse({"error": exc.code, "detail": exc.message, **exc.details}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)


# ---- models ----------------------------------------------------------------------------------

RewardId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
RewardIdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
# PostgreSQL text cannot hold NUL, and control characters in names only hide things.
OneLine = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
FreeText = Annotated[str, Field(max_length=4000, pattern=r"^[^\x00]*$")]
TierName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
# int4 columns; a billion is far beyond any sane catalog and leaves room for +1 on restock.
Count = Annotated[int, Field(gt=0, le=1_000_000_000)]


class RewardIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reward_id: RewardId
    name: OneLine
    description: FreeText = ""
    cost_points: Count
    kind: domain.RewardKind
    voucher_value: Decimal | None = Field(default=None, gt=0, max_digits=14, decimal_places=2)
    voucher_currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    stock: int | None = Field(default=None, ge=0, le=1_000_000_000, description="Units available; null for unlimited")
    per_customer_limit: Count | None = None
    valid_from: AwareDatetime | None = None
    valid_until: AwareDatetime | None = None
    min_tier: TierName | None = None
    active: bool = True

    def to_domain(self) -> Reward:
        data = self.model_dump()
        data["stock_remaining"] = data.pop("stock")
        return Reward(**data)


class RewardPatch(BaseModel):
    """Fields to change; an explicit null clears (stock: null = unlimited)."""

    model_config = ConfigDict(extra="forbid")

    name: OneLine | None = None
    description: FreeText | None = None
    cost_points: Count | None = None
    voucher_value: Decimal | None = Field(default=None, gt=0, max_digits=14, decimal_places=2)
    voucher_currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    stock: int | None = Field(default=None, ge=0, le=1_000_000_000)
    per_customer_limit: Count | None = None
    valid_from: AwareDatetime | None = None
    valid_until: AwareDatetime | None = None
    min_tier: TierName | None = None
    active: bool | None = None

    def changes(self) -> dict:
        data = self.model_dump(exclude_unset=True)
        if "stock" in data:
            data["stock_remaining"] = data.pop("stock")
        for required in ("name", "description", "cost_points", "active"):
            if required in data and data[required] is None:
                raise domain.InvalidReward(f"{required} cannot be null", field=required)
        return data


class RewardOut(BaseModel):
    reward_id: str
    name: str
    description: str
    cost_points: int
    kind: str
    voucher_value: str | None
    voucher_currency: str | None
    stock: int | None
    coupons_available: int | None
    per_customer_limit: int | None
    valid_from: datetime | None
    valid_until: datetime | None
    min_tier: str | None
    active: bool

    @classmethod
    def of(cls, r: Reward) -> "RewardOut":
        return cls(
            reward_id=r.reward_id, name=r.name, description=r.description, cost_points=r.cost_points, kind=r.kind,
            voucher_value=format(r.voucher_value, "f") if r.voucher_value is not None else None,
            voucher_currency=r.voucher_currency, stock=r.stock_remaining,
            coupons_available=r.coupons_available if r.kind == "coupon" else None,
            per_customer_limit=r.per_customer_limit, valid_from=r.valid_from, valid_until=r.valid_until,
            min_tier=r.min_tier, active=r.active,
        )


class CatalogRewardOut(RewardOut):
    affordable_now: bool
    eligible: bool
    ineligible_reason: Literal["tier_too_low", "customer_limit_reached", "out_of_stock"] | None
    redeemed_count: int


class CatalogOut(BaseModel):
    customer_id: str
    available_points: int = Field(description="As last reported by the ledger; the ledger's hold decides")
    tier: str | None
    rewards: list[CatalogRewardOut]


class CouponUploadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    codes: list[Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\s\x00-\x1f\x7f]+$")]] = Field(
        min_length=1, max_length=50_000
    )


class CouponUploadOut(BaseModel):
    reward_id: str
    added: int
    already_in_pool: int
    coupons_available: int


class RedemptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reward_id: RewardId


class RedemptionOut(BaseModel):
    redemption_id: uuid.UUID
    reward_id: str
    status: domain.RedemptionStatus
    kind: str
    cost_points: int
    code: str | None = Field(description="The coupon or voucher code, once fulfilled")
    failure_reason: str | None
    ledger_status: str
    requested_at: datetime
    fulfilled_at: datetime | None
    finished_at: datetime | None
    status_url: str

    @classmethod
    def of(cls, r: Redemption) -> "RedemptionOut":
        return cls(
            redemption_id=r.redemption_id, reward_id=r.reward_id, status=r.status, kind=r.kind,
            cost_points=r.cost_points, code=r.code if r.status == "fulfilled" else None,
            failure_reason=r.failure_reason, ledger_status=r.ledger_status, requested_at=r.requested_at,
            fulfilled_at=r.fulfilled_at, finished_at=r.finished_at, status_url=f"/v1/redemptions/{r.redemption_id}",
        )


class RedemptionListOut(BaseModel):
    redemptions: list[RedemptionOut]
    next_before: datetime | None = Field(description="Pass as ?before= for the next page")


# ---- routers ---------------------------------------------------------------------------------


class CustomerBearer(HTTPBearer):
    """The customer a request acts for: the subject of its verified bearer token, else 401.
    The security scheme itself (documented as HTTPBearer) rather than a dependency on it:
    FastAPI solves every dependency of every request, so one level less is CPU saved on each."""

    def __init__(self, verifier: TokenVerifier) -> None:
        super().__init__(auto_error=False, scheme_name="HTTPBearer",
                         description="Customer JWT from the retailer's identity provider")
        self.verifier = verifier

    async def __call__(self, request: Request) -> str:  # type: ignore[override]
        credentials = await super().__call__(request)
        if credentials is None:
            metrics.AUTH_REFUSALS.labels("missing_token").inc()
            raise ApiError(401, "missing_token", "an Authorization: Bearer token is required",
                           headers={"WWW-Authenticate": "Bearer"})
        try:
            return self.verifier.customer_id(credentials.credentials)
        except InvalidToken as exc:
            metrics.AUTH_REFUSALS.labels(f"token_{exc.code}").inc()
            raise ApiError(401, "invalid_token", exc.reason,
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None



def create_routers(ctx: RewardsContext, verifier: TokenVerifier) -> list[APIRouter]:
    customer_bearer = CustomerBearer(verifier)

    async def admin(x_admin_key: Annotated[str | None, Header()] = None) -> None:
        expected = ctx.settings.admin_api_key
        if expected is None:
            raise ApiError(503, "admin_api_disabled", "REWARDS_ADMIN_API_KEY is not set")
        if x_admin_key is None or not hmac.compare_digest(x_admin_key.encode(), expected.get_secret_value().encode()):
            metrics.AUTH_REFUSALS.labels("missing_admin_key" if x_admin_key is None else "invalid_admin_key").inc()
            raise ApiError(401, "invalid_admin_key", "a valid X-Admin-Key header is required")

    Customer = Annotated[str, Depends(customer_bearer)]

    customer = APIRouter(prefix="/v1", tags=["customer"])

    @customer.get("/rewards", response_model=CatalogOut, summary="The rewards available to me",
                  responses=_responses(401))
    async def my_catalog(customer_id: Customer) -> CatalogOut:
        catalog = await service.catalog_for(ctx, customer_id)
        return CatalogOut(
            customer_id=customer_id, available_points=catalog.standing.available_points, tier=catalog.standing.tier,
            rewards=[
                CatalogRewardOut(**RewardOut.of(e.reward).model_dump(), affordable_now=e.affordable_now,
                                 eligible=e.eligible, ineligible_reason=e.ineligible_reason,
                                 redeemed_count=e.redeemed_count)
                for e in catalog.entries
            ],
        )

    @customer.post(
        "/redemptions",
        response_model=RedemptionOut,
        summary="Redeem a reward",
        responses={202: {"model": RedemptionOut, "description": "Still in progress after the wait: poll status_url"},
                   **_responses(400, 401, 403, 404, 409, 422)},
        description="Answers 200 with the outcome (fulfilled or failed) when the saga ends within "
        "REWARDS_SAGA_WAIT_MS, else 202 with the status URL. The same Idempotency-Key replayed returns the "
        "same redemption (never a second one).",
    )
    async def redeem(
        body: RedemptionIn,
        response: Response,
        customer_id: Customer,
        idempotency_key: Annotated[str, Header(min_length=1, max_length=200)],
        x_correlation_id: Annotated[str | None, Header(max_length=200)] = None,
    ) -> RedemptionOut:
        correlation_id = x_correlation_id or str(uuid.uuid4())
        shared_logging.correlation_id.set(correlation_id)
        result = await service.request_redemption(
            ctx, customer_id=customer_id, reward_id=body.reward_id, idempotency_key=idempotency_key,
            correlation_id=correlation_id,
        )
        redemption = await service.wait_for_outcome(ctx, result.redemption)
        out = RedemptionOut.of(redemption)
        response.status_code = 202 if redemption.status in domain.IN_FLIGHT else 200
        response.headers["Location"] = out.status_url
        if result.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return out

    @customer.get("/redemptions/{redemption_id}", response_model=RedemptionOut, summary="One of my redemptions",
                  responses=_responses(401, 404, 422))
    async def my_redemption(redemption_id: uuid.UUID, customer_id: Customer) -> RedemptionOut:
        return RedemptionOut.of(
            await service.get_customer_redemption(ctx, customer_id=customer_id, redemption_id=redemption_id)
        )

    @customer.get("/redemptions", response_model=RedemptionListOut, summary="My redemptions, newest first",
                  responses=_responses(401, 422))
    async def my_redemptions(
        customer_id: Customer,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        before: Annotated[AwareDatetime | None, Query()] = None,
    ) -> RedemptionListOut:
        rows = await service.list_customer_redemptions(ctx, customer_id=customer_id, before=before, limit=limit)
        return RedemptionListOut(
            redemptions=[RedemptionOut.of(r) for r in rows],
            next_before=rows[-1].requested_at if len(rows) == limit else None,
        )

    @customer.post("/redemptions/{redemption_id}/cancel", response_model=RedemptionOut,
                   summary="Cancel a fulfilled redemption within the window: the points are refunded",
                   responses=_responses(401, 404, 409, 422))
    async def cancel(redemption_id: uuid.UUID, customer_id: Customer) -> RedemptionOut:
        return RedemptionOut.of(
            await service.cancel_redemption(ctx, customer_id=customer_id, redemption_id=redemption_id)
        )

    admin_router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(admin)],
                             responses=_responses(401, 422, 503))

    @admin_router.post("/rewards", response_model=RewardOut, status_code=201, summary="Add a reward",
                       responses=_responses(400))
    async def create(body: RewardIn) -> RewardOut:
        return RewardOut.of(await service.create_reward(ctx, body.to_domain()))

    @admin_router.get("/rewards", response_model=list[RewardOut], summary="The whole catalog")
    async def catalog(active_only: bool = False) -> list[RewardOut]:
        return [RewardOut.of(r) for r in await service.list_rewards(ctx, active_only=active_only)]

    @admin_router.get("/rewards/{reward_id}", response_model=RewardOut, responses=_responses(404))
    async def one(reward_id: RewardIdPath) -> RewardOut:
        return RewardOut.of(await service.get_reward(ctx, reward_id))

    @admin_router.patch("/rewards/{reward_id}", response_model=RewardOut, summary="Change a reward",
                        responses=_responses(400, 404))
    async def patch(reward_id: RewardIdPath, body: RewardPatch) -> RewardOut:
        return RewardOut.of(await service.update_reward(ctx, reward_id, body.changes()))

    @admin_router.post("/rewards/{reward_id}/coupons", response_model=CouponUploadOut,
                       summary="Upload coupon codes to a coupon reward's pool (duplicates are skipped)",
                       responses=_responses(400, 404))
    async def upload(reward_id: RewardIdPath, body: CouponUploadIn) -> CouponUploadOut:
        codes = list(dict.fromkeys(body.codes))
        added, reward = await service.upload_coupon_codes(ctx, reward_id, codes)
        return CouponUploadOut(reward_id=reward_id, added=added, already_in_pool=len(body.codes) - added,
                               coupons_available=reward.coupons_available or 0)

    return [customer, admin_router]
