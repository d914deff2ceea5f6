"""The ledger's hand-written PointsEarned JSON (its hot path) is the contract's PointsEarned,
whatever the strings in it."""

import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.ledger import domain as d
from services.ledger.program import Program
from services.ledger.service import Emitter, Ledger, _breakdown_json, _dumps
from services.ledger.versions import ProgramStore
from services.ledger.settings import LedgerSettings
from shared.events.points import PointsEarned, PointsEarnedPayload
from shared.events.purchases import PurchaseLine, PurchasePayload

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
HOSTILE = 'q"uote \\back\\slash \n\t\x01 zażółć 🎉 </script> \\u0000'


def earned(pending_days: int, text: str = "p-1") -> tuple[d.Earned, PurchasePayload]:
    program = Program(pending_days=pending_days, category_multipliers={text: Decimal("1.5")})
    purchase = PurchasePayload(
        purchase_id=text, type="sale", source="eshop", store_id="s", occurred_at=NOW, currency="PLN",
        total=Decimal("33.30"), door="kafka",
        lines=[PurchaseLine(line_id="l1", sku=text, category=text, quantity=1, unit_price=Decimal("33.30"))],
    )
    book = d.CustomerBook.new(text, "Bronze")
    journal = d.Journal({**d.new_program_accounts(), **book.accounts()})
    [o] = d.earn(book, journal, program, 7, purchase=purchase, now=NOW)
    return o, purchase


@pytest.mark.parametrize("pending_days,text", [(14, "p-1"), (0, "p-1"), (14, HOSTILE)])
def test_the_fast_points_earned_json_is_the_contract_model_with_the_same_content(pending_days, text):
    o, purchase = earned(pending_days, text)
    settings = LedgerSettings(topic_prefix="x.", program_file=Path("services/ledger/program.yaml"))
    out = Emitter(Ledger(settings, ProgramStore(settings.program_file)), NOW)
    out.emit_points_earned(o, purchase, 7, correlation_id=text, causation_id="cause")
    [message] = out.messages
    event = PointsEarned.model_validate_json(message.value)
    p = event.payload
    assert (message.topic, message.key, message.headers["type"]) == ("x.points.events", text, "PointsEarned")
    assert (event.customer_id, event.correlation_id, event.causation_id, event.occurred_at) == (
        text, text, "cause", NOW)
    # the same content as the pydantic model built the ordinary way
    expected = PointsEarnedPayload(
        amount_points=49, balance=p.balance, purchase_id=text, source="eshop", rule_version=7,
        pending=pending_days > 0, matures_at=o.lot.matures_at if pending_days else None,
        expires_at=o.lot.expires_at, tier_multiplier="1.0", breakdown=o.earning.breakdown,
    )
    assert p == expected
    assert p.balance.pending_points + p.balance.available_points == 49 and p.balance.tier == "Bronze"
    assert [b["rule"] for b in p.breakdown] == ["base 1 pt per 1.00 PLN", f"category {text} x1.5",
                                                "rounding: floor per purchase"]
    assert json.loads(message.value)["event_id"] == str(event.event_id)


def test_the_fast_id_derivation_gives_the_uuid5_ids():
    import uuid

    from shared.events import EVENT_NAMESPACE, derived_event_id

    for parts in (("ledger", "earn", "p-1"), ("ledger", "lot", "adjustment", "x"), ("a",), ("ż", "\x00", "")):
        assert derived_event_id(*parts) == uuid.uuid5(EVENT_NAMESPACE, "\x1f".join(parts))


@given(st.lists(st.fixed_dictionaries({"rule": st.text(), "points": st.text()})
                | st.fixed_dictionaries({"rule": st.text(), "points": st.integers()}), max_size=4))
def test_the_breakdown_template_writes_what_the_json_encoder_writes(breakdown):
    written = _breakdown_json(breakdown)
    assert written.isascii() and json.loads(written) == json.loads(_dumps(breakdown))
