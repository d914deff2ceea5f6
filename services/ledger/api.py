"""HTTP API of the ledger: customers' balance and history, the rules simulator, and the
admin API (X-Admin-Key): the program (versioned) and manual adjustments."""

import json
import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import (
    APIRouter,
    Depends,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from services.ledger import domain as d
from services.ledger import metrics
from services.ledger import repository as repo
from services.ledger.adjustments import adjust_points
from services.ledger.program import Program
from services.ledger.queries import balance_of, simulate
from services.ledger.service import Ledger
from services.ledger.versions import (
    EffectiveInThePast,
    ProgramHistoryUnavailable,
    ProgramStore,
)
from shared.admin import AdminKeyRefused, admin_key_dependency
from shared.admin import check_admin_key as check_admin_key_against
from shared.auth import InvalidToken
from shared.events.purchases import PurchaseLine, PurchasePayload
from shared.limits import BodyLimit, ExplainedBodyRoute
from shared.runtime import ServiceRuntime

log = logging.getLogger(__name__)

# PostgreSQL text cannot hold NUL: refused at the door (422) rather than failing in the database.
NO_NUL = r"^[^\x00]*$"
CustomerId = Annotated[str, Field(min_length=1, max_length=128, pattern=NO_NUL)]
PathCustomerId = Annotated[str, Path(min_length=1, max_length=128, pattern=NO_NUL)]


class ErrorOut(BaseModel):
    detail: Any


# Answers every route may give besides its own, documented so that clients (and the OpenAPI
# fuzzing in tests/hostile) know them.
BODY_ERRORS = {413: {"model": ErrorOut, "description": "The body is larger than LEDGER_MAX_BODY_BYTES"}}
ADMIN_ERRORS = {401: {"model": ErrorOut, "description": "Missing or wrong X-Admin-Key header"},
                503: {"model": ErrorOut, "description": "The admin API is disabled (LEDGER_ADMIN_API_KEY unset)"}}

# A ledger that could not read its program history (ledger.programs) when it first loaded its
# program does not know which version is in force: what needs the program answers 503 with
# Retry-After until the topic can be read (a request tries again once that time has passed since
# the last failed read, none while a read is running; so do the consumers and the scheduler).
PROGRAM_RETRY_AFTER_S = int(ProgramStore.RETRY_AFTER_S)
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}
_PROGRAM_UNAVAILABLE = ("the program history (ledger.programs) cannot be read yet, so the program in force is "
                        "unknown (detail.reason program_history_unavailable, with Retry-After)")
PROGRAM_ERRORS = {503: {"model": ErrorOut, "headers": _RETRY_AFTER,
                        "description": f"Not available now: {_PROGRAM_UNAVAILABLE}"}}
ADMIN_PROGRAM_ERRORS = {**ADMIN_ERRORS, 503: {"model": ErrorOut, "headers": _RETRY_AFTER, "description": (
    f"The admin API is disabled (LEDGER_ADMIN_API_KEY unset), or {_PROGRAM_UNAVAILABLE}")}}


class BalanceOut(BaseModel):
    customer_id: str
    available_points: int
    pending_points: int
    held_points: int
    debt_points: int
    tier: str
    qualifying_points: int
    next_expiry_at: datetime | None = Field(description="When the next points expire, if any")
    next_expiry_points: int


class TransactionOut(BaseModel):
    seq: int
    transfer_id: uuid.UUID
    code: str = Field(description="Why: earn, mature, reverse, debt, debt_payoff, hold, post, void, refund, expire, adjust")
    amount_points: int
    debit_account: str
    credit_account: str
    phase: str
    ref: str = Field(description="The purchase, return, redemption, lot or adjustment that caused it")
    rule_version: int | None
    breakdown: list[dict[str, Any]] | None = Field(None, description="For earn credits: the rule that earned what")
    purchase_id: str | None = Field(None, description="For postings on one purchase's lot (earn, mature, "
                                                      "reverse, debt, expire): the purchase")
    channel: Literal["pos", "eshop"] | None = Field(None, description="The purchase's channel (ids are unique per "
                                                                      "channel); null for purchases recorded before "
                                                                      "channels were kept")
    reason_code: str | None = None
    actor: str | None = None
    occurred_at: datetime | None
    recorded_at: datetime


