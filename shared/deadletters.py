"""Dead letters an operator can work with: list, show and replay what a service refused.

Every service that consumes through the pipeline serves, behind its admin key:

    GET  /v1/admin/dead-letters?reason=&since=&until=&limit=&cursor=   newest first
    GET  /v1/admin/dead-letters/{dead_letter_id}                        one, with the original
    POST /v1/admin/dead-letters/replay  {"ids": [...]} or {"reason": "...", "since": ..., "until": ...}

The dead-letter topics are the record (nothing else keeps a copy). A replay, after the cause
was fixed (a program version adding a currency rate, a corrected product), puts the original
bytes back on the topic they came from, keyed as before, through the outbox, in the same
transaction that records who replayed it and when (`dead_letter_replays`) and that forgets
the inbox entry the refusal left (the event id was claimed when it was refused, so without
that the replayed event would be a duplicate). Replaying the same dead letter again is
"already_replayed": a replay happens once. A dead letter without a topic to go back to (an
HTTP or webhook input) is replayed to the stream's Kafka door when the service says where
(`door_topics`), otherwise reported as not replayable.

A CLI over the same API: `python -m shared.deadletters SERVICE list|show|replay ...`
(reads `<SERVICE>_URL` and `<SERVICE>_ADMIN_API_KEY` from .run/endpoints.env or the environment).
"""

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from pydantic import AwareDatetime, BaseModel, Field, ValidationError

from shared.admin import AdminKeyRefused, admin_key_dependency
from shared.events import DeadLetter, derived_event_id
from shared.kafka import read_topic
from shared.limits import ExplainedBodyRoute
from shared.outbox import OutboxMessage, enqueue

REPLAYED = Counter("dead_letters_replayed_total", "Dead letters replayed by an operator", ["topic", "reason"])


class DeadLetterOut(BaseModel):
    dead_letter_id: uuid.UUID
    topic: str = Field(description="The dead-letter topic it is on")
    reason: str
    door: str
    recorded_at: datetime
    original_topic: str | None
    original_partition: int | None
    original_offset: int | None
    original_key: str | None
    replayed_at: datetime | None = None
    replayed_by: str | None = None


class DeadLetterDetail(DeadLetterOut):
    errors: list[dict[str, Any]]
    original: str


class DeadLetterPage(BaseModel):
    items: list[DeadLetterOut]
    counts_by_reason: dict[str, int] = Field(description="Over everything matching the filters, not just this page")
    next_cursor: str | None = None


class ReplayRequest(BaseModel):
    ids: list[uuid.UUID] | None = Field(default=None, max_length=10_000)
    reason: str | None = None
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    actor: str = Field(min_length=1, max_length=200, description="Who replays (recorded with the replay)")


class ReplayOutcome(BaseModel):
    dead_letter_id: uuid.UUID
    outcome: str = Field(description="replayed, already_replayed, not_replayable or not_found")
    detail: str | None = None


class ReplayResult(BaseModel):
    replayed: int
    outcomes: list[ReplayOutcome]


class ErrorDetail(BaseModel):
    reason: str
    msg: str


class ErrorOut(BaseModel):
    detail: ErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or wrong X-Admin-Key header"},
    503: {"model": ErrorOut, "description": "The admin API is disabled (no admin key configured)"},
    # invalid_cursor / invalid_request in the ErrorOut shape; a parameter or body that does not
    # parse in the service's own validation error shape (each service keeps its own).
    422: {"model": dict[str, Any], "description": "A parameter or body that does not fit"},
}


@dataclass(frozen=True)
class _Letter:
    topic: str
    letter: DeadLetter


_REPLAYED = """
SELECT dead_letter_id, replayed_at, replayed_by FROM dead_letter_replays WHERE dead_letter_id = ANY($1::uuid[])
"""
_RECORD_REPLAY = """
INSERT INTO dead_letter_replays (dead_letter_id, dlq_topic, reason, target_topic, replayed_by)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING dead_letter_id
"""
_FORGET = "DELETE FROM inbox WHERE consumer = $1 AND event_id = $2"


