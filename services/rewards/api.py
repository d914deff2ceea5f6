"""HTTP API of the rewards service: the customer API (JWT bearer; the customer is the
token's subject) and the admin API for the catalog (X-Admin-Key)."""

import base64
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Literal

import pycountry
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.rewards import catalog as rewards_catalog
from services.rewards import domain, metrics, redemptions, shipping
from services.rewards.domain import Redemption, Reward
from services.rewards.service import RewardsContext
from services.rewards.token import InvalidToken, TokenVerifier
from shared import logging as shared_logging
from shared.admin import AdminKeyRefused, admin_key_dependency

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
    domain.AlreadyShipped: 409,
    domain.ShipmentNotAllowed: 409,
    domain.InvalidShipment: 422,
    domain.DeliveryAddressNotAllowed: 422,
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
            409: "Conflicts with the current state (limit reached, not available, not cancellable, already shipped, "
                 "not shippable)",
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


_COUNTRIES = frozenset(c.alpha_2 for c in pycountry.countries)


class DeliveryAddress(BaseModel):
    """Where a physical reward is sent. Kept by the rewards service only: never put on a topic."""

    model_config = ConfigDict(extra="forbid")

    recipient: OneLine
    line1: OneLine
    line2: OneLine | None = None
    city: OneLine
    postal_code: Annotated[str, Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9][A-Za-z0-9 -]*$")]
    region: OneLine | None = None
    country: str = Field(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2")
    phone: str | None = Field(default=None, pattern=r"^\+?[0-9][0-9 ()-]{3,29}$")

    @field_validator("country")
    @classmethod
    def _known_country(cls, country: str) -> str:
        if country not in _COUNTRIES:
            raise ValueError(f"{country} is not an ISO 3166-1 alpha-2 country code")
        return country


class RedemptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reward_id: RewardId
    delivery_address: DeliveryAddress | None = Field(
        default=None, description="Physical rewards only (422 for a coupon or voucher); optional"
    )


class ShipmentOut(BaseModel):
    state: domain.ShipmentState
    carrier: str | None
    tracking_number: str | None
    tracking_url: str | None
    shipped_at: datetime | None
    delivered_at: datetime | None

    @classmethod
    def of(cls, r: Redemption) -> "ShipmentOut | None":
        state = domain.shipment_state(r)
        if state is None:
            return None
        return cls(state=state, carrier=r.carrier, tracking_number=r.tracking_number, tracking_url=r.tracking_url,
                   shipped_at=r.shipped_at, delivered_at=r.delivered_at)


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
    delivery_address: DeliveryAddress | None
    shipment: ShipmentOut | None = Field(
        description="Physical rewards once fulfilled: awaiting_shipment, then shipped (carrier, tracking), "
        "then delivered; null for coupons, vouchers and physical rewards not (or no longer) given"
    )

    @classmethod
    def of(cls, r: Redemption) -> "RedemptionOut":
        return cls(**cls._fields(r))

    @staticmethod
    def _fields(r: Redemption) -> dict:
        return dict(
            redemption_id=r.redemption_id, reward_id=r.reward_id, status=r.status, kind=r.kind,
            cost_points=r.cost_points, code=r.code if r.status == "fulfilled" else None,
            failure_reason=r.failure_reason, ledger_status=r.ledger_status, requested_at=r.requested_at,
            fulfilled_at=r.fulfilled_at, finished_at=r.finished_at, status_url=f"/v1/redemptions/{r.redemption_id}",
            delivery_address=r.delivery_address, shipment=ShipmentOut.of(r),
        )


_NEXT_CURSOR = "Pass as ?cursor= for the next (older) page; null on the last page"
_NEXT_BEFORE = ("Deprecated: use next_cursor. Pass as ?before= for the next page; set (with next_cursor) on pages "
                "requested without `cursor`, null otherwise and on the last page")


class RedemptionListOut(BaseModel):
    redemptions: list[RedemptionOut] = Field(description="Newest first (requested_at, then redemption_id)")
    next_cursor: str | None = Field(description=_NEXT_CURSOR)
    next_before: datetime | None = Field(description=_NEXT_BEFORE, json_schema_extra={"deprecated": True})


class AdminRedemptionOut(RedemptionOut):
    """A redemption as support and the warehouse see it: the customer and who shipped it."""

    customer_id: str
    correlation_id: str
    shipped_by: str | None
    delivered_by: str | None

    @classmethod
    def of(cls, r: Redemption) -> "AdminRedemptionOut":
        return cls(**cls._fields(r), customer_id=r.customer_id, correlation_id=r.correlation_id,
                   shipped_by=r.shipped_by, delivered_by=r.delivered_by)


class AdminRedemptionListOut(BaseModel):
    redemptions: list[AdminRedemptionOut] = Field(description="Newest first (requested_at, then redemption_id)")
    next_cursor: str | None = Field(description=_NEXT_CURSOR)
    next_before: datetime | None = Field(description=_NEXT_BEFORE, json_schema_extra={"deprecated": True})


class FulfilmentOut(AdminRedemptionOut):
    reward_name: str


class FulfilmentQueueOut(BaseModel):
    state: domain.ShipmentState
    fulfilments: list[FulfilmentOut] = Field(description="Oldest fulfilment first")
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page")


Actor = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$",
                             description="Who did it (a back-office user or system), kept for audit")]


class ShipmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    carrier: OneLine
    tracking_number: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^\s\x00-\x1f\x7f]+$")] | None = None
    tracking_url: Annotated[str, Field(max_length=2000, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$")] | None = None
    shipped_at: AwareDatetime | None = Field(default=None, description="Default: now")
    actor: Actor

    def to_domain(self) -> domain.Shipment:
        return domain.Shipment(carrier=self.carrier, tracking_number=self.tracking_number,
                               tracking_url=self.tracking_url, shipped_at=self.shipped_at, actor=self.actor)


class DeliveryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delivered_at: AwareDatetime | None = Field(default=None, description="Default: now")
    actor: Actor


# Opaque page cursors: the keyset (a time, a redemption id) of a page's last entry, where the
# next page starts (the fulfilment queue: fulfilled_at; redemption lists: requested_at).
def _cursor(at: datetime, redemption_id: uuid.UUID) -> str:
    raw = f"{at.isoformat()}|{redemption_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _parse_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, rid = raw.split("|")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive")
        return when.astimezone(timezone.utc), uuid.UUID(rid)
    except (ValueError, OverflowError):  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise ApiError(422, "invalid_cursor", "cursor is not one this API returned: pass the previous page's "
                       "next_cursor unchanged, or no cursor for the first page") from None


def _queue_cursor(r: Redemption) -> str:
    assert r.fulfilled_at is not None
    return _cursor(r.fulfilled_at, r.redemption_id)


def _list_start(cursor: str | None, before: datetime | None) -> tuple[tuple[datetime, uuid.UUID] | None, bool]:
    """Where a redemption list page starts (the keyset after which it reads), and whether it
    must end on a whole requested_at (pages not asked for with a cursor: their next_before is
    then exact). `before` is the keyset (before, the nil uuid): requested_at < before, as it
    always was; the page ending on a whole requested_at is what makes it skip nothing."""
    if cursor is not None and before is not None:
        raise ApiError(422, "invalid_request", "cursor and before cannot be combined: pass only cursor "
                       "(before is deprecated)")
    if cursor is not None:
        return _parse_cursor(cursor), False
    if before is None:
        return None, True
    try:
        return (before.astimezone(timezone.utc), uuid.UUID(int=0)), True
    except OverflowError:
        raise ApiError(422, "invalid_request", "before is out of range") from None


_LIST_DESCRIPTION = (
    "Newest first: by requested_at, then redemption_id (several redemptions can share a requested_at). "
    "Page with `cursor`: pass the previous page's `next_cursor` (opaque; null on the last page; anything "
    "else is 422 `invalid_cursor`); a page holds at most `limit` redemptions. `before` (deprecated, for "
    "existing clients: `next_before` of the previous page) keeps its meaning, requested_at < before; a "
    "page asked for without `cursor` ends on a whole requested_at, so it may hold more than `limit` "
    "redemptions when several share its last requested_at, and paging with `next_before` skips none. "
    "`cursor` and `before` together are 422."
)


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

    def admin_refused(refused: AdminKeyRefused) -> Exception:
        # This API's own bodies: one 401 for a missing or a wrong key (counted apart).
        if refused.status == 503:
            return ApiError(503, "admin_api_disabled", "REWARDS_ADMIN_API_KEY is not set")
        metrics.AUTH_REFUSALS.labels(refused.reason).inc()
        return ApiError(401, "invalid_admin_key", "a valid X-Admin-Key header is required")

    admin = admin_key_dependency(lambda: ctx.settings.admin_api_key, setting="REWARDS_ADMIN_API_KEY",
                                 refusal=admin_refused)

    Customer = Annotated[str, Depends(customer_bearer)]

    customer = APIRouter(prefix="/v1", tags=["customer"])

    @customer.get("/rewards", response_model=CatalogOut, summary="The rewards available to me",
                  responses=_responses(401))
    async def my_catalog(customer_id: Customer) -> CatalogOut:
        catalog = await rewards_catalog.catalog_for(ctx, customer_id)
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
        result = await redemptions.request_redemption(
            ctx, customer_id=customer_id, reward_id=body.reward_id, idempotency_key=idempotency_key,
            correlation_id=correlation_id,
            delivery_address=body.delivery_address.model_dump(exclude_none=True) if body.delivery_address else None,
        )
        redemption = await redemptions.wait_for_outcome(ctx, result.redemption)
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
            await redemptions.get_customer_redemption(ctx, customer_id=customer_id, redemption_id=redemption_id)
        )

    async def redemption_page(customer_id: str, limit: int, cursor: str | None, before: datetime | None):
        """One page of a customer's redemptions, its next_cursor and its next_before."""
        after, whole_requested_at = _list_start(cursor, before)
        page = await redemptions.list_customer_redemptions(ctx, customer_id=customer_id, after=after, limit=limit,
                                                       whole_requested_at=whole_requested_at)
        if not page.more:
            return page.redemptions, None, None
        last = page.redemptions[-1]
        return (page.redemptions, _cursor(last.requested_at, last.redemption_id),
                last.requested_at if whole_requested_at else None)

    ListLimit = Annotated[int, Query(ge=1, le=200, description="Page size. Without `cursor`, a page also takes "
                                     "the rest of its last requested_at's redemptions")]
    ListCursor = Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")]
    ListBefore = Annotated[AwareDatetime | None, Query(
        deprecated=True, description="Deprecated: use cursor. next_before of the previous page: redemptions "
        "requested before this time")]

    @customer.get("/redemptions", response_model=RedemptionListOut, summary="My redemptions, newest first",
                  description=_LIST_DESCRIPTION, responses=_responses(401, 422))
    async def my_redemptions(
        customer_id: Customer,
        limit: ListLimit = 50,
        cursor: ListCursor = None,
        before: ListBefore = None,
    ) -> RedemptionListOut:
        rows, next_cursor, next_before = await redemption_page(customer_id, limit, cursor, before)
        return RedemptionListOut(redemptions=[RedemptionOut.of(r) for r in rows], next_cursor=next_cursor,
                                 next_before=next_before)

    @customer.post("/redemptions/{redemption_id}/cancel", response_model=RedemptionOut,
                   summary="Cancel a fulfilled redemption within the window: the points are refunded",
                   description="Refused with 409 `already_shipped` once a physical reward has been shipped, "
                   "and 409 `cancellation_not_allowed` after the window or while in flight.",
                   responses=_responses(401, 404, 409, 422))
    async def cancel(redemption_id: uuid.UUID, customer_id: Customer) -> RedemptionOut:
        return RedemptionOut.of(
            await redemptions.cancel_redemption(ctx, customer_id=customer_id, redemption_id=redemption_id)
        )

    admin_router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(admin)],
                             responses=_responses(401, 422, 503))

    @admin_router.post("/rewards", response_model=RewardOut, status_code=201, summary="Add a reward",
                       responses=_responses(400))
    async def create(body: RewardIn) -> RewardOut:
        return RewardOut.of(await rewards_catalog.create_reward(ctx, body.to_domain()))

    @admin_router.get("/rewards", response_model=list[RewardOut], summary="The whole catalog")
    async def catalog(active_only: bool = False) -> list[RewardOut]:
        return [RewardOut.of(r) for r in await rewards_catalog.list_rewards(ctx, active_only=active_only)]

    @admin_router.get("/rewards/{reward_id}", response_model=RewardOut, responses=_responses(404))
    async def one(reward_id: RewardIdPath) -> RewardOut:
        return RewardOut.of(await rewards_catalog.get_reward(ctx, reward_id))

    @admin_router.patch("/rewards/{reward_id}", response_model=RewardOut, summary="Change a reward",
                        responses=_responses(400, 404))
    async def patch(reward_id: RewardIdPath, body: RewardPatch) -> RewardOut:
        return RewardOut.of(await rewards_catalog.update_reward(ctx, reward_id, body.changes()))

    @admin_router.post("/rewards/{reward_id}/coupons", response_model=CouponUploadOut,
                       summary="Upload coupon codes to a coupon reward's pool (duplicates are skipped)",
                       responses=_responses(400, 404))
    async def upload(reward_id: RewardIdPath, body: CouponUploadIn) -> CouponUploadOut:
        codes = list(dict.fromkeys(body.codes))
        added, reward = await rewards_catalog.upload_coupon_codes(ctx, reward_id, codes)
        return CouponUploadOut(reward_id=reward_id, added=added, already_in_pool=len(body.codes) - added,
                               coupons_available=reward.coupons_available or 0)

    # ---- fulfilment of physical rewards, and support ------------------------------------------

    @admin_router.get("/fulfilments", response_model=FulfilmentQueueOut,
                      summary="The fulfilment queue: physical rewards by shipment state, oldest fulfilment first")
    async def fulfilments(
        state: domain.ShipmentState = "awaiting_shipment",
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
    ) -> FulfilmentQueueOut:
        after = _parse_cursor(cursor) if cursor is not None else None
        entries = await shipping.shipment_queue(ctx, state=state, after=after, limit=limit + 1)
        more, entries = len(entries) > limit, entries[:limit]  # one more read: no empty last page
        return FulfilmentQueueOut(
            state=state,
            fulfilments=[FulfilmentOut(**AdminRedemptionOut.of(e.redemption).model_dump(), reward_name=e.reward_name)
                         for e in entries],
            next_cursor=_queue_cursor(entries[-1].redemption) if more else None,
        )

    @admin_router.post(
        "/redemptions/{redemption_id}/ship", response_model=AdminRedemptionOut, responses=_responses(400, 404, 409),
        summary="Record that a physical reward was handed to a carrier: emits RedemptionShipped",
        description="Idempotent: the same shipment again (carrier, tracking number and URL, and shipped_at if "
        "given) answers 200 with the redemption as it is. 409 `already_shipped` for a different shipment of a "
        "shipped redemption; 409 `shipment_not_allowed` (reason `not_physical` or `not_fulfilled`) for a "
        "redemption that is not a fulfilled physical reward.",
    )
    async def ship(redemption_id: uuid.UUID, body: ShipmentIn) -> AdminRedemptionOut:
        result = await shipping.ship_redemption(ctx, redemption_id=redemption_id, shipment=body.to_domain())
        return AdminRedemptionOut.of(result.redemption)

    @admin_router.post(
        "/redemptions/{redemption_id}/deliver", response_model=AdminRedemptionOut, responses=_responses(400, 404, 409),
        summary="Record that a shipped physical reward was delivered: emits RedemptionDelivered",
        description="Idempotent: a delivered redemption answers 200 as it is. 409 `shipment_not_allowed` "
        "(reason `not_shipped`, `not_physical`, `not_fulfilled`) otherwise.",
    )
    async def deliver(redemption_id: uuid.UUID, body: DeliveryIn) -> AdminRedemptionOut:
        result = await shipping.deliver_redemption(ctx, redemption_id=redemption_id, delivered_at=body.delivered_at,
                                                  actor=body.actor)
        return AdminRedemptionOut.of(result.redemption)

    @admin_router.get("/redemptions", response_model=AdminRedemptionListOut,
                      summary="A customer's redemptions, newest first (support)", description=_LIST_DESCRIPTION)
    async def customer_redemptions(
        customer_id: Annotated[str, Query(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")],
        limit: ListLimit = 50,
        cursor: ListCursor = None,
        before: ListBefore = None,
    ) -> AdminRedemptionListOut:
        rows, next_cursor, next_before = await redemption_page(customer_id, limit, cursor, before)
        return AdminRedemptionListOut(redemptions=[AdminRedemptionOut.of(r) for r in rows], next_cursor=next_cursor,
                                      next_before=next_before)

    @admin_router.get("/redemptions/{redemption_id}", response_model=AdminRedemptionOut,
                      responses=_responses(404), summary="One redemption, whoever's it is (support)")
    async def any_redemption(redemption_id: uuid.UUID) -> AdminRedemptionOut:
        return AdminRedemptionOut.of(await shipping.get_redemption(ctx, redemption_id=redemption_id))

    return [customer, admin_router]
