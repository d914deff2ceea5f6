"""The purchases service writes PurchaseRecorded / ReturnRecorded from a template (its hot
path): the JSON must be the contract's model with the same content, whatever the strings."""

import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.purchases.domain import LineIn, PurchaseIn
from shared.events import SCHEMA_VERSION
from shared.events.purchases import PurchasePayload, PurchaseRecorded, ReturnRecorded, purchase_event_json

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
HOSTILE = 'q"uote \\back\\slash zażółć 🎉 </script> \\u0000 \u2028'


def purchase(text: str = "p-1", *, kind: str = "sale", offset_h: int = 0) -> PurchaseIn:
    lines = [LineIn(line_id=f"{text}-1", sku=text, category=text, quantity=3, unit_price=Decimal("3.4900"),
                    discount=Decimal("0.5")),
             LineIn(line_id="2", sku="S", category="c", quantity=1, unit_price=Decimal("1E+2"))]
    return PurchaseIn(purchase_id=text, type=kind, original_purchase_id="orig" if kind == "return" else None,
                      source="eshop", store_id=text, customer_id=text,
                      occurred_at=NOW.astimezone(timezone(timedelta(hours=offset_h))), currency="PLN",
                      lines=lines, total=Decimal("109.97"))


def expected(cls, p: PurchaseIn, event_id: uuid.UUID, customer_id: str | None, correlation_id: str):
    payload = PurchasePayload(purchase_id=p.purchase_id, type=p.type, original_purchase_id=p.original_purchase_id,
                              source=p.source, store_id=p.store_id, occurred_at=p.occurred_at, currency=p.currency,
                              lines=[line.model_dump() for line in p.lines], total=p.total, door="kafka")
    return cls(event_id=event_id, occurred_at=p.occurred_at, recorded_at=NOW, producer="purchases",
               correlation_id=correlation_id, customer_id=customer_id, payload=payload)


@pytest.mark.parametrize("cls,kind", [(PurchaseRecorded, "sale"), (ReturnRecorded, "return")])
@pytest.mark.parametrize("text,customer,offset_h", [("p-1", "c-1", 0), (HOSTILE, None, 2), ("x", HOSTILE, -5)])
def test_the_template_is_the_contract_model(cls, kind, text, customer, offset_h):
    p = purchase(text, kind=kind, offset_h=offset_h)
    event_id = uuid.uuid4()
    raw = purchase_event_json(event_type=cls.__name__, event_id=str(event_id), recorded_at=NOW, producer="purchases",
                              correlation_id=text, customer_id=customer, purchase=p, door="kafka")
    assert raw.isascii()
    parsed = cls.model_validate_json(raw)
    assert parsed == expected(cls, p, event_id, customer, text)
    assert parsed.schema_version == SCHEMA_VERSION
    # No field more or less than the model's own serialisation, at every level.
    mine, model = json.loads(raw), json.loads(expected(cls, p, event_id, customer, text).model_dump_json())
    assert mine.keys() == model.keys() and mine["payload"].keys() == model["payload"].keys()
    assert [line.keys() for line in mine["payload"]["lines"]] == [line.keys() for line in model["payload"]["lines"]]
    assert json.loads(raw)["payload"]["lines"][0]["unit_price"] == "3.4900"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40),
       st.one_of(st.none(), st.text(min_size=1, max_size=20)))
def test_any_identifier_round_trips(text, correlation):
    p = purchase(text)
    raw = purchase_event_json(event_type="PurchaseRecorded", event_id=str(uuid.uuid4()), recorded_at=NOW,
                              producer="purchases", correlation_id=correlation or "c", customer_id=text, purchase=p,
                              door="http")
    parsed = PurchaseRecorded.model_validate_json(raw)
    assert (parsed.payload.purchase_id, parsed.payload.store_id, parsed.customer_id) == (text, text, text)
    assert parsed.correlation_id == (correlation or "c")
    assert [line.net_amount for line in parsed.payload.lines] == [line.net_amount for line in p.lines]