class DeadLetterDesk:
    """The operations behind the routes, for one service: its dead-letter topics, which
    inbox consumer reads each original topic, and where a door's refusals go back to."""

    def __init__(self, runtime: Any, *, door_topics: dict[str, str] | None = None) -> None:
        self.runtime = runtime
        self.door_topics = door_topics or {}

    @property
    def dlq_topics(self) -> list[str]:
        return sorted({s.dead_letter_topic for s in self.runtime.subscriptions})

    def _consumer_of(self, topic: str | None) -> str | None:
        return next((s.consumer for s in self.runtime.subscriptions if s.topic == topic), None)

    async def letters(self) -> list[_Letter]:
        found: list[_Letter] = []
        for topic in self.dlq_topics:
            for record in await read_topic(self.runtime.settings, topic):
                try:
                    found.append(_Letter(topic, DeadLetter.model_validate_json(record.value or b"")))
                except ValidationError:
                    continue  # not a dead letter (nothing else should be on the topic)
        unique = {letter.letter.dead_letter_id: letter for letter in found}  # at-least-once: repeats
        return sorted(unique.values(), key=lambda x: (x.letter.recorded_at, str(x.letter.dead_letter_id)),
                      reverse=True)

    async def replays(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[datetime, str]]:
        async with self.runtime.pool.acquire() as conn:
            rows = await conn.fetch(_REPLAYED, ids)
        return {r["dead_letter_id"]: (r["replayed_at"], r["replayed_by"]) for r in rows}

    def target(self, letter: DeadLetter) -> str | None:
        return letter.original_topic or self.door_topics.get(letter.door)

    async def replay(self, chosen: list[_Letter], *, actor: str) -> list[ReplayOutcome]:
        outcomes: list[ReplayOutcome] = []
        async with self.runtime.pool.acquire() as conn:
            for item in chosen:
                letter = item.letter
                target = self.target(letter)
                if target is None:
                    outcomes.append(ReplayOutcome(dead_letter_id=letter.dead_letter_id, outcome="not_replayable",
                                                  detail=f"no topic to put a {letter.door!r} input back on"))
                    continue
                async with conn.transaction():
                    if await conn.fetchval(_RECORD_REPLAY, letter.dead_letter_id, item.topic, letter.reason, target,
                                           actor) is None:
                        outcomes.append(ReplayOutcome(dead_letter_id=letter.dead_letter_id,
                                                      outcome="already_replayed"))
                        continue
                    consumer = self._consumer_of(target)
                    if consumer is not None:
                        for event_id in _inbox_ids(letter, consumer):
                            await conn.execute(_FORGET, consumer, event_id)
                    await enqueue(conn, [OutboxMessage(
                        topic=target, key=letter.original_key, value=letter.original.encode(),
                        headers={"replayed_from": str(letter.dead_letter_id), "replayed_by": actor})])
                REPLAYED.labels(item.topic, letter.reason).inc()
                outcomes.append(ReplayOutcome(dead_letter_id=letter.dead_letter_id, outcome="replayed"))
        if any(o.outcome == "replayed" for o in outcomes) and self.runtime.relay is not None:
            self.runtime.relay.wake()
        return outcomes


def _inbox_ids(letter: DeadLetter, consumer: str) -> list[uuid.UUID]:
    """The inbox ids the refusal may have claimed: the event's own id, and the id the
    pipeline derives for a record it could not decode (shared/pipeline.py Record.derived_id)."""
    ids = []
    try:
        event_id = json.loads(letter.original).get("event_id")
        ids.append(uuid.UUID(str(event_id)))
    except (ValueError, TypeError, AttributeError):
        pass
    if letter.original_topic is not None and letter.original_offset is not None:
        ids.append(derived_event_id(consumer, "record", letter.original_topic, str(letter.original_partition),
                                    str(letter.original_offset)))
    return ids


