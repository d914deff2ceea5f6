"""shared/events/wire.py against the contract: on valid events the fast decoder accepts and
gives the values the pydantic models give; on hostile ones, whatever msgspec accepts pydantic
accepts with the same values, and everything else goes to the contract's decoder (its
refusals, its reasons)."""

import copy
import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.ledger.handlers import PURCHASE_EVENT
from shared.events.purchases import purchase_event_json
from shared.events.wire import _PURCHASE_EVENTS, fast_or
from shared.pipeline import Record, Refused, pydantic_decoder

ENVELOPE = ("event_id", "type", "schema_version", "occurred_at", "recorded_at", "producer", "correlation_id",
            "causation_id", "customer_id")
PAYLOAD = ("purchase_id", "type", "original_purchase_id", "source", "store_id", "occurred_at", "currency", "total",
           "door", "history", "import_policy")
LINE = ("line_id", "sku", "category", "quantity", "unit_price", "discount", "net_amount")


def same(a, b) -> bool:
    if isinstance(a, datetime) or isinstance(b, datetime):
        return a == b and a.utcoffset() == b.utcoffset()
    if isinstance(a, Decimal) or isinstance(b, Decimal):
        return str(a) == str(b)
    return a == b and type(a) is type(b)


def assert_equal(fast, contract) -> None:
    for name in ENVELOPE:
        assert same(getattr(fast, name), getattr(contract, name)), name
    fp, cp = fast.payload, contract.payload
    for name in PAYLOAD + (("claimed_at",) if contract.type == "PurchaseClaimed" else ()):
        assert same(getattr(fp, name), getattr(cp, name)), name
    assert len(fp.lines) == len(cp.lines)
    for fl, cl in zip(fp.lines, cp.lines, strict=True):
        for name in LINE:
            assert same(getattr(fl, name), getattr(cl, name)), name


texts = st.text(st.characters(codec="utf-8"), max_size=12)
money = st.decimals(min_value=-10**9, max_value=10**9, places=2, allow_nan=False, allow_infinity=False)
offsets = st.sampled_from([timezone.utc, timezone(timedelta(hours=1)), timezone(timedelta(hours=-5, minutes=-30))])
times = st.builds(lambda d, tz: d.replace(tzinfo=tz), st.datetimes(min_value=datetime(1990, 1, 1),
                                                                    max_value=datetime(2100, 1, 1)), offsets)
lines = st.lists(st.builds(SimpleNamespace, line_id=texts, sku=texts, category=texts,
                           quantity=st.integers(-5, 10**6), unit_price=money, discount=money), max_size=4)


@st.composite
def events(draw) -> bytes:
    kind = draw(st.sampled_from(["PurchaseRecorded", "ReturnRecorded", "PurchaseClaimed"]))
    purchase = SimpleNamespace(
        purchase_id=draw(texts), type=draw(st.sampled_from(["sale", "return"])),
        original_purchase_id=draw(st.none() | texts), source=draw(st.sampled_from(["pos", "eshop"])),
        store_id=draw(texts), occurred_at=draw(times), currency=draw(texts), lines=draw(lines), total=draw(money))
    history = draw(st.booleans())
    raw = purchase_event_json(
        event_type=kind, event_id=str(uuid.uuid4()), recorded_at=draw(times), producer=draw(texts),
        correlation_id=draw(texts), customer_id=draw(st.none() | texts), purchase=purchase, door=draw(texts),
        history=history, import_policy=draw(st.sampled_from(["analytics", "as-earned"])) if history else None)
    if kind == "PurchaseClaimed":
        doc = json.loads(raw)
        doc["payload"]["claimed_at"] = draw(times).isoformat()
        raw = json.dumps(doc).encode()
    return raw


def contract(raw: bytes):
    return PURCHASE_EVENT.validate_json(raw)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_valid_events_take_the_fast_path_with_the_contracts_values(raw):
    fast = _PURCHASE_EVENTS.decode(raw)  # accepted: what our producer writes is the fast subset
    assert_equal(fast, contract(raw))


