"""Hostile input for the tests in tests/hostile: a corpus of nasty strings and payload
mutations, Schemathesis cases driven through httpx against a service running in this
process, and readers for /metrics and the services' tables."""

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from prometheus_client.parser import text_string_to_metric_families

# Printable strings that must be stored verbatim (or refused) and never interpreted: SQL,
# markup, format strings, template and path tricks, and unicode that changes how text looks.
INJECTION_STRINGS = [
    "'; DROP TABLE purchases; --",
    "x'); DROP TABLE store_api_keys; --",
    "1' OR '1'='1",
    '" OR ""="',
    "admin'--",
    "'; SELECT pg_sleep(5); --",
    "$1; TRUNCATE inbox",
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "{{7*7}}${7*7}",
    "${jndi:ldap://example.invalid/a}",
    "%s%s%s%n",
    "../../../etc/passwd",
    "\\u0000 \\x00 \\",
    "\u202eevil\u202c",  # right-to-left override
    "Zalgo\u0301\u0302\u0303\u0304",
    "\U0001f4a9\U0001f389\u00e9\u00df\u4e2d\u6587",
    "\ufeffbom",
    "\u2028line\u2029para",
]

# Characters PostgreSQL text cannot hold (NUL), terminal escapes and line breaks: identifiers
# with these are refused by the purchases contract.
CONTROL_STRINGS = ["\x00", "a\x00b", "\x1b[31mred", "two\nlines", "tab\there", "\x7f"]

PURCHASE_STRING_FIELDS = ("purchase_id", "store_id", "customer_id")
LINE_STRING_FIELDS = ("line_id", "sku", "category")


# ---- mutated payloads -------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b'{"purchase_id": ' + b"[" * depth + b"]" * depth + b"}"


def kafka_mutations(valid: dict[str, Any]) -> list[tuple[str, bytes]]:
    """A fixed, named list of broken variants of a valid purchase, as raw Kafka values.
    Every one must be refused (none is a valid purchase)."""
    text = json.dumps(valid).encode()
    line = valid["lines"][0]
    out: list[tuple[str, bytes]] = [
        ("empty", b""),
        ("random_bytes", bytes(range(256)) * 4),
        ("invalid_utf8", text.replace(b'"sale"', b'"s\xffle"')),
        ("utf16", json.dumps(valid).encode("utf-16")),
        ("bom_then_json", b"\xef\xbb\xbf" + text),
        ("json_null", b"null"),
        ("json_array", b"[" + text + b"]"),
        ("json_string", json.dumps(json.dumps(valid)).encode()),
        ("json_number", b"12.50"),
        ("nan_total", text.replace(f'"total": "{valid["total"]}"'.encode(), b'"total": NaN')),
        ("infinity_price", text.replace(f'"unit_price": "{line["unit_price"]}"'.encode(), b'"unit_price": Infinity', 1)),
        ("huge_quantity", text.replace(f'"quantity": {line["quantity"]}'.encode(), b'"quantity": ' + b"9" * 400, 1)),
        ("huge_exponent_price", text.replace(f'"unit_price": "{line["unit_price"]}"'.encode(), b'"unit_price": "1e999999"', 1)),
        ("negative_price", text.replace(f'"unit_price": "{line["unit_price"]}"'.encode(), b'"unit_price": "-1"', 1)),
        ("lone_surrogate_id", text.replace(f'"{valid["purchase_id"]}"'.encode(), b'"\\ud800"')),
        ("nul_escape_in_id", text.replace(f'"{valid["purchase_id"]}"'.encode(), b'"p\\u0000x"')),
        ("deep_nesting", nested(100_000)),
        ("duplicate_keys_conflict", text[:-1] + b', "total": "0.01"}'),
        ("unknown_field", json.dumps({**valid, "is_admin": True}).encode()),
        ("sale_with_original", json.dumps({**valid, "original_purchase_id": "p-x"}).encode()),
        ("ten_thousand_lines", json.dumps({**valid, "lines": [
            {**line, "line_id": f"l{i}"} for i in range(10_000)]}).encode()),
        ("no_lines", json.dumps({**valid, "lines": [], "total": "0"}).encode()),
    ]
    for i in (1, len(text) // 3, len(text) // 2, len(text) - 1):
        out.append((f"truncated_at_{i}", text[:i]))
    for name in ("purchase_id", "type", "source", "store_id", "occurred_at", "currency", "lines", "total"):
        out.append((f"missing_{name}", json.dumps({k: v for k, v in valid.items() if k != name}).encode()))
        out.append((f"null_{name}", json.dumps({**valid, name: None}).encode()))
    for name, wrong in (("lines", {"l1": 1}), ("occurred_at", 1700000000), ("total", [1]), ("type", "gift"),
                        ("source", "ftp"), ("currency", "zł"), ("purchase_id", {"$ne": None}), ("store_id", True)):
        out.append((f"wrong_type_{name}", json.dumps({**valid, name: wrong}).encode()))
    for s in CONTROL_STRINGS:
        out.append((f"control_in_purchase_id_{s.encode().hex()}", json.dumps({**valid, "purchase_id": s}).encode()))
    return out


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=20), st.sampled_from(INJECTION_STRINGS + CONTROL_STRINGS))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=max_leaves)


