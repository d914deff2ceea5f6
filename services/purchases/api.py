"""The HTTP doors: POS back-ends (API key per store) and e-shop webhooks (HMAC-signed)."""

import json
from datetime import timedelta
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.purchases import domain, metrics, repository, webhooks
from services.purchases.domain import PurchaseIn, Rejection
from services.purchases.domain import ClaimRefused
from services.purchases.service import Inbound, Outcome, PurchaseRecorder, claim_purchase
from services.purchases.settings import PurchasesSettings
from shared.events import utcnow
from shared.limits import BodyLimit, ExplainedBodyRoute
from shared.runtime import ServiceRuntime

STATUS_CODES = {"recorded": 201, "duplicate": 200, "conflict": 409, "rejected": 422, "parked": 202}


class OutcomeOut(BaseModel):
    status: str = Field(description="recorded | duplicate | conflict | rejected | parked (a webhook return "
                              "waiting for its sale)")
    purchase_id: str | None = None
    event_id: str | None = None
    reason: str | None = None
    errors: list[dict[str, Any]] = []


class BatchIn(BaseModel):
    purchases: list[dict[str, Any]] = Field(min_length=1, description="Purchases in the inbound contract")


class BatchOut(BaseModel):
    results: list[OutcomeOut]
    summary: dict[str, int]


class ClaimIn(BaseModel):
    customer_id: domain.Ident
    source: Literal["pos", "eshop"] = "pos"


class ClaimOut(BaseModel):
    status: str = Field(description="claimed | already_claimed (this customer claimed it before)")
    purchase_id: str
    customer_id: str
    event_id: str


class ProblemOut(BaseModel):
    """A refusal: why (`reason`), in words (`message`), and field-level errors if any."""
    status: Literal["rejected"] = "rejected"
    reason: str
    message: str
    errors: list[dict[str, Any]] = []


class KeyRefusalDetail(BaseModel):
    reason: Literal["missing_api_key", "invalid_api_key"]
    message: str


class KeyRefusal(BaseModel):
    detail: KeyRefusalDetail


# What every door may answer besides its own outcomes: the statuses below are produced by
# the code (the tests check each against this document: tests/hostile/test_purchases_statuses.py).
KEY_REFUSED = {401: {"model": KeyRefusal, "description": "Missing or invalid X-API-Key"}}
TOO_LARGE = {413: {"model": ProblemOut, "description": "body_too_large: the body exceeds max_body_bytes"}}
REFUSED = {422: {"model": ProblemOut, "description": "The request does not match the contract (field-level errors)"}}
WEBHOOK_STATUSES = {
    200: {"model": OutcomeOut, "description": "duplicate (already recorded), ignored (nothing to record for this "
                                             "topic or order status) or ping (WooCommerce's test delivery)"},
    201: {"model": OutcomeOut, "description": "recorded"},
    202: {"model": OutcomeOut, "description": "parked: a refund whose sale has not arrived yet; recorded when it does"},
    401: {"model": ProblemOut, "description": "bad_signature (missing or invalid HMAC) or stale_webhook (the signed "
                                              "payload is older than webhook_max_age_s: a replay)"},
    409: {"model": OutcomeOut, "description": "conflict: same order id, different content"},
    **TOO_LARGE,
    422: {"model": ProblemOut, "description": "rejected or unmappable_webhook: signed but unusable (dead-lettered) "
                                              "or not a valid purchase once mapped"},
    503: {"model": ProblemOut, "description": "not_configured: this shop's webhook secret is not set"},
}


def problem_body(reason: str, message: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"status": "rejected", "reason": reason, "message": message, "errors": errors or []}