HOSTILE_VALUES = [
    None, True, 0, -1, 1.5, 19.99, 1e400, 0.10000000000000001, 12345678901234567890.12345, "", " 1.5", "1.5 ", "1e3",
    "NaN", "Infinity", "-0", "+1", "1_000", "\uff11\uff12", "0x10", "1.", ".5", "19.990", [], {}, [0, [1, 2, 5], -1],
    "2024-01-01T00:00:00", "2024-01-01T00:00:00.1234567Z", "2024-01-01T00:00:00.123456789+01:00",
    "2024-01-01 00:00:00Z", "2024-01-01T00:00Z", "2024-01-01T00:00:00,5Z", "2024-01-01T23:59:60Z",
    "2024-01-01T00:00:00+0100", "2024-01-01t00:00:00z", "1700000000", 1700000000, "2024-02-30T00:00:00Z",
    "00000000-0000-0000-0000-000000000000", "0" * 32, "urn:uuid:" + "0" * 32, "{" + "0" * 32 + "}",
    "\ud800", "sale", "return", "pos", "eshop", "analytics", "PurchaseClaimed", "ReturnRecorded", "Unknown", 2**64,
    2.0, "2",
]


def paths(doc, prefix=()):
    """Every place in the document a value (or a key) sits."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield prefix + (k,)
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield prefix + (i,)
            yield from paths(v, prefix + (i,))


@st.composite
def hostile(draw) -> bytes:
    doc = json.loads(draw(events()))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths(doc))))
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "extra"]))
        if action == "replace":
            parent[where[-1]] = copy.deepcopy(draw(st.sampled_from(HOSTILE_VALUES)))  # never shared: no cycles
        elif action == "delete":
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[draw(texts)] = copy.deepcopy(draw(st.sampled_from(HOSTILE_VALUES)))
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(hostile())
def test_whatever_msgspec_accepts_the_contract_accepts_with_the_same_values(raw):
    decode = fast_or(pydantic_decoder(PURCHASE_EVENT))
    try:
        got = decode(Record(raw, None, "t", 0, 0, ()))
    except Refused:
        with pytest.raises(ValidationError):
            contract(raw)  # refused by the contract itself, with its reasons
        return
    if type(got).__module__ == "shared.events.wire":  # msgspec accepted it
        assert_equal(got, contract(raw))


def test_what_the_fast_subset_leaves_out_goes_to_the_contract():
    raw = json.loads(purchase_event_json(
        event_type="PurchaseRecorded", event_id=str(uuid.uuid4()), recorded_at=datetime.now(timezone.utc),
        producer="purchases", correlation_id="c", customer_id="c1", door="kafka",
        purchase=SimpleNamespace(purchase_id="p", type="sale", original_purchase_id=None, source="pos", store_id="s",
                                 occurred_at=datetime.now(timezone.utc), currency="PLN", total=Decimal("5"),
                                 lines=[SimpleNamespace(line_id="1", sku="a", category="c", quantity=1,
                                                        unit_price=Decimal("5"), discount=Decimal("0"))])))
    decode = fast_or(pydantic_decoder(PURCHASE_EVENT))
    as_number = json.dumps({**raw, "payload": {**raw["payload"], "total": 5}}).encode()
    assert type(decode(Record(as_number, None, "t", 0, 0, ()))).__module__ == "shared.events.purchases"
    naive = json.dumps({**raw, "recorded_at": "2024-01-01T00:00:00"}).encode()
    with pytest.raises(Refused) as refused:
        decode(Record(naive, None, "t", 0, 0, ()))
    assert refused.value.reason == "schema"  # the contract's refusal, with its reason
    assert type(decode(Record(json.dumps(raw).encode(), None, "t", 0, 0, ()))).__module__ == "shared.events.wire"
    deep = json.dumps({**raw, "extra": "[" * 100_000 + "]" * 100_000}).replace('"[', "[").replace(']"', "]").encode()
    with pytest.raises(Refused):  # msgspec's RecursionError is not a crash: the contract refuses it
        decode(Record(deep, None, "t", 0, 0, ()))