def mutated_purchases(valid: Callable[[], dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid purchase (fresh ids) with one field, or one field of its first line, replaced
    by an arbitrary JSON value or removed."""
    top = st.sampled_from(sorted(valid().keys()))
    line_fields = st.sampled_from(["line_id", "sku", "category", "quantity", "unit_price", "discount"])

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        body = valid()
        if draw(st.booleans()):
            target, name = body, draw(top)
        else:
            target, name = body["lines"][0], draw(line_fields)
        if draw(st.integers(0, 5)) == 0:
            target.pop(name, None)
        else:
            target[name] = draw(json_values())
        return body

    return build()


def json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indices) into a JSON document, the root excluded."""
    paths = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        paths.append(prefix + (k,))
        paths.extend(json_paths(v, prefix + (k,)))
    return paths


_DELETE = object()


def replaced(document: Any, path: tuple, new: Any) -> Any:
    """A deep copy of `document` with the value at `path` replaced (or removed: _DELETE)."""
    copy = json.loads(json.dumps(document))
    target = copy
    for k in path[:-1]:
        target = target[k]
    if new is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = new
    return copy


def mutated_documents(build: Callable[[], Any], *, skip: Iterable[tuple] = ()) -> st.SearchStrategy[Any]:
    """A document from `build()` with one value anywhere in it replaced by an arbitrary JSON
    value, a hostile string, a huge or odd number, or removed (paths in `skip` left alone)."""
    skipped = set(skip)
    oddities = st.sampled_from([10**400, -1, 0, 1e308, -0.0, "1e999999", "NaN", "-0", "", " ", "0x10", [], {}])

    @st.composite
    def build_one(draw: st.DrawFn) -> Any:
        document = build()
        path = draw(st.sampled_from([p for p in json_paths(document) if p not in skipped]))
        new = draw(st.one_of(json_values(), oddities, st.just(_DELETE)))
        return replaced(document, path, new)

    return build_one()


def collect(strategy: st.SearchStrategy[Any], max_examples: int) -> list[Any]:
    """Examples of `strategy`, reproducibly (derandomized), without running a test per
    example: the examples are then sent to a running service in one go. HOSTILE_SCALE=k
    asks for k times as many (a longer, deeper local run)."""
    out: list[Any] = []
    max_examples *= int(os.environ.get("HOSTILE_SCALE", "1"))

    @given(strategy)
    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def gather(example: Any) -> None:
        out.append(example)

    try:
        gather()
    except Unsatisfiable:
        pass  # nothing can be generated in this mode (e.g. no parameters to break)
    return out


# ---- e-shop webhooks ----------------------------------------------------------------------

WEBHOOK_FIXTURES = Path(__file__).parents[1] / "fixtures" / "webhooks"


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((WEBHOOK_FIXTURES / name).read_text())


def _fresh_int() -> int:
    return int(uuid.uuid4().int % 10**12)


def shopify_order() -> dict[str, Any]:
    """The orders/paid fixture with a fresh id and current timestamps."""
    now = datetime.now(timezone.utc)
    return {**_fixture("shopify_orders_paid.json"), "id": _fresh_int(),
            "processed_at": (now - timedelta(minutes=5)).isoformat(), "created_at": now.isoformat(),
            "updated_at": now.isoformat()}


def shopify_refund(order_id: int) -> dict[str, Any]:
    now = datetime.now(timezone.utc).isoformat()
    return {**_fixture("shopify_refunds_create.json"), "id": _fresh_int(), "order_id": order_id, "created_at": now,
            "processed_at": now}


def woo_order() -> dict[str, Any]:
    now = datetime.now(timezone.utc).replace(microsecond=0, tzinfo=None)
    return {**_fixture("woocommerce_order_processing.json"), "id": _fresh_int(),
            "date_created_gmt": (now - timedelta(minutes=5)).isoformat(), "date_modified_gmt": now.isoformat(),
            "date_paid_gmt": now.isoformat()}


# ---- Schemathesis ------------------------------------------------------------------------

def _checks() -> list[Any]:
    # Imported here: only the OpenAPI fuzz tests need Schemathesis (a test-only dependency).
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
    )

    return [not_a_server_error, content_type_conformance, response_headers_conformance, response_schema_conformance,
            negative_data_rejection]


def max_examples() -> int:
    """Examples per operation and generation mode; HOSTILE_MAX_EXAMPLES raises it for a
    longer local run."""
    return int(os.environ.get("HOSTILE_MAX_EXAMPLES", "15"))


@dataclass
class FuzzCase:
    operation: Any  # schemathesis APIOperation
    mode: Any  # schemathesis GenerationMode
    case: Any  # schemathesis Case


@dataclass
class FuzzReport:
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    undocumented: dict[tuple[str, int], str] = field(default_factory=dict)  # (operation, status) -> example
    seconds: dict[str, float] = field(default_factory=dict)  # per operation, sending and checking

    def summary(self) -> str:
        slowest = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:3]
        return (f"sent={self.sent} statuses={dict(sorted(self.statuses.items()))} "
                f"slowest={[(op, round(s, 1)) for op, s in slowest]}")