def _out(item: _Letter, replays: dict[uuid.UUID, tuple[datetime, str]], *, detail: bool = False) -> DeadLetterOut:
    letter = item.letter
    replayed_at, replayed_by = replays.get(letter.dead_letter_id, (None, None))
    fields = dict(dead_letter_id=letter.dead_letter_id, topic=item.topic, reason=letter.reason, door=letter.door,
                  recorded_at=letter.recorded_at, original_topic=letter.original_topic,
                  original_partition=letter.original_partition, original_offset=letter.original_offset,
                  original_key=letter.original_key, replayed_at=replayed_at, replayed_by=replayed_by)
    if detail:
        return DeadLetterDetail(**fields, errors=letter.errors, original=letter.original)
    return DeadLetterOut(**fields)


def _matches(item: _Letter, reason: str | None, since: datetime | None, until: datetime | None) -> bool:
    letter = item.letter
    return ((reason is None or letter.reason == reason) and (since is None or letter.recorded_at >= since)
            and (until is None or letter.recorded_at < until))


class DeadLetterApiError(Exception):
    """Answered {"detail": {"reason", "msg"}} by the handler create_service_app installs, the
    same in every service, whatever shape the service's own errors take."""

    def __init__(self, status: int, reason: str, msg: str) -> None:
        super().__init__(msg)
        self.status, self.reason, self.msg = status, reason, msg


async def dead_letter_error_handler(_request: Any, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DeadLetterApiError)
    return JSONResponse({"detail": {"reason": exc.reason, "msg": exc.msg}}, status_code=exc.status)


def _refused(refused: AdminKeyRefused) -> Exception:
    return DeadLetterApiError(refused.status, refused.reason, refused.msg)


TIME = "An ISO 8601 time with its offset, e.g. 2026-12-07T08:00:00+01:00"


def _time(value: str | None, name: str) -> datetime | None:
    """A query time: ISO 8601 with an offset (a bare number or a naive time is refused)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise DeadLetterApiError(422, "invalid_time", f"{name}: {TIME}")
    return parsed


def _cursor(position: int) -> str:
    return base64.urlsafe_b64encode(str(position).encode()).decode()


def _position(cursor: str | None) -> int:
    if cursor is None:
        return 0
    try:
        return max(int(base64.urlsafe_b64decode(cursor.encode()).decode()), 0)
    except ValueError:
        raise DeadLetterApiError(422, "invalid_cursor", "the cursor is not one we gave") from None


def dead_letter_router(desk: DeadLetterDesk, *, admin_key: Any, setting: str) -> APIRouter:
    """The routes above, behind the service's admin key (`admin_key()` returns it)."""
    router = APIRouter(prefix="/v1/admin/dead-letters", tags=["dead letters"], responses=_ERRORS,
                       route_class=ExplainedBodyRoute,
                       dependencies=[Depends(admin_key_dependency(admin_key, setting=setting, refusal=_refused))])

    @router.get("", response_model=DeadLetterPage, summary="Dead letters, newest first, by reason and time")
    async def list_dead_letters(reason: str | None = None, since: Annotated[str | None, Query(description=TIME)] = None,
                                until: Annotated[str | None, Query(description=TIME)] = None,
                                limit: Annotated[int, Query(ge=1, le=500)] = 50,
                                cursor: str | None = None) -> DeadLetterPage:
        since, until = _time(since, "since"), _time(until, "until")
        start = _position(cursor)
        matching = [x for x in await desk.letters() if _matches(x, reason, since, until)]
        counts: dict[str, int] = {}
        for x in matching:
            counts[x.letter.reason] = counts.get(x.letter.reason, 0) + 1
        page = matching[start:start + limit]
        replays = await desk.replays([x.letter.dead_letter_id for x in page])
        more = start + limit < len(matching)
        return DeadLetterPage(items=[_out(x, replays) for x in page], counts_by_reason=counts,
                              next_cursor=_cursor(start + limit) if more else None)

    @router.get("/{dead_letter_id}", response_model=DeadLetterDetail, summary="One dead letter, with the original",
                responses={404: {"model": ErrorOut, "description": "No such dead letter"}})
    async def show_dead_letter(dead_letter_id: uuid.UUID) -> DeadLetterOut:
        for x in await desk.letters():
            if x.letter.dead_letter_id == dead_letter_id:
                return _out(x, await desk.replays([dead_letter_id]), detail=True)
        raise DeadLetterApiError(404, "not_found", f"no dead letter {dead_letter_id}")

    @router.post("/replay", response_model=ReplayResult,
                 summary="Put dead letters back on their topic after a fix (each at most once)",
                 # refused by the service's skeleton before the route, in the service's own shape
                 responses={413: {"model": dict[str, Any],
                                  "description": "The body is larger than the service's limit (max_body_bytes)"}})
    async def replay_dead_letters(request: ReplayRequest) -> ReplayResult:
        if (request.ids is None) == (request.reason is None):
            raise DeadLetterApiError(422, "invalid_request", "give either ids or a reason (with since/until if you like)")
        letters = await desk.letters()
        if request.ids is not None:
            by_id = {x.letter.dead_letter_id: x for x in letters}
            chosen = [by_id[i] for i in dict.fromkeys(request.ids) if i in by_id]
            missing = [ReplayOutcome(dead_letter_id=i, outcome="not_found") for i in request.ids if i not in by_id]
        else:
            chosen = sorted((x for x in letters if _matches(x, request.reason, request.since, request.until)),
                            key=lambda x: x.letter.recorded_at)  # oldest first: the order they came in
            missing = []
        outcomes = await desk.replay(chosen, actor=request.actor) + missing
        return ReplayResult(replayed=sum(o.outcome == "replayed" for o in outcomes), outcomes=outcomes)

    return router


