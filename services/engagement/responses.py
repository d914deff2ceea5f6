"""What engagement's HTTP API answers besides its own routes' logic, for its OpenAPI
document: the refusal bodies (every status a route answers is declared with one), the
success bodies that have a fixed shape, the 413 in the service's shape, query times."""

from datetime import datetime
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict

from shared.limits import BodyLimit


class RefusalOut(BaseModel):
    """Why a request was refused: a stable `reason` code, a human `msg`, for invalid journeys
    the `errors` found."""

    model_config = ConfigDict(extra="allow")
    reason: str
    msg: str | None = None
    errors: list[dict[str, Any]] | None = None


class ErrorOut(BaseModel):
    """Every refusal, as FastAPI words it: `detail` is a RefusalOut for the service's own
    refusals and, for a request that does not match the API, FastAPI's list of errors."""

    model_config = ConfigDict(extra="allow")
    detail: RefusalOut | list[dict[str, Any]]


def refusals(*statuses: int, **texts: str) -> dict[int | str, dict[str, Any]]:
    """The refusals a route answers (JSON ErrorOut bodies), with what each means there."""
    default = {401: "Missing or wrong key", 404: "Unknown", 413: "The body is larger than ENGAGEMENT_MAX_BODY_BYTES",
               422: "The request does not match the API", 503: "The API is disabled (ENGAGEMENT_ADMIN_API_KEY unset)"}
    return {status: {"model": ErrorOut, "description": texts.get(f"e{status}", default[status])}
            for status in statuses}


# A JSON refusal on a route whose own answers are HTML: the model would be filed under text/html.
_JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
_HTML = {"text/html": {"schema": {"type": "string"}}}


def page_answers(*statuses: int, **texts: str) -> dict[int | str, dict[str, Any]]:
    """A customer page's other answers: an HTML page (404 bad link, 410 survey gone) or a JSON
    refusal (422)."""
    default = {404: "The link is invalid or has expired (an HTML page)",
               413: "The form is larger than ENGAGEMENT_MAX_BODY_BYTES",
               410: "The survey was answered or has expired (an HTML page)",
               422: "The form does not match the API"}
    return {status: {"content": _JSON_ERROR if status in (413, 422) else _HTML,
                     "description": texts.get(f"e{status}", default[status])} for status in statuses}


ADMIN_ERRORS = refusals(401, 422, 503)
BODY_ERRORS = refusals(413)
BACKEND_ERRORS = refusals(401, 413, 422, 503, e401="Missing or wrong X-Admin-Key or X-Backend-Key",
                         e503="The API is disabled (neither ENGAGEMENT_ADMIN_API_KEY nor ENGAGEMENT_BACKEND_API_KEY set)")


def body_limit(max_bytes: int) -> BodyLimit:
    """The 413 in the shape of every other refusal of this service."""
    return BodyLimit(max_bytes, refusal=lambda n: {
        "detail": {"reason": "body_too_large", "msg": f"the body is larger than {n} bytes"}})


TIME = "An ISO 8601 time with its offset, e.g. 2026-12-07T08:00:00+01:00"


def query_time(value: str | None, name: str) -> datetime | None:
    """A query time: ISO 8601 with an offset. (A datetime parameter would read a bare
    number as a Unix timestamp, and a naive time has no one meaning.)"""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise HTTPException(422, {"reason": "invalid_time", "msg": f"{name}: {TIME}"})
    return parsed


class ConsentStateOut(BaseModel):
    granted: bool
    source: str | None
    changed_at: datetime | None


class ContactOut(BaseModel):
    customer_id: str
    email: str | None
    phone: str | None
    locale: str | None
    time_zone: str | None
    erased: bool
    consent: dict[str, ConsentStateOut]


class ErasedOut(BaseModel):
    customer_id: str
    erased: bool
    touchpoints_cancelled: int


class OpenedOut(BaseModel):
    opened: int


class VersionOut(BaseModel):
    version: int
