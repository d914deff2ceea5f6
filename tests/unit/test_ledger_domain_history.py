"""The ledger's rules for imported history and business time: what each policy earns, the
tier at a purchase's own time, the store in a purchase's identity, returns at the sale's
rate, a late return of an expired lot."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from services.ledger import domain as d
from services.ledger.program import Program
from services.ledger.earning import _returned_lines
from services.purchases.handlers import inbound_from_record
from services.purchases.domain import Rejection
from shared.events.purchases import PurchaseLine, PurchasePayload
from shared.pipeline import Record

T0 = datetime(2025, 1, 10, 12, tzinfo=timezone.utc)
PROGRAM = Program()  # Bronze x1, Silver x1.25 from 1,000 qualifying points, Gold x1.5 from 5,000


def sale(amount: str, *, at: datetime, purchase_id: str = "p", store: str = "s1", currency: str = "PLN",
         history: bool = False, policy: str | None = None) -> PurchasePayload:
    return PurchasePayload(purchase_id=purchase_id, type="sale", source="pos", store_id=store, occurred_at=at,
                           currency=currency, door="import" if history else "kafka", total=Decimal(amount),
                           history=history, import_policy=policy,
                           lines=[PurchaseLine(line_id="1", sku="a", category="grocery", quantity=1,
                                               unit_price=Decimal(amount))])


def earn_all(purchases: list[PurchasePayload], *, now: datetime, program: Program = PROGRAM) -> d.CustomerBook:
    book = d.CustomerBook.new("c", "Bronze")
    journal = d.Journal({**d.new_program_accounts(), **book.accounts()})
    for p in purchases:
        d.earn(book, journal, program, 1, purchase=p, now=now, history=p.history)
    return book


def test_analytics_history_earns_nothing_as_earned_history_and_live_purchases_earn():
    assert d.history_earns(False, None) is True
    assert d.history_earns(True, "as-earned") is True
    assert d.history_earns(True, "analytics") is False
    assert d.history_earns(True, None) is False  # history without a policy earns nothing


def test_a_purchase_earns_with_the_tier_reached_at_its_own_time_whenever_it_is_applied():
    history = [sale("1200.00", at=T0, purchase_id="a"), sale("100.00", at=T0 + timedelta(days=30), purchase_id="b"),
               sale("100.00", at=T0 + timedelta(days=400), purchase_id="c")]  # "a" left the window by then
    for now in (T0 + timedelta(days=401), T0 + timedelta(days=900)):  # applied at once, or rebuilt much later
        book = earn_all(history, now=now)
        earned = {lot.purchase_id: (lot.earned_points, lot.tier_multiplier) for lot in book.lots.values()}
        assert earned == {"a": (1200, Decimal("1.0")), "b": (125, Decimal("1.25")), "c": (100, Decimal("1.0"))}


def test_qualifying_points_at_a_time_count_the_window_ending_then():
    book = earn_all([sale("600.00", at=T0, purchase_id="a"), sale("500.00", at=T0 + timedelta(days=200),
                                                                    purchase_id="b")], now=T0 + timedelta(days=2000))
    assert d.qualifying_at(book, PROGRAM, T0 + timedelta(days=300)) == 1100
    assert d.qualifying_at(book, PROGRAM, T0 + timedelta(days=366)) == 500
    assert d.tier_at(book, PROGRAM, T0 + timedelta(days=300)).name == "Silver"
    # Window lots loaded without their bodies count the same.
    bare = d.CustomerBook.new("c", "Bronze")
    bare.window_lots = {lot.lot_id: (lot.occurred_at, lot.earned_points) for lot in book.lots.values()}
    assert d.qualifying_at(bare, PROGRAM, T0 + timedelta(days=300)) == 1100


def test_the_same_receipt_id_in_two_stores_is_two_lots_with_two_ids():
    book = earn_all([sale("10.00", at=T0, purchase_id="till-1-000001", store="s1"),
                     sale("20.00", at=T0, purchase_id="till-1-000001", store="s2")], now=T0)
    assert sorted((lot.purchase_store, lot.amount_points) for lot in book.lots.values()) == [("s1", 10), ("s2", 20)]
    assert d.purchase_ref("pos", "x", "s1") != d.purchase_ref("pos", "x", "s2") != d.purchase_ref("pos", "x")


def test_a_return_converts_at_the_rate_its_sale_earned_at():
    at_sale = Program(currency_rates={"EUR": Decimal("4.00")})
    book = earn_all([sale("10.00", at=T0, currency="EUR")], now=T0, program=at_sale)
    [lot] = book.lots.values()
    assert lot.amount_points == 40 and lot.currency_rate == Decimal("4.00")
    later = Program(currency_rates={"EUR": Decimal("5.00")})
    returned = sale("10.00", at=T0 + timedelta(days=2), currency="EUR").model_copy(
        update={"type": "return", "purchase_id": "r", "original_purchase_id": "p"})
    [(_, _, amount)] = _returned_lines(later, returned, lot)
    assert amount == Decimal("40.00")
    lot.currency_rate = None  # a lot from before the rate was kept: the current rate
    assert _returned_lines(later, returned, lot)[0][2] == Decimal("50.00")


def test_history_lot_expired_at_import_gives_its_points_back_to_a_return_dated_before_the_expiry():
    now = T0 + timedelta(days=500)
    book = d.CustomerBook.new("c", "Bronze")
    journal = d.Journal({**d.new_program_accounts(), **book.accounts()})
    [earned] = d.earn(book, journal, PROGRAM, 1, purchase=sale("100.00", at=T0, history=True, policy="as-earned"),
                      now=now, history=True)
    lot = earned.lot
    assert lot.history and not lot.pending
    assert d.expire(book, journal, lot, now=now) == 100
    [reversed_] = d.reverse_return(book, journal, PROGRAM, return_id="r", lot=lot,
                                   returned=[("1", "a", Decimal("40.00"))], now=now,
                                   returned_at=T0 + timedelta(days=3))
    assert (reversed_.amount_points, reversed_.debt_points_added) == (40, 0)
    assert (lot.expired_points, lot.reversed_points, book.debt_points) == (60, 40, 0)
    assert d.trial_balance(journal.accounts.values()) == (0, 0)
    # The same return dated after the expiry finds nothing left: debt, as for a live return.
    other = d.CustomerBook.new("o", "Bronze")
    j2 = d.Journal({**d.new_program_accounts(), **other.accounts()})
    [e2] = d.earn(other, j2, PROGRAM, 1, purchase=sale("100.00", at=T0, purchase_id="q"), now=now)
    d.expire(other, j2, e2.lot, now=now)
    [r2] = d.reverse_return(other, j2, PROGRAM, return_id="r2", lot=e2.lot, returned=[("1", "a", Decimal("40"))],
                            now=now, returned_at=T0 + timedelta(days=450))
    assert r2.debt_points_added == 40


def record(value: bytes, headers: list[tuple[str, bytes]]) -> Record:
    return Record(value=value, key=b"c", topic="purchases.import", partition=0, offset=1, headers=tuple(headers))


def test_purchases_import_reads_the_policy_header_and_refuses_an_unknown_one():
    body = sale("10.00", at=T0).model_dump_json(exclude={"door", "history", "import_policy"}).encode()
    assert inbound_from_record(record(body, [("import_policy", b"as-earned")]), door="import").import_policy == \
        "as-earned"
    assert inbound_from_record(record(body, []), door="import").import_policy == "analytics"
    bad = inbound_from_record(record(body, [("import_policy", b"generous")]), door="import")
    assert isinstance(bad.parsed, Rejection) and bad.parsed.reason == "import_policy"
    assert inbound_from_record(record(body, [("import_policy", b"as-earned")])).import_policy is None  # live door


def test_the_ledger_reads_analytics_history_with_a_minimal_decoder_and_everything_else_whole():
    import uuid

    from services.ledger.handlers import HistoryForAnalytics, decode_purchase_event
    from shared.events.purchases import purchase_event_json

    def event(history: bool, policy: str | None) -> bytes:
        return purchase_event_json(event_type="PurchaseRecorded", event_id=str(uuid.uuid4()), recorded_at=T0,
                                   producer="purchases", correlation_id="c", customer_id="c-1",
                                   purchase=sale("10.00", at=T0), door="import", history=history, import_policy=policy)

    analytics = decode_purchase_event(Record(value=event(True, "analytics")))
    assert isinstance(analytics, HistoryForAnalytics) and analytics.payload.history and analytics.recorded_at == T0
    for value in (event(True, "as-earned"), event(False, None)):
        full = decode_purchase_event(Record(value=value))
        assert full.type == "PurchaseRecorded" and full.payload.lines[0].unit_price == Decimal("10.00")