# ---- the CLI ------------------------------------------------------------------------------


def _endpoints() -> dict[str, str]:
    import os
    from pathlib import Path

    values = dict(os.environ)
    path = Path(__file__).resolve().parents[1] / ".run" / "endpoints.env"
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                name, _, value = line.partition("=")
                values.setdefault(name.strip(), value.strip())
    return values


def main(argv: list[str] | None = None) -> int:
    import argparse

    import httpx

    parser = argparse.ArgumentParser(prog="python -m shared.deadletters",
                                     description="List, show and replay a service's dead letters.")
    parser.add_argument("service", help="purchases, ledger, rewards, churn or engagement")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="newest first")
    listing.add_argument("--reason")
    listing.add_argument("--since")
    listing.add_argument("--until")
    listing.add_argument("--limit", type=int, default=50)
    show = sub.add_parser("show")
    show.add_argument("dead_letter_id")
    replay = sub.add_parser("replay", help="after a fix: by id(s), or every one of a reason")
    replay.add_argument("ids", nargs="*")
    replay.add_argument("--reason")
    replay.add_argument("--since")
    replay.add_argument("--until")
    replay.add_argument("--actor", required=True, help="who replays (recorded)")
    args = parser.parse_args(argv)

    env = _endpoints()
    prefix = args.service.upper()
    url, key = env.get(f"{prefix}_URL"), env.get(f"{prefix}_ADMIN_API_KEY")
    if not url or not key:
        parser.error(f"{prefix}_URL and {prefix}_ADMIN_API_KEY are needed (make up writes .run/endpoints.env)")
    with httpx.Client(base_url=url, headers={"X-Admin-Key": key}, timeout=60) as client:
        if args.command == "list":
            params = {k: v for k, v in (("reason", args.reason), ("since", args.since), ("until", args.until),
                                        ("limit", args.limit)) if v is not None}
            response = client.get("/v1/admin/dead-letters", params=params)
        elif args.command == "show":
            response = client.get(f"/v1/admin/dead-letters/{args.dead_letter_id}")
        else:
            body: dict[str, Any] = {"actor": args.actor}
            if args.ids:
                body["ids"] = args.ids
            else:
                body.update({k: v for k, v in (("reason", args.reason), ("since", args.since),
                                               ("until", args.until)) if v is not None})
            response = client.post("/v1/admin/dead-letters/replay", json=body)
    print(json.dumps(response.json(), indent=2))
    return 0 if response.is_success else 1


if __name__ == "__main__":
    raise SystemExit(main())
