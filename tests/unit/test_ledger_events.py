"""The ledger's hand-built PointsEarned JSON (its hot path) is the contract's PointsEarned."""

import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from services.ledger import domain as d
from services.ledger.program import Program
from services.ledger.service import Emitter, Ledger, ProgramStore, points_earned_payload
from services.ledger.settings import LedgerSettings
from shared.events.points import PointsEarned
from shared.events.purchases import PurchaseLine, PurchasePayload

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def earned(pending_days: int) -> tuple[d.Earned, PurchasePayload]:
    program = Program(pending_days=pending_days, category_multipliers={"wine": Decimal("1.5")})
    purchase = PurchasePayload(
        purchase_id="p-1", type="sale", source="eshop", store_id="s", occurred_at=NOW, currency="PLN",
        total=Decimal("33.30"), door="kafka",
        lines=[PurchaseLine(line_id="l1", sku="w", category="wine", quantity=1, unit_price=Decimal("33.30"))],
    )
    book = d.CustomerBook.new("c-1", "Bronze")
    journal = d.Journal({**d.new_program_accounts(), **book.accounts()})
    [o] = d.earn(book, journal, program, 7, purchase=purchase, now=NOW)
    return o, purchase


def test_the_fast_points_earned_json_validates_as_the_contract_model_with_the_same_content():
    for pending_days in (14, 0):
        o, purchase = earned(pending_days)
        settings = LedgerSettings(topic_prefix="x.", program_file=Path("services/ledger/program.yaml"))
        out = Emitter(Ledger(settings, ProgramStore(settings.program_file)), NOW)
        out.emit_json("PointsEarned", points_earned_payload(o, purchase, 7), customer_id="c-1", cause="earn:p-1",
                      correlation_id="corr", causation_id="cause")
        [message] = out.messages
        event = PointsEarned.model_validate_json(message.value)
        p = event.payload
        assert (message.topic, message.key, message.headers["type"]) == ("x.points.events", "c-1", "PointsEarned")
        assert (event.customer_id, event.correlation_id, event.causation_id, event.occurred_at) == (
            "c-1", "corr", "cause", NOW)
        assert (p.amount_points, p.rule_version, p.tier_multiplier, p.source) == (49, 7, "1.0", "eshop")
        assert p.pending is (pending_days > 0)
        assert p.matures_at == (o.lot.matures_at if pending_days else None) and p.expires_at == o.lot.expires_at
        assert p.balance.pending_points + p.balance.available_points == 49
        assert [b["rule"] for b in p.breakdown] == ["base 1 pt per 1.00 PLN", "category wine x1.5",
                                                    "rounding: floor per purchase"]
        # the same event through pydantic serialises to the same JSON document
        assert json.loads(event.model_dump_json())["payload"]["breakdown"] == json.loads(message.value)["payload"]["breakdown"]


def test_the_ledgers_fast_id_derivation_gives_the_shared_ids():
    from shared.events import derived_event_id as shared_derived_event_id

    for parts in (("ledger", "earn", "p-1"), ("ledger", "lot", "adjustment", "x"), ("a",), ("ż", "\x00", "")):
        assert d.derived_event_id(*parts) == shared_derived_event_id(*parts)