class TransactionsPage(BaseModel):
    items: list[TransactionOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for older transactions; null at the end")


class AdjustmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adjustment_id: uuid.UUID | None = Field(None, description="Idempotency key: the same id never adjusts twice")
    customer_id: CustomerId
    amount_points: int = Field(ge=-d.MAX_POINTS_PER_POSTING, le=d.MAX_POINTS_PER_POSTING,
                               description="Positive credits, negative debits; never 0")
    # opening_balance: points brought over from an old system with a history import; its
    # PointsAdjusted says history=true and its lot is never reminded of.
    reason_code: Literal["goodwill", "correction", "service_recovery", "fraud", "migration", "opening_balance",
                         "other"]
    actor: str = Field(min_length=1, max_length=200, pattern=NO_NUL, description="Who made the adjustment (audited)")
    note: str | None = Field(None, max_length=2000, pattern=NO_NUL)


class AdjustmentOut(BaseModel):
    adjustment_id: uuid.UUID
    customer_id: str
    amount_points: int
    reason_code: str
    actor: str
    note: str | None
    created: bool
    balance: dict[str, Any] | None


class SimulatedPurchase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["pos", "eshop"] = "pos"
    occurred_at: datetime | None = None
    currency: str = Field(min_length=3, max_length=3)
    lines: list[PurchaseLine] = Field(min_length=1)


class SimulateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    purchase: SimulatedPurchase
    customer_id: CustomerId | None = Field(None, description="Use this customer's tier, first purchase and daily cap")
    tier: str | None = Field(None, max_length=100, description="Simulate for this tier instead")
    first_purchase: bool | None = None


class SimulateOut(BaseModel):
    rule_version: int
    points: int
    exact_points: str
    tier: str
    tier_multiplier: str
    bonus_points: int
    capped_points: int
    pending: bool
    matures_at: datetime
    expires_at: datetime
    breakdown: list[dict[str, Any]]
    stacking_order: list[str]


class ProgramOut(BaseModel):
    version: int = Field(description="GET: the version in force now. PUT: the version just saved")
    effective_from: datetime = Field(description="When that version takes (or took) effect: it governs every input "
                                                 "recorded from then on, until a version effective later")
    program: Program
    versions: list[dict[str, Any]]


def _balance_json(b: d.Balance) -> dict[str, Any]:
    return {"available_points": b.available_points, "pending_points": b.pending_points, "held_points": b.held_points,
            "debt_points": b.debt_points, "tier": b.tier, "qualifying_points": b.qualifying_points}


def _has_nul(value: Any) -> bool:
    # A loop, not recursion: an admin body nested a few hundred levels deep is valid JSON
    # and would otherwise end in RecursionError (a 500).
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _kind(account_id: str) -> str:
    return account_id.rsplit(":", 1)[-1]


def _body_too_large(max_bytes: int) -> dict[str, Any]:
    return {"detail": f"the body is larger than {max_bytes} bytes"}


def body_limit(max_bytes: int) -> BodyLimit:
    return BodyLimit(max_bytes, refusal=_body_too_large, on_refused=metrics.HTTP_REFUSALS.labels("body_too_large").inc)


def program_history_unavailable(exc: ProgramHistoryUnavailable) -> JSONResponse:
    """503, counted: the program is not loaded because ledger.programs cannot be read (the
    cause is logged, not told to the caller: the simulator is public)."""
    metrics.HTTP_REFUSALS.labels("program_history_unavailable").inc()
    log.warning("request refused: the program is not loaded (%s)", exc)
    detail = {"reason": "program_history_unavailable",
              "msg": "the ledger cannot read its program history (ledger.programs) yet, so it does not know which "
                     "program is in force; retry later"}
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(PROGRAM_RETRY_AFTER_S)})


