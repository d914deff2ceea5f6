"""Engagement's HTTP API: contact data and consent (admin or back-end key), erasure, the
journeys (admin), follow-ups and figures (staff: admin key), and the customer pages behind
the signed links in messages (survey, unsubscribe, remark or complaint)."""

import hmac
import uuid
from datetime import timedelta
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, Form, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.engagement import feedback, pages, tokens
from services.engagement import repository as repo
from services.engagement import service as svc
from services.engagement.channels import language
from services.engagement.responses import (
    ADMIN_ERRORS,
    BACKEND_ERRORS,
    BODY_ERRORS,
    TIME,
    ContactOut,
    ErasedOut,
    OpenedOut,
    VersionOut,
    page_answers,
    query_time,
    refusals,
)
from services.engagement.service import Engagement
from shared.admin import ADMIN_REFUSALS, admin_key_dependency
from shared.db import transaction
from shared.limits import ExplainedBodyRoute
from shared.outbox import enqueue
from shared.runtime import ServiceRuntime

CustomerId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]


class ConsentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: bool | None = None
    sms: bool | None = None


class ContactIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str | None = Field(None, max_length=254, pattern=r"^[^@\s\x00<>]+@[^@\s\x00<>]+\.[^@\s\x00<>]+$")
    phone: str | None = Field(None, max_length=32, pattern=r"^\+?[0-9 ()-]{5,32}$")
    locale: str = Field("pl-PL", max_length=16, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
    time_zone: str = Field("Europe/Warsaw", max_length=64)
    consent: ConsentIn = ConsentIn()
    source: str = Field("contact_api", max_length=64, pattern=r"^[a-z0-9_:.-]+$")


class ComplaintIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    remark: str = Field(min_length=1, max_length=4000)
    purchase_id: str | None = Field(None, max_length=200)
    store_id: str | None = Field(None, max_length=200)
    category: str | None = Field(None, max_length=200)


class AssignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    assignee: str = Field(min_length=1, max_length=200)


class ResolveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resolution: str | None = Field(None, max_length=4000)


def create_router(runtime: ServiceRuntime, engine: Engagement) -> APIRouter:
    s = engine.settings
    # A JSON body FastAPI cannot decode (not UTF-8, too deep): 422 like any invalid body, not a bare 400.
    router = APIRouter(route_class=ExplainedBodyRoute)
    admin = admin_key_dependency(lambda: s.admin_api_key, setting="ENGAGEMENT_ADMIN_API_KEY")

    async def admin_or_backend(x_admin_key: Annotated[str | None, Header()] = None,
                               x_backend_key: Annotated[str | None, Header()] = None) -> str:
        for given, expected, who in ((x_admin_key, s.admin_api_key, "admin"), (x_backend_key, s.backend_api_key,
                                                                              "backend")):
            if given and expected and hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
                return who
        if not s.admin_api_key and not s.backend_api_key:
            raise HTTPException(503, {"reason": "api_disabled",
                                      "msg": "set ENGAGEMENT_ADMIN_API_KEY or ENGAGEMENT_BACKEND_API_KEY"})
        ADMIN_REFUSALS.labels("missing_or_invalid_key").inc()
        raise HTTPException(401, {"reason": "invalid_key", "msg": "an X-Admin-Key or X-Backend-Key is required"})

    async def run(work):
        """One transaction; its events to the outbox; the relay woken after the commit."""
        async with runtime.pool.acquire() as conn, transaction(conn):
            result, messages = await work(conn)
            await enqueue(conn, messages)
        if messages:
            runtime.relay.wake()
        return result

    # ---- contact data and consent -----------------------------------------------------------

    @router.put("/v1/customers/{customer_id}/contact", tags=["customers"],
                responses={200: {"model": ContactOut, "description": "The contact data and consent now"},
                           **BACKEND_ERRORS},
                summary="Set a customer's contact data and consent (admin or back-end key)")
    async def put_contact(customer_id: CustomerId, body: ContactIn, who: str = Depends(admin_or_backend)) -> dict:
        try:
            ZoneInfo(body.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise HTTPException(422, {"reason": "unknown_time_zone",
                                      "msg": f"{body.time_zone!r} is not a time zone"}) from None
        consent = {k: v for k, v in body.consent.model_dump().items() if v is not None}
        change = svc.ContactChange(email=body.email, phone=body.phone, locale=body.locale,
                                   time_zone=body.time_zone, consent=consent, source=body.source)

        async def work(conn):
            msgs = await svc.set_contact(conn, engine, customer_id, change)
            return await _contact(conn, customer_id), msgs
        return await run(work)

    @router.get("/v1/customers/{customer_id}/contact", tags=["customers"], dependencies=[Depends(admin)],
                responses={200: {"model": ContactOut, "description": "The contact data and consent"},
                           **ADMIN_ERRORS, **refusals(404, e404="Unknown customer")})
    async def get_contact(customer_id: CustomerId) -> dict:
        async with runtime.pool.acquire() as conn:
            return await _contact(conn, customer_id)

    @router.delete("/v1/customers/{customer_id}", tags=["customers"], dependencies=[Depends(admin)],
                   responses={200: {"model": ErasedOut, "description": "Erased"}, **ADMIN_ERRORS},
                   summary="Erase a customer: contact data, consent and messages' personal content")
    async def erase(customer_id: CustomerId) -> dict:
        async def work(conn):
            msgs = await svc.erase_customer(conn, engine, customer_id)
            return {"customer_id": customer_id, "erased": True, "touchpoints_cancelled": len(msgs)}, msgs
        return await run(work)

    @router.get("/v1/customers/{customer_id}/timeline", tags=["customers"], dependencies=[Depends(admin)], responses=ADMIN_ERRORS)
    async def timeline(customer_id: CustomerId) -> list[dict]:
        async with runtime.pool.acquire() as conn:
            return [dict(r) for r in await repo.timeline(conn, customer_id)]

    @router.post("/v1/customers/{customer_id}/complaints", tags=["feedback"], status_code=201,
                 responses={201: {"model": OpenedOut, "description": "Follow-up tasks opened"}, **BACKEND_ERRORS},
                 summary="A remark or complaint (admin or back-end key): a follow-up task with a deadline")
    async def post_complaint(customer_id: CustomerId, body: ComplaintIn, who: str = Depends(admin_or_backend)) -> dict:
        async def work(conn):
            msgs = await feedback.open_complaint(conn, engine, customer_id=customer_id, source="api",
                                                 remark=body.remark, purchase_id=body.purchase_id,
                                                 store_id=body.store_id, category=body.category)
            return {"opened": len(msgs)}, msgs
        return await run(work)

    async def _contact(conn, customer_id: str) -> dict:
        row = await conn.fetchrow("SELECT * FROM customers WHERE customer_id = $1", customer_id)
        consents = await repo.consents(conn, customer_id)
        if row is None:
            raise HTTPException(404, {"reason": "unknown_customer"})
        return {"customer_id": customer_id, "email": row["email"], "phone": row["phone"], "locale": row["locale"],
                "time_zone": row["time_zone"], "erased": row["erased_at"] is not None,
                "consent": {ch: {"granted": c["granted"], "source": c["source"], "changed_at": c["changed_at"]}
                            for ch, c in consents.items()}}

    # ---- journeys --------------------------------------------------------------------------

    @router.get("/v1/admin/journeys", tags=["admin"], dependencies=[Depends(admin)], responses=ADMIN_ERRORS)
    async def get_journeys() -> dict:
        async with runtime.pool.acquire() as conn:
            await engine.journeys.refresh(conn)
        return {"version": engine.journeys.version, "document": engine.journeys.current.canonical()}

    @router.put("/v1/admin/journeys", tags=["admin"], dependencies=[Depends(admin)],
                responses={200: {"model": VersionOut, "description": "The new version"},
                           **refusals(401, 413, 422, 503, e422="Not journeys (reason invalid_journeys) or a bad header")},
                openapi_extra={"requestBody": {"required": True, "content": {
                    "application/yaml": {"schema": {"type": "string"}},
                    "application/json": {"schema": {"type": "object"}}}}},
                summary="Replace the journeys (YAML or JSON body): a new version")
    async def put_journeys(request: Request, x_actor: Annotated[str, Header(max_length=200)] = "admin") -> dict:
        text = (await request.body()).decode("utf-8", errors="replace")
        try:
            async with runtime.pool.acquire() as conn:
                async with transaction(conn):
                    version = await engine.journeys.replace(conn, text, actor=x_actor)
                await engine.journeys.refresh(conn)
        except ValidationError as exc:
            raise HTTPException(422, {"reason": "invalid_journeys",
                                      "errors": exc.errors(include_url=False, include_input=False,
                                                           include_context=False)}) from None
        except ValueError as exc:
            raise HTTPException(422, {"reason": "invalid_journeys", "msg": str(exc)}) from None
        return {"version": version}

    # ---- follow-ups and figures ------------------------------------------------------------

    @router.get("/v1/followups", tags=["staff"], dependencies=[Depends(admin)], responses=ADMIN_ERRORS)
    async def followups(status: Literal["open", "resolved"] | None = None,
                        limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[dict]:
        async with runtime.pool.acquire() as conn:
            return [dict(r) for r in await feedback.list_followups(conn, status=status, limit=limit)]

    @router.post("/v1/followups/{followup_id}/assign", tags=["staff"], dependencies=[Depends(admin)],
                 responses={**ADMIN_ERRORS, **BODY_ERRORS, **refusals(404, e404="Unknown follow-up")})
    async def assign(followup_id: uuid.UUID, body: AssignIn) -> dict:
        async with runtime.pool.acquire() as conn:
            try:
                return dict(await feedback.assign_followup(conn, followup_id, body.assignee))
            except feedback.FollowupNotFound:
                raise HTTPException(404, {"reason": "unknown_followup"}) from None

    @router.post("/v1/followups/{followup_id}/resolve", tags=["staff"], dependencies=[Depends(admin)],
                 responses={**ADMIN_ERRORS, **BODY_ERRORS, **refusals(404, e404="Unknown follow-up")})
    async def resolve(followup_id: uuid.UUID, body: ResolveIn) -> dict:
        async def work(conn):
            row, msgs = await feedback.resolve_followup(conn, engine, followup_id, body.resolution)
            return dict(row), msgs
        try:
            return await run(work)
        except feedback.FollowupNotFound:
            raise HTTPException(404, {"reason": "unknown_followup"}) from None

    @router.get("/v1/stats/satisfaction", tags=["staff"], dependencies=[Depends(admin)], responses=ADMIN_ERRORS,
                summary="NPS, CSAT and response rate per store, category and month")
    async def stats_satisfaction(since: Annotated[str | None, Query(description=TIME + "; default a year ago",
                                                                    json_schema_extra={"format": "date-time"})] = None
                                 ) -> list[dict]:
        start = query_time(since, "since") or engine.clock() - timedelta(days=365)
        async with runtime.pool.acquire() as conn:
            return await feedback.satisfaction(conn, since=start)

    @router.get("/v1/stats/relationship", tags=["staff"], dependencies=[Depends(admin)], responses=ADMIN_ERRORS,
                summary="The relationship gap: first touchpoint after a sale, follow-up shares, response rate")
    async def stats_relationship(days: Annotated[int, Query(ge=1, le=3650)] = 30) -> dict:
        now = engine.clock()
        async with runtime.pool.acquire() as conn:
            return await feedback.relationship_gap(conn, since=now - timedelta(days=days), now=now)

    # ---- customer pages (signed links) -------------------------------------------------------

    def claims(purpose: str, token: str) -> dict | None:
        try:
            return tokens.verify(s.link_secret.get_secret_value(), purpose, token, now=engine.clock())
        except tokens.BadToken:
            return None

    async def locale_of(customer_id: str) -> str:
        async with runtime.pool.acquire() as conn:
            return language(await conn.fetchval("SELECT locale FROM customers WHERE customer_id = $1", customer_id),
                            s.default_locale)

    @router.get("/s/{token}", response_class=HTMLResponse, tags=["pages"], responses=page_answers(404, 410), summary="The survey page")
    async def survey_page(token: str) -> HTMLResponse:
        c = claims("survey", token)
        if c is None:
            return HTMLResponse(pages.page("en", "survey", message_key="bad_link"), status_code=404)
        async with runtime.pool.acquire() as conn:
            row = await feedback.survey(conn, uuid.UUID(c["s"]))
        lang = await locale_of(row["customer_id"]) if row else "en"
        if row is None or row["answered_at"] is not None or engine.clock() > row["expires_at"]:
            return HTMLResponse(pages.page(lang, "survey", message_key="unavailable"), status_code=410)
        return HTMLResponse(pages.survey_form(lang))

    @router.post("/s/{token}", response_class=HTMLResponse, tags=["pages"], summary="Answer the survey (a form)",
                 responses=page_answers(404, 410, 413, 422, e422="No answer given (reason empty_answer) or a value out of range"))
    async def survey_answer(token: str, nps: Annotated[int | None, Form(ge=0, le=10)] = None,
                            csat: Annotated[int | None, Form(ge=1, le=5)] = None,
                            remark: Annotated[str | None, Form(max_length=4000)] = None) -> HTMLResponse:
        c = claims("survey", token)
        if c is None:
            return HTMLResponse(pages.page("en", "survey", message_key="bad_link"), status_code=404)
        if nps is None and csat is None and not remark:
            raise HTTPException(422, {"reason": "empty_answer", "msg": "give nps, csat or a remark"})
        survey_id = uuid.UUID(c["s"])

        async def work(conn):
            row = await feedback.survey(conn, survey_id)
            msgs = await feedback.answer_survey(conn, engine, survey_id, nps=nps, csat=csat, remark=remark)
            return row["customer_id"], msgs
        try:
            customer_id = await run(work)
        except feedback.SurveyUnavailable:
            return HTMLResponse(pages.page("en", "survey", message_key="unavailable"), status_code=410)
        return HTMLResponse(pages.page(await locale_of(customer_id), "survey", message_key="thanks"))

    @router.get("/u/{token}", response_class=HTMLResponse, tags=["pages"], responses=page_answers(404), summary="Unsubscribe page")
    async def unsubscribe_page(token: str) -> HTMLResponse:
        c = claims("unsubscribe", token)
        if c is None:
            return HTMLResponse(pages.page("en", "unsub", message_key="bad_link"), status_code=404)
        return HTMLResponse(pages.unsubscribe_form(await locale_of(c["c"])))

    @router.post("/u/{token}", response_class=HTMLResponse, tags=["pages"], responses=page_answers(404, 413),
                 summary="Unsubscribe (the form, and RFC 8058 one-click POST from a mail client)")
    async def unsubscribe(token: str) -> HTMLResponse:
        c = claims("unsubscribe", token)
        if c is None:
            return HTMLResponse(pages.page("en", "unsub", message_key="bad_link"), status_code=404)

        async def work(conn):
            return None, await svc.change_consent(conn, engine, c["c"], {c["ch"]: False}, source="unsubscribe_link")
        await run(work)
        return HTMLResponse(pages.page(await locale_of(c["c"]), "unsub", message_key="unsub_done"))

    @router.get("/c/{token}", response_class=HTMLResponse, tags=["pages"], responses=page_answers(404), summary="Remark or complaint page")
    async def complaint_page(token: str) -> HTMLResponse:
        c = claims("complaint", token)
        if c is None:
            return HTMLResponse(pages.page("en", "complaint", message_key="bad_link"), status_code=404)
        return HTMLResponse(pages.complaint_form(await locale_of(c["c"])))

    @router.post("/c/{token}", response_class=HTMLResponse, tags=["pages"], summary="Send a remark or complaint (a form)",
                 responses=page_answers(404, 413, 422))
    async def complaint(token: str, remark: Annotated[str, Form(min_length=1, max_length=4000)]) -> HTMLResponse:
        c = claims("complaint", token)
        if c is None:
            return HTMLResponse(pages.page("en", "complaint", message_key="bad_link"), status_code=404)

        async def work(conn):
            return None, await feedback.open_complaint(conn, engine, customer_id=c["c"], source="complaint_form",
                                                       remark=remark)
        await run(work)
        return HTMLResponse(pages.page(await locale_of(c["c"]), "complaint", message_key="complaint_done"))

    return router
