"""What an HTTP request may send before a service reads it: a body size limit, enforced by
every service's ASGI skeleton while the body streams in, and JSON bodies FastAPI cannot
decode refused in the service's own error shape instead of FastAPI's bare 400."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import Counter
from starlette.exceptions import HTTPException  # what FastAPI raises for a body it cannot parse
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

# Above the largest body any service's contract allows (a rewards coupon upload: 50,000
# codes of up to 128 characters, ~6.6 MB); a service with a `max_body_bytes` setting uses it.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024

REFUSED = Counter("http_requests_refused_total",
                  "HTTP requests refused by the shared skeleton before reaching a route, per reason", ["reason"])

def default_refusal(max_bytes: int) -> dict[str, Any]:
    return {"error": "body_too_large", "detail": f"the body is larger than {max_bytes} bytes"}


@dataclass(frozen=True)
class BodyLimit:
    """How large a body may be, how the 413 reads (`refusal(max_bytes)` is its JSON), and
    what else to count when it is refused (the service's own metric)."""

    max_bytes: int
    refusal: Callable[[int], dict[str, Any]] = default_refusal
    on_refused: Callable[[], None] | None = None


class BodySizeLimit:
    """Pure ASGI middleware: a body over the limit gets 413 before it is read, by its
    Content-Length, or, streamed without one (Transfer-Encoding: chunked), as soon as the
    bytes received pass the limit; the app then sees the client as gone."""

    def __init__(self, app: Any, limit: BodyLimit) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit.max_bytes:
            return await _refuse(limit, send)
        received, started, refused, answered = 0, False, False, False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, refused, answered
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    refused = True
                    if started:  # the app answered before reading it all: only count it
                        _count(limit)
                    else:
                        await _refuse(limit, send)
                        answered = True
                    # Not an exception: FastAPI would turn it into its own 400.
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if answered:
                return  # the 413 is the answer; what the app says to the "disconnect" is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ClientDisconnect:
            # A route that reads the body itself (the webhooks) sees the refused body as a
            # client gone: the 413 is already the answer, nothing to log or re-raise.
            if not refused:
                raise


def _count(limit: BodyLimit) -> None:
    REFUSED.labels("body_too_large").inc()
    if limit.on_refused is not None:
        limit.on_refused()


async def _refuse(limit: BodyLimit, send: Any) -> None:
    _count(limit)
    body = json.dumps(limit.refusal(limit.max_bytes)).encode()
    # No "Connection: close": a client still sending its body would get a connection reset
    # instead of the 413 (uvicorn does not linger). uvicorn drops the rest of the body without
    # buffering it; it has no timeout for a client that keeps sending (nor for a slow body
    # under the limit): that is for the reverse proxy in front.
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def unreadable_json(exc: Exception) -> tuple[str, str] | None:
    """(error type, message) when `exc` is the bare 400 FastAPI raises for a JSON body it
    could not decode (its JSONDecodeError is already a 422 json_invalid); None otherwise,
    e.g. for a client that went away mid-body."""
    if not isinstance(exc, HTTPException) or exc.status_code != 400:
        return None
    cause = exc.__cause__
    if isinstance(cause, UnicodeError):
        return "json_invalid_utf8", "the body is not JSON in UTF-8 (RFC 8259): it has bytes UTF-8 does not allow"
    if isinstance(cause, RecursionError):
        return "json_too_deep", "the JSON nests arrays or objects too deeply to be read"
    if isinstance(cause, ValueError):  # e.g. an integer longer than Python converts (4,300 digits)
        return "json_invalid", f"the body is not readable JSON: {str(cause)[:200]}"
    return None


class ExplainedBodyRoute(APIRoute):
    """An APIRoute that answers a JSON body FastAPI cannot decode with `refuse_unreadable`
    instead of FastAPI's bare 400 {"detail": "There was an error parsing the body"}.
    A service subclasses it to count the refusal and answer in its own shape; the default
    answer is FastAPI's own validation error shape (422, a list of errors under "detail")."""

    def refuse_unreadable(self, request: Request, error_type: str, message: str) -> Response:
        return JSONResponse({"detail": [{"type": error_type, "loc": ["body"], "msg": message}]}, status_code=422)

    def get_route_handler(self) -> Callable[[Request], Any]:
        handle = super().get_route_handler()

        async def handle_explained(request: Request) -> Response:
            try:
                return await handle(request)
            except HTTPException as exc:
                unreadable = unreadable_json(exc)
                if unreadable is None:
                    raise
                return self.refuse_unreadable(request, *unreadable)

        return handle_explained