def _breakable(raw: dict[str, Any]) -> bool:
    """Whether the schema can call any request to this operation invalid: it has a body, or
    a parameter that is required or more than free text. (Searching for a negative case of
    an operation that has none costs seconds before Hypothesis gives up.)"""
    if "requestBody" in raw:
        return True
    for parameter in raw.get("parameters", []):
        if parameter.get("required") and parameter.get("in") != "path":
            return True
        schema = parameter.get("schema", {})
        variants = schema.get("anyOf", [schema])
        for v in variants:
            if v.get("type") not in ("string", "null") or set(v) - {"type", "title", "description", "default"}:
                return True
    return False


def openapi_cases(app: Any, *, max_examples_per_mode: int, skip: Iterable[str] = ()) -> list[FuzzCase]:
    """Positive and negative Schemathesis cases for every operation of the app's OpenAPI
    document. Built before the service starts: generation is CPU-bound and would starve
    the event loop (consumer heartbeats) of a running service."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(app.openapi())
    # A body over the service's limit is refused (413) before it is read: a rejection as
    # good as a 422 for an invalid body too large to look at (Schemathesis' list lacks it).
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    skipped = set(skip)
    cases = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label in skipped:
            continue
        modes = [GenerationMode.POSITIVE]
        if _breakable(operation.definition.raw):
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            for case in collect(operation.as_strategy(generation_mode=mode), max_examples_per_mode):
                cases.append(FuzzCase(operation, mode, case))
    return cases


async def send_case(client: httpx.AsyncClient, case: Any, headers: dict[str, str]) -> httpx.Response | None:
    """Send a Schemathesis case with httpx (to an in-process ASGI app). None when the
    case cannot be put on the wire at all (e.g. a header value outside latin-1)."""
    kw = case.as_transport_kwargs(base_url=str(client.base_url).rstrip("/"), headers=headers)
    # The credentials win over whatever the case generated for the same header names.
    sent = {k: v for k, v in (kw.get("headers") or {}).items() if k.lower() not in {h.lower() for h in headers}}
    request: dict[str, Any] = {"method": kw["method"], "url": kw["url"], "headers": {**sent, **headers},
                               "params": kw.get("params") or None}
    if "json" in kw:
        request["json"] = kw["json"]
    elif kw.get("data") is not None:
        data = kw["data"]
        request["content"] = data if isinstance(data, (bytes, str)) else json.dumps(data)
    try:
        return await client.request(**request)
    except (UnicodeEncodeError, httpx.InvalidURL, httpx.LocalProtocolError):
        return None


def _breaks_headers(case: Any) -> bool:
    """A negative case whose violation is in its headers (e.g. a required Authorization
    left out): adding credentials back would make it valid again."""
    from schemathesis import GenerationMode
    from schemathesis.core.parameters import ParameterLocation

    info = case.meta.components.get(ParameterLocation.HEADER) if case.meta is not None else None
    return info is not None and info.mode == GenerationMode.NEGATIVE


def describe(request: httpx.Request) -> str:
    """The request, short enough for an assertion message: enough to reproduce it."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("user-agent", "accept", "accept-encoding",
                                                                             "connection", "x-schemathesis-testcaseid")}
    return f"{request.method} {request.url} headers={headers} body={request.content[:300]!r}"


