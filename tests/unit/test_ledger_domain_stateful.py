"""Stateful property tests of the ledger's rules: an in-memory ledger driven by any sequence
of sales, returns, holds, posts, voids, fulfilments after a void, refunds, expiries and
adjustments keeps its books."""

import uuid
from dataclasses import astuple
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.ledger import domain as d
from services.ledger.program import Program
from shared.events.purchases import PurchaseLine, PurchasePayload

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
PROGRAM = Program(first_purchase_bonus_points=5, daily_cap_points=400,
                  category_multipliers={"wine": Decimal("1.5")})
CUSTOMERS = ("c1", "c2", "c3")


class MemoryLedger:
    """The domain's operations over books held in memory: the whole ledger, every lot."""

    def __init__(self) -> None:
        self.program_accounts = d.new_program_accounts()
        self.books: dict[str, d.CustomerBook] = {}
        self.lots_by_purchase: dict[str, d.Lot] = {}
        self.transfers: list[d.Transfer] = []
        self.now = T0

    def book(self, customer_id: str) -> d.CustomerBook:
        if customer_id not in self.books:
            self.books[customer_id] = d.CustomerBook.new(customer_id, PROGRAM.tiers[0].name)
        return self.books[customer_id]

    def journal(self, book: d.CustomerBook) -> d.Journal:
        journal = d.Journal({**self.program_accounts, **book.accounts()})
        journal.transfers = self.transfers
        return journal

    def apply(self, command: tuple) -> object:
        """Commands are plain tuples so that a run can be replayed exactly."""
        kind, *args = command
        return getattr(self, kind)(*args)

    def advance(self, days: int) -> None:
        self.now += timedelta(days=days)

    def sale(self, customer_id: str, purchase_id: str, lines: tuple) -> None:
        if purchase_id in self.lots_by_purchase:
            return
        book = self.book(customer_id)
        payload = PurchasePayload(
            purchase_id=purchase_id, type="sale", source="pos", store_id="s", occurred_at=self.now, currency="PLN",
            total=Decimal(0), door="kafka",
            lines=[PurchaseLine(line_id=str(i), sku=f"{cat}-{i}", category=cat, quantity=1, unit_price=Decimal(a))
                   for i, (cat, a) in enumerate(lines)],
        )
        d.earn(book, self.journal(book), PROGRAM, 1, purchase=payload, now=self.now)
        self.lots_by_purchase[purchase_id] = next(x for x in book.lots.values() if x.purchase_id == purchase_id)

    def return_(self, purchase_id: str, return_id: str, share: str) -> None:
        lot = self.lots_by_purchase[purchase_id]
        book = self.books[lot.customer_id]
        returned = [(line.line_id, line.sku, line.net_amount * Decimal(share)) for line in lot.lines]
        d.reverse_return(book, self.journal(book), PROGRAM, return_id=return_id, lot=lot, returned=returned,
                         now=self.now)

    def hold(self, customer_id: str, redemption_id: uuid.UUID, amount: int) -> bool:
        book = self.book(customer_id)
        try:
            d.hold(book, self.journal(book), redemption_id=redemption_id, amount_points=amount,
                   expires_at=self.now + timedelta(minutes=5))
        except (d.InsufficientPoints, d.InvalidAmount):
            return False
        return True

    def _hold_op(self, op, redemption_id: uuid.UUID) -> None:
        for book in self.books.values():
            if redemption_id in book.holds:
                op(book, self.journal(book), book.holds[redemption_id])

    def post(self, redemption_id: uuid.UUID) -> None:
        self._hold_op(d.post_hold, redemption_id)

    def void(self, redemption_id: uuid.UUID) -> None:
        self._hold_op(d.void_hold, redemption_id)

    def refund(self, redemption_id: uuid.UUID) -> None:
        self._hold_op(lambda book, journal, h: d.refund(book, journal, h, PROGRAM, now=self.now), redemption_id)

    def fulfil_late(self, redemption_id: uuid.UUID) -> d.LateRedemption | None:
        for book in self.books.values():
            if redemption_id in book.holds:
                return d.redeem_after_void(book, self.journal(book), book.holds[redemption_id])
        return None

    def hold_of(self, redemption_id: uuid.UUID) -> tuple[d.CustomerBook, d.Hold]:
        return next((b, b.holds[redemption_id]) for b in self.books.values() if redemption_id in b.holds)

    def scheduler(self) -> None:
        for book in self.books.values():
            journal = self.journal(book)
            for lot in list(book.lots.values()):
                d.mature(book, journal, lot, now=self.now)
                d.expire(book, journal, lot, now=self.now)
            d.requalify(book, PROGRAM, d.qualifying_points_of(book.lots.values(), PROGRAM, self.now))

    def adjust(self, customer_id: str, adjustment_id: uuid.UUID, amount: int) -> None:
        book = self.book(customer_id)
        try:
            d.adjust(book, self.journal(book), PROGRAM, adjustment_id=adjustment_id, amount_points=amount, now=self.now)
        except (d.InsufficientPoints, d.InvalidAmount):
            pass

    def snapshot(self) -> tuple:
        def lot_state(lot: d.Lot) -> tuple:
            return (lot.lot_id, lot.remaining_points, lot.held_points, lot.pending, lot.expired_points,
                    lot.reversed_points, tuple(astuple(x) for x in lot.lines))

        books = tuple(
            (c, b.tier, b.qualifying_points, b.balance(), tuple(lot_state(x) for x in b.lots.values()),
             tuple((h.redemption_id, h.state, tuple(sorted(h.allocations.items()))) for h in b.holds.values()))
            for c, b in sorted(self.books.items())
        )
        accounts = tuple(astuple(a) for _, a in sorted(self.program_accounts.items()))
        return books, accounts, tuple(self.transfers)