def problem(status: int, reason: str, message: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    return JSONResponse(problem_body(reason, message, errors), status_code=status)


class PurchasesRoute(ExplainedBodyRoute):
    """A JSON body that cannot be decoded (not UTF-8, nested too deep) is refused like one
    that does not parse: 422 malformed_json, counted."""

    def refuse_unreadable(self, request: Request, error_type: str, message: str) -> JSONResponse:
        metrics.REJECTED.labels("http", "malformed_json").inc()
        return problem(422, "malformed_json", message, [{"loc": ["body"], "msg": message, "type": error_type}])


def create_router(runtime: ServiceRuntime, recorder: PurchaseRecorder, settings: PurchasesSettings) -> APIRouter:
    router = APIRouter(route_class=PurchasesRoute)

    async def record(items: list[Inbound]) -> list[Outcome]:
        async with runtime.pool.acquire() as conn:
            outcomes = await recorder.record(conn, items)
        runtime.relay.wake()
        return outcomes

    async def store_from_key(x_api_key: Annotated[str | None, Header(description="The store's API key")] = None) -> str:
        if not x_api_key:
            metrics.REJECTED.labels("http", "missing_api_key").inc()
            raise HTTPException(401, detail={"reason": "missing_api_key", "message": "send the store's X-API-Key header"})
        store_id = await repository.store_for_api_key(runtime.pool, key=x_api_key)
        if store_id is None:
            metrics.REJECTED.labels("http", "invalid_api_key").inc()
            raise HTTPException(401, detail={"reason": "invalid_api_key", "message": "unknown or revoked API key"})
        return store_id

    def http_inbound(purchase: PurchaseIn | Rejection, original: Any, store_id: str, cid: str | None) -> Inbound:
        if isinstance(purchase, PurchaseIn) and purchase.store_id != store_id:
            purchase = Rejection("store_mismatch", [{"loc": ["store_id"], "type": "store_mismatch",
                                                     "msg": f"this API key is for store {store_id}"}])
        return Inbound(door="http", original=json.dumps(original, default=str).encode(), parsed=purchase,
                       correlation_id=cid, dead_letter_on_reject=False)

    @router.post("/v1/purchases", tags=["purchases"], summary="Record one purchase (sale or return)",
                 response_model=OutcomeOut, status_code=201,
                 responses={200: {"model": OutcomeOut, "description": "Already recorded (identical resend)"},
                            **KEY_REFUSED,
                            403: {"model": ProblemOut, "description": "store_mismatch: the purchase's store_id "
                                                                      "is not the API key's store"},
                            409: {"model": OutcomeOut, "description": "Same purchase id, different content"},
                            **TOO_LARGE,
                            422: {"model": OutcomeOut, "description": "Invalid purchase, field-level errors"}})
    async def post_purchase(purchase: PurchaseIn, store_id: Annotated[str, Depends(store_from_key)],
                            x_correlation_id: Annotated[str | None, Header()] = None) -> JSONResponse:
        item = http_inbound(purchase, purchase.model_dump(mode="json"), store_id, x_correlation_id)
        if isinstance(item.parsed, Rejection):
            metrics.REJECTED.labels("http", item.parsed.reason).inc()
            return problem(403, item.parsed.reason, item.parsed.message, item.parsed.errors)
        [outcome] = await record([item])
        return JSONResponse(outcome.as_json(), status_code=STATUS_CODES[outcome.status])

    @router.post("/v1/purchases/batch", tags=["purchases"], response_model=BatchOut,
                 summary="Record up to max_batch_items purchases; one result per item, in order",
                 description="200 whatever each item's outcome: `results` has one outcome per item (recorded, "
                             "duplicate, conflict, rejected with errors, parked), `summary` counts them.",
                 responses={**KEY_REFUSED,
                            413: {"model": ProblemOut, "description": "batch_too_large (more than max_batch_items) "
                                                                      "or body_too_large"},
                            **REFUSED})
    async def post_batch(batch: BatchIn, store_id: Annotated[str, Depends(store_from_key)],
                         x_correlation_id: Annotated[str | None, Header()] = None) -> JSONResponse:
        if len(batch.purchases) > settings.max_batch_items:
            metrics.REJECTED.labels("http", "batch_too_large").inc()
            return problem(413, "batch_too_large", f"at most {settings.max_batch_items} purchases per batch")
        items = [http_inbound(domain.parse_purchase(raw), raw, store_id, x_correlation_id) for raw in batch.purchases]
        outcomes = await record(items)
        summary: dict[str, int] = {}
        for o in outcomes:
            summary[o.status] = summary.get(o.status, 0) + 1
        return JSONResponse({"results": [o.as_json() for o in outcomes], "summary": summary})

    @router.post("/v1/purchases/{purchase_id}/claim", tags=["purchases"], response_model=ClaimOut,
                 summary="A customer claims an anonymous sale of this store (within the claim window)",
                 responses={200: {"model": ClaimOut, "description": "already_claimed by this customer"},
                            201: {"model": ClaimOut, "description": "claimed: PurchaseClaimed published"},
                            **KEY_REFUSED,
                            404: {"model": ProblemOut, "description": "unknown_purchase: no such sale at this store"},
                            409: {"model": ProblemOut, "description": "already_claimed by another customer"},
                            **TOO_LARGE,
                            422: {"model": ProblemOut, "description": "claim_window_closed, fully_returned, or an "
                                                                      "invalid body"}})
    async def post_claim(purchase_id: Annotated[domain.Ident, Path()], claim: ClaimIn, store_id: Annotated[str, Depends(store_from_key)],
                         x_correlation_id: Annotated[str | None, Header()] = None) -> JSONResponse:
        try:
            async with runtime.pool.acquire() as conn:
                result = await claim_purchase(conn, settings=settings, store_id=store_id, source=claim.source,
                                              purchase_id=purchase_id, customer_id=claim.customer_id,
                                              correlation_id=x_correlation_id, clock=recorder.clock)
        except ClaimRefused as refused:
            metrics.CLAIMS.labels(refused.reason).inc()
            return problem(refused.status, refused.reason, str(refused))
        runtime.relay.wake()
        metrics.CLAIMS.labels("claimed" if result.created else "repeat").inc()
        return JSONResponse({"status": "claimed" if result.created else "already_claimed", "purchase_id": purchase_id,
                             "customer_id": result.customer_id, "event_id": str(result.event_id)},
                            status_code=201 if result.created else 200)

    # ---- webhooks ------------------------------------------------------------------------

    async def accept_webhook(door: str, body: bytes, *, signed: bool, delivery_id: str | None,
                             map_payload: Callable[[dict[str, Any]], dict[str, Any] | None]) -> JSONResponse:
        """What every e-shop door does: signature, replay window on the signed body's own
        timestamp, mapping onto the contract, recording. A signed but unusable body is
        dead-lettered (the shop will not send it differently) and answered 422."""
        if not signed:
            metrics.REJECTED.labels(door, "bad_signature").inc()
            return problem(401, "bad_signature", "missing or invalid HMAC signature")
        max_age_s = settings.webhook_max_age_s
        try:
            payload = json.loads(body)
            if door == "shopify" and isinstance(payload, dict) and payload.get("test") is True:
                # Shopify's "send test notification": a sample order nobody bought.
                metrics.WEBHOOK_TESTS.labels(door).inc()
                return JSONResponse({"status": "test_notification", "message": "acknowledged; nothing recorded"})
            stamp = webhooks.webhook_timestamp(payload, door)
            if utcnow() - stamp > timedelta(seconds=max_age_s):
                metrics.REJECTED.labels(door, "stale_webhook").inc()
                return problem(401, "stale_webhook", f"the signed payload is older than {max_age_s}s (replay?)")
            mapped = map_payload(payload)
        except (ValueError, TypeError, RecursionError, webhooks.WebhookPayloadError) as exc:
            rejection = Rejection("unmappable_webhook", [{"loc": [], "msg": str(exc), "type": "unmappable_webhook"}])
            await record([Inbound(door=door, original=body, parsed=rejection)])
            return problem(422, rejection.reason, rejection.message, rejection.errors)
        if mapped is None:
            return JSONResponse({"status": "ignored", "message": "nothing to record for this event"})
        item = Inbound(door=door, original=body, parsed=domain.parse_purchase(mapped), correlation_id=delivery_id)
        [outcome] = await record([item])
        return JSONResponse(outcome.as_json(), status_code=STATUS_CODES[outcome.status])

    @router.post("/v1/webhooks/shopify", tags=["webhooks"], responses=WEBHOOK_STATUSES,
                 summary="Shopify webhooks: orders/paid and refunds/create (X-Shopify-Hmac-Sha256)")
    async def shopify(request: Request,
                      x_shopify_hmac_sha256: Annotated[str | None, Header()] = None,
                      x_shopify_topic: Annotated[str | None, Header()] = None,
                      x_shopify_webhook_id: Annotated[str | None, Header()] = None) -> JSONResponse:
        if not settings.shopify_webhook_secret:
            return problem(503, "not_configured", "Shopify webhooks are not configured")
        body = await request.body()
        mappers = {"orders/paid": webhooks.map_shopify_order_paid, "refunds/create": webhooks.map_shopify_refund}
        mapper = mappers.get(x_shopify_topic or "")
        return await accept_webhook(
            "shopify", body, delivery_id=x_shopify_webhook_id,
            signed=webhooks.verify_shopify_hmac(settings.shopify_webhook_secret, body, x_shopify_hmac_sha256),
            map_payload=lambda payload: mapper(payload, store_id=settings.shopify_store_id) if mapper else None)

    @router.post("/v1/webhooks/woocommerce", tags=["webhooks"], responses=WEBHOOK_STATUSES,
                 summary="WooCommerce order webhooks (X-WC-Webhook-Signature)")
    async def woocommerce(request: Request,
                          x_wc_webhook_signature: Annotated[str | None, Header()] = None,
                          x_wc_webhook_delivery_id: Annotated[str | None, Header()] = None) -> JSONResponse:
        if not settings.woocommerce_webhook_secret:
            return problem(503, "not_configured", "WooCommerce webhooks are not configured")
        body = await request.body()
        signed = webhooks.verify_woocommerce_signature(settings.woocommerce_webhook_secret, body,
                                                       x_wc_webhook_signature)
        if signed and body.startswith(b"webhook_id="):  # WooCommerce pings a new webhook with a form body
            return JSONResponse({"status": "ping"})
        return await accept_webhook(
            "woocommerce", body, signed=signed, delivery_id=x_wc_webhook_delivery_id,
            map_payload=lambda payload: webhooks.map_woocommerce_order(payload, store_id=settings.woocommerce_store_id))

    return router


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 in our shape, counted in the metrics."""
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
    reason = "malformed_json" if any(e["type"] == "json_invalid" for e in errors) else "schema"
    metrics.REJECTED.labels("http", reason).inc()
    return problem(422, reason, "the request does not match the contract", errors)


def body_limit(max_body_bytes: int) -> BodyLimit:
    """The purchases service's body limit: 413 body_too_large in its shape, counted."""
    return BodyLimit(max_body_bytes,
                     refusal=lambda limit: problem_body("body_too_large", f"request bodies are limited to {limit} bytes"),
                     on_refused=metrics.REJECTED.labels("http", "body_too_large").inc)