class LedgerRoute(ExplainedBodyRoute):
    """Every refused request body counted: one FastAPI cannot decode (not UTF-8, nested too
    deep: 422 in FastAPI's validation shape) and one that does not match the schema. A
    request that needs the program while it cannot be loaded: 503 (program_history_unavailable)."""

    def refuse_unreadable(self, request: Request, error_type: str, message: str) -> Response:
        metrics.HTTP_REFUSALS.labels("malformed_body").inc()
        return super().refuse_unreadable(request, error_type, message)

    def get_route_handler(self) -> Callable[[Request], Any]:
        handle = super().get_route_handler()

        async def handle_counted(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError:
                metrics.HTTP_REFUSALS.labels("invalid_request").inc()
                raise
            except ProgramHistoryUnavailable as exc:
                return program_history_unavailable(exc)

        return handle_counted


def create_router(runtime: ServiceRuntime, ledger: Ledger) -> APIRouter:
    router = APIRouter(route_class=LedgerRoute)

    async def connection() -> Any:
        async with runtime.pool.acquire() as conn:
            yield conn

    Conn = Annotated[asyncpg.Connection, Depends(connection)]

    def admin_refused(refused: AdminKeyRefused) -> Exception:
        metrics.HTTP_REFUSALS.labels(refused.reason).inc()
        if refused.status == 503:
            return HTTPException(503, detail=refused.msg)
        return HTTPException(401, detail="missing or wrong X-Admin-Key header")

    admin = admin_key_dependency(lambda: ledger.settings.admin_api_key, setting="LEDGER_ADMIN_API_KEY",
                                 refusal=admin_refused)

    def check_admin_key(x_admin_key: str) -> None:
        """A given X-Admin-Key (a customer read's other credential) must be the configured
        one: 401, counted, otherwise; also when none is configured."""
        try:
            check_admin_key_against(x_admin_key, ledger.settings.admin_api_key, setting="LEDGER_ADMIN_API_KEY")
        except AdminKeyRefused:
            metrics.HTTP_REFUSALS.labels("invalid_admin_key").inc()
            raise HTTPException(401, detail="missing or wrong X-Admin-Key header") from None

    verifier = ledger.settings.token_verifier() if ledger.settings.jwt_configured() else None

    async def reader(customer_id: PathCustomerId, x_admin_key: Annotated[str | None, Header()] = None,
                     authorization: Annotated[str | None, Header()] = None) -> None:
        """A customer's points are read by that customer (their bearer token, whose subject
        must be the customer in the path) or by the back office (X-Admin-Key)."""
        await speaks_for(customer_id, x_admin_key, authorization)

    async def credentials(x_admin_key: Annotated[str | None, Header()] = None,
                          authorization: Annotated[str | None, Header()] = None) -> tuple[str | None, str | None]:
        return x_admin_key, authorization

    async def speaks_for(customer_id: str | None, x_admin_key: str | None, authorization: str | None) -> None:
        """The admin key, or a customer's own token (for `customer_id` itself, when one is named)."""
        if x_admin_key is not None:
            return check_admin_key(x_admin_key)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            metrics.HTTP_REFUSALS.labels("missing_credentials").inc()
            raise HTTPException(401, detail="a bearer token for this customer (or X-Admin-Key) is required",
                                headers={"WWW-Authenticate": "Bearer"})
        if verifier is None:
            metrics.HTTP_REFUSALS.labels("customer_tokens_disabled").inc()
            raise HTTPException(401, detail="customer tokens are not accepted here: LEDGER_JWT_* is not configured",
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            subject = verifier.customer_id(token.strip())
        except InvalidToken as exc:
            metrics.HTTP_REFUSALS.labels("invalid_token").inc()
            raise HTTPException(401, detail=exc.reason, headers={"WWW-Authenticate": "Bearer"}) from None
        if customer_id is not None and subject != customer_id:
            metrics.HTTP_REFUSALS.labels("other_customer").inc()
            raise HTTPException(403, detail="a customer token reads only its own customer's points")

    READ_ERRORS = {401: {"model": ErrorOut, "description": "No credentials, or a token or admin key not accepted"},
                   403: {"model": ErrorOut, "description": "The token is another customer's"}}

    @router.get("/v1/customers/{customer_id}/balance", response_model=BalanceOut, tags=["customers"],
                summary="Available, pending, held, debt, tier, qualifying points and the next expiry",
                dependencies=[Depends(reader)],
                responses={404: {"description": "The ledger has no account for this customer"}, **READ_ERRORS})
    async def get_balance(customer_id: PathCustomerId, conn: Conn) -> BalanceOut:
        view = await balance_of(conn, ledger, customer_id)
        if view is None:
            raise HTTPException(404, detail=f"no points account for customer {customer_id}")
        return BalanceOut(customer_id=customer_id, **_balance_json(view.balance), next_expiry_at=view.next_expiry_at,
                          next_expiry_points=view.next_expiry_points)

    @router.get("/v1/customers/{customer_id}/transactions", response_model=TransactionsPage, tags=["customers"],
                summary="The customer's transfers, newest first, with the rule that earned each credit",
                dependencies=[Depends(reader)], responses=READ_ERRORS)
    async def get_transactions(
        customer_id: PathCustomerId, conn: Conn, limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(pattern=r"^\d{1,18}$", description="next_cursor of the previous page")] = None,
    ) -> TransactionsPage:
        rows = await repo.transfers_of(conn, customer_id=customer_id, before_seq=int(cursor) if cursor else None,
                                       limit=limit + 1)
        items = [TransactionOut(
            seq=r["seq"], transfer_id=r["transfer_id"], code=r["code"], amount_points=r["amount_points"],
            debit_account=_kind(r["debit_account_id"]), credit_account=_kind(r["credit_account_id"]),
            phase=r["phase"], ref=r["ref"], rule_version=r["rule_version"],
            breakdown=repo_json(r["breakdown"]), purchase_id=r["purchase_id"], channel=r["purchase_source"],
            reason_code=r["reason_code"], actor=r["actor"],
            occurred_at=r["occurred_at"], recorded_at=r["created_at"],
        ) for r in rows[:limit]]
        return TransactionsPage(items=items, next_cursor=str(items[-1].seq) if len(rows) > limit else None)

    @router.post("/v1/rules/simulate", response_model=SimulateOut, tags=["rules"],
                 summary="What a purchase would earn now, and why, rule by rule",
                 description="For the back office (X-Admin-Key) or a customer (their own bearer token; with "
                             "customer_id, only their own): the answer reveals the customer's tier, first-purchase "
                             "state and earnings of the day.",
                 responses={**BODY_ERRORS, **PROGRAM_ERRORS, **READ_ERRORS,
                            422: {"description": "Invalid purchase, or a currency the program has no rate for"}})
    async def post_simulate(body: SimulateIn, conn: Conn,
                            given: Annotated[tuple[str | None, str | None], Depends(credentials)]) -> SimulateOut:
        await speaks_for(body.customer_id, *given)
        await ledger.programs.ensure_loaded(conn, wait=False)
        if body.tier is not None and body.tier not in {t.name for t in ledger.programs.in_force().program.tiers}:
            raise HTTPException(422, detail=f"unknown tier {body.tier!r}")
        p = body.purchase
        occurred_at = p.occurred_at or ledger.clock()
        purchase = PurchasePayload(
            purchase_id="simulation", type="sale", source=p.source, store_id="simulation", occurred_at=occurred_at,
            currency=p.currency.upper(), lines=p.lines, total=sum((x.net_amount for x in p.lines), Decimal(0)),
            door="simulation",
        )
        try:
            sim = await simulate(conn, ledger, purchase=purchase, customer_id=body.customer_id, tier=body.tier,
                                 first_purchase=body.first_purchase)
        except d.UnknownCurrency as exc:
            raise HTTPException(422, detail={"reason": exc.reason, "msg": str(exc)}) from exc
        e = sim.earning
        return SimulateOut(
            rule_version=sim.rule_version, points=e.points, exact_points=format(e.exact_points.normalize(), "f"),
            tier=e.tier, tier_multiplier=str(e.tier_multiplier), bonus_points=e.bonus_points,
            capped_points=e.capped_points, pending=sim.pending, matures_at=sim.matures_at, expires_at=sim.expires_at,
            breakdown=e.breakdown, stacking_order=list(sim.stacking_order),
        )

    @router.get("/v1/admin/program", response_model=ProgramOut, tags=["admin"], dependencies=[Depends(admin)],
                summary="The program in force, and every version", responses=ADMIN_PROGRAM_ERRORS)
    async def get_program(conn: Conn) -> ProgramOut:
        await ledger.programs.ensure_loaded(conn, wait=False)
        await ledger.programs.refresh(conn)
        rules = ledger.programs.in_force()
        versions = [dict(r) for r in await repo.program_versions(conn)]
        return ProgramOut(version=rules.version, effective_from=rules.effective_from, program=rules.program,
                          versions=versions)

    @router.put("/v1/admin/program", response_model=ProgramOut, tags=["admin"], dependencies=[Depends(admin)],
                summary="Replace the program: stored as a new version, in force for inputs recorded from its "
                        "effective time (now, or a later effective_from) on",
                description="Each version is also published to ledger.programs, so that a ledger rebuilt from "
                            "its topics earns every purchase under the version it earned under originally. "
                            "effective_from (ISO 8601 with a time zone) schedules a change; it cannot be in the "
                            "past (what was already earned is never recomputed).",
                responses={**ADMIN_PROGRAM_ERRORS, **BODY_ERRORS,
                           422: {"model": ErrorOut, "description": "Invalid program, or effective_from in the past"}})
    async def put_program(body: dict[str, Any], conn: Conn,
                          x_actor: Annotated[str | None, Header(max_length=200)] = None,
                          effective_from: Annotated[AwareDatetime | None, Query()] = None) -> ProgramOut:
        if _has_nul(body):
            raise HTTPException(422, detail="the program contains a NUL character")
        try:
            program = Program.model_validate(body)
        except ValidationError as exc:
            raise HTTPException(422, detail=exc.errors(include_url=False, include_context=False)) from exc
        await ledger.programs.ensure_loaded(conn, wait=False)
        try:
            saved = await ledger.programs.replace(conn, program, actor=x_actor or "admin",
                                                  effective_from=effective_from)
        except EffectiveInThePast as exc:
            raise HTTPException(422, detail={"reason": "effective_from_in_the_past", "msg": str(exc)}) from exc
        runtime.relay.wake()
        versions = [dict(r) for r in await repo.program_versions(conn)]
        return ProgramOut(version=saved.version, effective_from=saved.effective_from, program=program,
                          versions=versions)

    @router.post("/v1/admin/adjustments", response_model=AdjustmentOut, status_code=201, tags=["admin"],
                 dependencies=[Depends(admin)], summary="Credit or debit a customer by hand, with a reason (audited)",
                 description="Applied at once (the answer carries the balance after it) and, in the same "
                             "transaction, written to ledger.adjustments as AdjustmentRecorded, so that a ledger "
                             "rebuilt from its topics keeps it. A refused adjustment is not written.",
                 responses={**ADMIN_PROGRAM_ERRORS, **BODY_ERRORS,
                            200: {"description": "This adjustment_id was already applied; nothing changed"},
                            409: {"description": "A debit larger than the available points, or an adjustment_id "
                                                 "already applied with other fields (adjustment_id_reused)"},
                            422: {"description": "Invalid adjustment (e.g. 0 points)"}})
    async def post_adjustment(body: AdjustmentIn, conn: Conn, response: Response) -> AdjustmentOut:
        adjustment_id = body.adjustment_id or uuid.uuid4()
        try:
            outcome = await adjust_points(conn, ledger, adjustment_id=adjustment_id, customer_id=body.customer_id,
                                          amount_points=body.amount_points, reason_code=body.reason_code,
                                          actor=body.actor, note=body.note)
        except (d.InsufficientPoints, d.AdjustmentIdReused) as exc:
            raise HTTPException(409, detail={"reason": exc.reason, "msg": str(exc)}) from exc
        except d.InvalidAmount as exc:
            raise HTTPException(422, detail={"reason": exc.reason, "msg": str(exc)}) from exc
        runtime.relay.wake()
        if not outcome.created:
            response.status_code = 200
        return AdjustmentOut(
            adjustment_id=outcome.adjustment_id, customer_id=outcome.customer_id, amount_points=outcome.amount_points,
            reason_code=outcome.reason_code, actor=outcome.actor, note=outcome.note, created=outcome.created,
            balance=_balance_json(outcome.balance) if outcome.balance else None,
        )

    return router


def repo_json(value: Any) -> Any:
    if value is None:
        return None
    return json.loads(value) if isinstance(value, (str, bytes)) else value