async def fuzz(client: httpx.AsyncClient, cases: list[FuzzCase], *, auth: Callable[[Any], dict[str, str]],
               known_gaps: Iterable[tuple[str, int]] = (), lenient: Iterable[str] = ()) -> FuzzReport:
    """Send every case with the auth headers `auth(operation)` and validate each response.
    A status the operation does not document goes to report.undocumented; the other checks
    are Schemathesis'. `known_gaps`: (operation, status) pairs already reported as not
    documented (or documented with another body): exempt from both. `lenient`: operations
    known to accept some values their schema forbids (negative data rejection not checked)."""
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import negative_data_rejection, response_schema_conformance

    checks = _checks()
    gaps, accepting = set(known_gaps), set(lenient)
    report = FuzzReport()
    for fc in cases:
        started = time.perf_counter()
        response = await send_case(client, fc.case, {} if _breaks_headers(fc.case) else auth(fc.operation))
        if response is None:
            continue
        report.sent += 1
        report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
        known = (fc.operation.label, response.status_code) in gaps
        documented = set(fc.operation.definition.raw.get("responses", {}))
        if str(response.status_code) not in documented and "default" not in documented and not known:
            report.undocumented.setdefault((fc.operation.label, response.status_code),
                                           f"{response.text[:300]} <- {describe(response.request)}")
        exempt = {response_schema_conformance} if known else set()
        if fc.operation.label in accepting:
            exempt.add(negative_data_rejection)
        try:
            fc.case.validate_response(response, checks=[c for c in checks if c not in exempt])
        except FailureGroup as group:
            for failure in group.exceptions:
                report.failures.append(f"{fc.operation.label} [{fc.mode.value}] {failure.title}: "
                                       f"{str(failure.message)[:400]} -> {response.status_code} {response.text[:300]} "
                                       f"<- {describe(response.request)}")
        report.seconds[fc.operation.label] = report.seconds.get(fc.operation.label, 0.0) + time.perf_counter() - started
    return report


@contextlib.asynccontextmanager
async def serving(app: Any, base_url: str):
    """A service app already built (its OpenAPI cases generated) run in this process: its
    lifespan starts consumers, relay and pool; the client talks to it over ASGI."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url=base_url, timeout=30) as client:
            yield client


@contextlib.asynccontextmanager
async def running_purchases(settings: Any, *, api_keys: dict[str, str] | None = None):
    """The purchases service in this process with store API keys provisioned; a 500 comes
    back as a response (not an exception) so that assertions can show it."""
    from services.purchases import repository
    from services.purchases.main import create_app

    app = create_app(settings)
    async with serving(app, "http://purchases") as client:
        for key, store in (api_keys or {"key-store-1": "store-1"}).items():
            await repository.add_api_key(app.state.runtime.pool, key=key, store_id=store)
        yield app, client


# ---- observations -------------------------------------------------------------------------


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """The value of one sample of the service's /metrics (0 when absent)."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def metric_total(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels` (e.g. all reasons of
    one door)."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    return sum(sample.value for family in text_string_to_metric_families(response.text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


# Tables that a background task empties (the relay deletes outbox rows once the broker has
# them): their row count depends on when it last ran. What they say instead is how many rows
# were ever written, which only the service's own writes change: the ids their sequence issued.
_WRITTEN_NOT_PRESENT = {"outbox": "id"}


async def table_counts(dsn: str, schema: str) -> dict[str, int]:
    """Rows per table of a service's schema: proves tables still exist and nothing slipped in.
    For the outbox, the rows ever written (see _WRITTEN_NOT_PRESENT), so that two counts taken
    while the relay runs are equal unless something was enqueued between them."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)]
        counts = {}
        for t in sorted(tables):
            if t in _WRITTEN_NOT_PRESENT:
                sequence = await conn.fetchval("SELECT pg_get_serial_sequence($1, $2)", f'"{schema}"."{t}"',
                                               _WRITTEN_NOT_PRESENT[t])
                counts[t] = await conn.fetchval(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {sequence}")
            else:
                counts[t] = await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{t}"')
        return counts
    finally:
        await conn.close()


@dataclass(frozen=True)
class Produced:
    label: str
    value: bytes
    partition: int
    offset: int


async def produce_raw(bootstrap: str, topic: str, items: list[tuple[str, bytes]], *, key: bytes | None,
                      headers: list[tuple[str, bytes]] | None = None) -> list[Produced]:
    """Produce raw values (all with one key: one partition, in this order) and return where
    each landed, so that dead letters can be matched to their inputs by offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=8 * 1024 * 1024,
                                max_batch_size=1024 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key, headers=headers) for _, value in items]
        out = []
        for (label, value), future in zip(items, futures):
            meta = await future
            out.append(Produced(label, value, meta.partition, meta.offset))
        return out
    finally:
        await producer.stop()


async def eventually(predicate: Callable[[], Any], *, timeout_s: float = 20.0, interval_s: float = 0.1) -> Any:
    """Poll an async predicate until it returns a truthy value (returned) or time runs out."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last value: {value!r})")
        await asyncio.sleep(interval_s)


def unique_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"
