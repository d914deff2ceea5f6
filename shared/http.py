"""The ASGI app skeleton every service uses: lifespan, /healthz, /readyz, /metrics,
/asyncapi.json next to FastAPI's own /openapi.json, /docs (Swagger UI) served with its
assets, and a request body size limit."""

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from faststream.specification import AsyncAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit, BodySizeLimit
from shared.runtime import ServiceRuntime

DOCS_ASSETS_URL = "/docs-assets"


def create_service_app(runtime: ServiceRuntime, *, title: str, description: str, version: str = "0.1.0",
                       body_limit: BodyLimit | None = None) -> FastAPI:
    """`body_limit`: the service's limit and 413 body; by default the service's
    `max_body_bytes` setting, or DEFAULT_MAX_BODY_BYTES for a service without one."""
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    # FastAPI's own /docs loads Swagger UI from a CDN: a blank page offline and on most
    # locked-down servers. fastapi-offline ships the same assets in its wheel and serves them.
    # No /redoc: ReDoc's page still fetches its logo from its CDN.
    app = FastAPIOffline(title=title, description=description, version=version, lifespan=lifespan,
                         static_url=DOCS_ASSETS_URL, redoc_url=None)
    app.state.runtime = runtime
    app.add_middleware(BodySizeLimit, limit=body_limit or BodyLimit(
        getattr(runtime.settings, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)))
    asyncapi = AsyncAPI(runtime.broker, title=title, version=version, description=description)

    @app.get("/healthz", tags=["operations"], summary="Liveness: the process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"],
             summary="Readiness: broker connected, database reachable, and the service's own checks",
             responses={200: {"description": "Ready: every check is true"},
                        503: {"description": "Not ready: `checks` says which check is false"}})
    async def readyz() -> JSONResponse:
        checks = await runtime.readiness()
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    if hasattr(runtime.settings, "admin_api_key"):
        # Every service with an admin key serves its dead letters (list, show, replay).
        from shared.deadletters import DeadLetterApiError, DeadLetterDesk, dead_letter_error_handler, dead_letter_router

        prefix = runtime.settings.model_config.get("env_prefix", "")
        app.include_router(dead_letter_router(
            DeadLetterDesk(runtime, door_topics=runtime.dead_letter_doors),
            admin_key=lambda: runtime.settings.admin_api_key, setting=f"{prefix}ADMIN_API_KEY"))
        app.add_exception_handler(DeadLetterApiError, dead_letter_error_handler)

    @app.get("/asyncapi.json", tags=["operations"], summary="AsyncAPI document of the topics")
    async def asyncapi_doc() -> JSONResponse:
        return JSONResponse(asyncapi.to_specification().to_jsonable())

    return app


def serve(service: str, settings, create_app) -> None:
    """Run one service process: structured logs, then uvicorn with a graceful shutdown
    long enough for in-flight batches to commit and the outbox to drain."""
    import uvicorn

    from shared.logging import configure_logging

    configure_logging(service, level=settings.log_level, json_logs=settings.log_json)
    app = create_app(settings)
    tune_collector()
    # uvloop and httptools: the event loop and HTTP parser in C. Every service is I/O-heavy
    # (Kafka, PostgreSQL, HTTP) and CPU-bound on two cores, so the loop's own cost matters.
    from shared.http_protocol import DEFAULT_MAX_HEAD_BYTES, bounded_head_protocol

    # httptools (the HTTP parser in C), with the request head bounded: 431 past the limit.
    protocol = bounded_head_protocol(getattr(settings, "max_head_bytes", DEFAULT_MAX_HEAD_BYTES))
    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_config=None,
                timeout_graceful_shutdown=20, loop="uvloop", http=protocol)


# Young-generation collections every 7,000 net allocations instead of 700: a batch or a
# request allocates thousands of objects, and at the default threshold the collector took
# about a tenth of a service's CPU (rewards under bench.rewards_latency: 1.8 s -> 0.55 s).
GC_GEN0_THRESHOLD = 7_000


def tune_collector() -> None:
    """For a long-lived service process (not for tests, which run apps in their own
    process). Everything built so far (modules, routes, models) lives as long as the
    process: frozen out of the collector, whose full collections would otherwise walk it
    again and again; the garbage made so far is collected first."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