amounts = st.decimals("0.01", "300", places=2).map(str)
lines_st = st.lists(st.tuples(st.sampled_from(["food", "wine"]), amounts), min_size=1, max_size=3).map(tuple)


class LedgerMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.ledger = MemoryLedger()
        self.commands: list[tuple] = []
        self.purchases: list[str] = []
        self.redemptions: list[uuid.UUID] = []
        self.counter = 0

    def do(self, command: tuple) -> object:
        self.commands.append(command)
        return self.ledger.apply(command)

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    @rule(customer=st.sampled_from(CUSTOMERS), lines=lines_st)
    def sale(self, customer, lines):
        purchase_id = self.fresh("p")
        self.do(("sale", customer, purchase_id, lines))
        self.purchases.append(purchase_id)

    @rule(data=st.data())
    def replay_a_sale(self, data):
        """A duplicate delivery of a sale already credited changes nothing."""
        if not self.purchases:
            return
        purchase_id = data.draw(st.sampled_from(self.purchases))
        lot = self.ledger.lots_by_purchase[purchase_id]
        before = self.ledger.snapshot()
        self.do(("sale", lot.customer_id, purchase_id, (("food", "1.00"),)))
        assert self.ledger.snapshot() == before

    @precondition(lambda self: self.purchases)
    @rule(data=st.data(), share=st.sampled_from(["0.25", "0.5", "1"]))
    def return_(self, data, share):
        self.do(("return_", data.draw(st.sampled_from(self.purchases)), self.fresh("r"), share))

    @rule(customer=st.sampled_from(CUSTOMERS), amount=st.integers(-5, 400))
    def hold(self, customer, amount):
        redemption_id = uuid.UUID(int=self.counter + 1)
        self.fresh("h")
        before = self.ledger.book(customer).available_points
        held = self.do(("hold", customer, redemption_id, amount))
        assert held == (0 < amount <= before)
        if held:
            self.redemptions.append(redemption_id)

    @precondition(lambda self: self.redemptions)
    @rule(data=st.data(), op=st.sampled_from(["post", "void", "refund"]))
    def settle(self, data, op):
        self.do((op, data.draw(st.sampled_from(self.redemptions))))

    @precondition(lambda self: any(self.ledger.hold_of(r)[1].state == "voided" for r in self.redemptions))
    @rule(data=st.data(), spent_meanwhile=st.sampled_from(["nothing", "some", "all"]),
          then=st.sampled_from(["kept", "cancelled", "cancelled after the debt was repaid"]))
    def fulfil_after_the_hold_was_voided(self, data, spent_meanwhile, then):
        """The reward was given after the hold timed out: the points are taken all the same,
        from the available lots, the shortfall as debt; a redelivery changes nothing. The
        customer may have spent part or all of the points in between (a debit adjustment);
        a cancellation afterwards gives back exactly what was taken, debt included."""
        voided = [r for r in self.redemptions if self.ledger.hold_of(r)[1].state == "voided"]
        redemption_id = data.draw(st.sampled_from(voided))
        book, h = self.ledger.hold_of(redemption_id)
        left = {"nothing": book.available_points, "some": min(book.available_points, h.amount_points // 2),
                "all": 0}[spent_meanwhile]
        if book.available_points > left:
            self.do(("adjust", book.customer_id, uuid.UUID(int=10**6 + self.counter), left - book.available_points))
            self.fresh("a")
        available, pending, debt = book.available_points, book.pending_points, book.debt_points
        late = self.do(("fulfil_late", redemption_id))
        assert late is not None and h.state == "posted"
        assert late.taken_points == min(h.amount_points, available)
        assert late.taken_points + late.debt_points_added == h.amount_points
        assert book.available_points == available - late.taken_points
        assert book.debt_points == debt + late.debt_points_added
        assert book.pending_points == pending, "pending points are not spendable"
        assert sum(h.allocations.values()) == late.taken_points
        assert late.balance == book.balance()
        before = self.ledger.snapshot()
        assert self.do(("fulfil_late", redemption_id)) is None
        self.do(("post", redemption_id))  # nor does a fulfilment on the normal path
        assert self.ledger.snapshot() == before
        if then == "kept":
            return
        net_before_refund = book.available_points - book.debt_points
        if then == "cancelled after the debt was repaid" and book.debt_points:
            repaid = book.debt_points
            self.do(("adjust", book.customer_id, uuid.UUID(int=10**6 + self.counter), repaid))
            self.fresh("a")
            net_before_refund += repaid
        self.do(("refund", redemption_id))
        assert h.state == "refunded"
        assert book.available_points - book.debt_points == net_before_refund + h.amount_points

    @rule(days=st.integers(0, 200))
    def time_passes_and_the_scheduler_runs(self, days):
        self.do(("advance", days))
        self.do(("scheduler",))

    @rule(customer=st.sampled_from(CUSTOMERS), amount=st.integers(-300, 300))
    def adjust(self, customer, amount):
        self.do(("adjust", customer, uuid.UUID(int=10**6 + self.counter), amount))
        self.fresh("a")

    @invariant()
    def debits_equal_credits(self):
        accounts = list(self.ledger.program_accounts.values())
        for book in self.ledger.books.values():
            accounts += [book.available, book.pending, book.debt]
        assert d.trial_balance(accounts) == (0, 0)

    @invariant()
    def balances_equal_the_sum_of_their_lots_and_no_lot_is_below_zero(self):
        for book in self.ledger.books.values():
            d.check_book(book)

    @invariant()
    def issued_points_are_accounted_for(self):
        """Every point issued is available, pending, held, redeemed, expired or taken back."""
        issuance = self.ledger.program_accounts[d.ISSUANCE]
        redemption = self.ledger.program_accounts[d.REDEMPTION]
        expiry = self.ledger.program_accounts[d.EXPIRY]
        customers = sum(b.available_points + b.pending_points + b.held_points - b.debt_points
                        for b in self.ledger.books.values())
        issued = issuance.debits_posted - issuance.credits_posted
        assert issued == customers + (redemption.credits_posted - redemption.debits_posted) + expiry.credits_posted

    def teardown(self):
        if not hasattr(self, "ledger"):
            return
        replay = MemoryLedger()
        for command in self.commands:
            replay.apply(command)
        assert replay.snapshot() == self.ledger.snapshot(), "the same events replayed must give the same state"


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_ledger_rules_keep_the_books = LedgerMachine.TestCase
