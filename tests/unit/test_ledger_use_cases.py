"""The ledger's use cases end to end: the real subscriptions, decoders and shared pipeline
(inbox, dead letters, one transaction a batch) and the ledger's unit of work, written once
(`LedgerUseCases`) and run here over the in-memory store (tests/support/ledger_fakes.py), in
milliseconds, and in tests/integration/test_ledger_use_cases_postgres.py over PostgreSQL, which
proves the fake answers as the database does. The flows with the broker and the running
service are tests/integration/test_ledger_*.py and tests/e2e."""

import uuid

import pytest

from services.ledger import domain as d
from services.ledger.program import Program
from tests.support.ledger import purchase_claimed, purchase_recorded, redemption, return_recorded
from tests.support.ledger_fakes import LedgerHarness, MemoryLedgerHarness

# Points available at once (no return window): 1 point per 1.00.
PROGRAM = Program(pending_days=0)


def customer() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


async def earned(ledger: LedgerHarness, customer_id: str, amount: str = "100.00") -> dict:
    sale = purchase_recorded(customer_id, amounts=(amount,))
    await ledger.send("purchases", sale)
    return sale


async def payloads(ledger: LedgerHarness, event_type: str) -> list[dict]:
    return [e["payload"] for e in await ledger.published(event_type)]


class LedgerUseCases:
    """The scenarios; a subclass gives `harness(program)`, a LedgerHarness on its store."""

    async def harness(self, program: Program) -> LedgerHarness:
        raise NotImplementedError

    @pytest.fixture
    async def ledger(self) -> LedgerHarness:
        return await self.harness(PROGRAM)

    async def test_a_purchase_earns_once_whether_redelivered_or_claimed_after_it_was_credited(self, ledger):
        c = customer()
        sale = await earned(ledger, c)
        again = await ledger.send("purchases", sale)  # the same event: the inbox drops it
        claimed = await ledger.send("purchases", purchase_claimed(c, sale))  # a new event, the same purchase
        assert (again.duplicates, claimed.applied) == (1, 1)
        assert (await ledger.balance(c)).available_points == 100
        assert [p["amount_points"] for p in await payloads(ledger, "PointsEarned")] == [100]
        assert await ledger.count("transfers") == 1 and await ledger.trial_balance() == (0, 0)

    async def test_a_return_after_the_points_were_spent_becomes_debt_which_the_next_purchase_pays_first(self, ledger):
        c, rid = customer(), uuid.uuid4()
        sale = await earned(ledger, c)
        await ledger.send("rewards", redemption("RedemptionRequested", c, rid, 100))
        await ledger.send("rewards", redemption("RedemptionFulfilled", c, rid, 100))
        await ledger.send("purchases", return_recorded(c, sale, ["l1"]))
        [reversed_] = await payloads(ledger, "PointsReversed")
        assert (reversed_["amount_points"], reversed_["debt_points_added"]) == (100, 100)
        spent = await ledger.balance(c)
        assert (spent.available_points, spent.debt_points) == (0, 100)
        await earned(ledger, c, "60.00")
        balance = await ledger.balance(c)
        assert (balance.available_points, balance.debt_points) == (0, 40)
        assert await ledger.trial_balance() == (0, 0)

    async def test_a_hold_then_its_fulfilment_redeems_the_held_points(self, ledger):
        c, rid = customer(), uuid.uuid4()
        await earned(ledger, c)
        await ledger.send("rewards", redemption("RedemptionRequested", c, rid, 30))
        held = await ledger.balance(c)
        assert (held.available_points, held.held_points) == (70, 30)
        await ledger.send("rewards", redemption("RedemptionFulfilled", c, rid, 30))
        after = await ledger.balance(c)
        assert (after.available_points, after.held_points) == (70, 0)
        assert await ledger.hold_state(rid) == "posted"
        assert [p["amount_points"] for p in await payloads(ledger, "PointsRedeemed")] == [30]
        assert await ledger.trial_balance() == (0, 0)

    async def test_a_hold_then_a_failure_voids_it_and_gives_the_points_back_to_their_lot(self, ledger):
        c, rid = customer(), uuid.uuid4()
        await earned(ledger, c)
        await ledger.send("rewards", redemption("RedemptionRequested", c, rid, 30))
        await ledger.send("rewards", redemption("RedemptionFailed", c, rid, 30))
        balance = await ledger.balance(c)
        assert (balance.available_points, balance.held_points) == (100, 0)
        assert await ledger.lots_of(c) == [(100, 0)]
        [released] = await payloads(ledger, "PointsReleased")
        assert (released["phase"], released["reason"]) == ("void", "out_of_stock")
        assert await ledger.trial_balance() == (0, 0)

    async def test_a_fulfilment_after_its_hold_timed_out_is_redeemed_late_the_shortfall_as_debt(self, ledger):
        c, late, later = customer(), uuid.uuid4(), uuid.uuid4()
        await earned(ledger, c)
        await ledger.send("rewards", redemption("RedemptionRequested", c, late, 80, hold_timeout_s=60))
        ledger.advance(minutes=2)
        # The next spend voids the timed-out hold first, then holds 90 of the 100 given back.
        await ledger.send("rewards", redemption("RedemptionRequested", c, later, 90))
        assert await ledger.hold_state(late) == "voided"
        await ledger.send("rewards", redemption("RedemptionFulfilled", c, late, 80))
        [redeemed] = await payloads(ledger, "PointsRedeemed")
        assert (redeemed["after_hold_voided"], redeemed["debt_points_added"]) == (True, 70)
        balance = await ledger.balance(c)
        assert (balance.available_points, balance.held_points, balance.debt_points) == (0, 90, 70)
        assert await ledger.hold_state(late) == "posted"
        assert await ledger.trial_balance() == (0, 0)

    async def test_a_redemption_requested_twice_holds_once_and_the_repeat_is_answered_as_a_duplicate(self, ledger):
        c, rid = customer(), uuid.uuid4()
        await earned(ledger, c)
        request = redemption("RedemptionRequested", c, rid, 30)
        await ledger.send("rewards", request)
        redelivered = await ledger.send("rewards", request)  # the same event: dropped by the inbox
        resent = await ledger.send("rewards", redemption("RedemptionRequested", c, rid, 30))  # a new event, same id
        assert (redelivered.duplicates, resent.applied) == (1, 1)
        assert [p["amount_points"] for p in await payloads(ledger, "PointsHeld")] == [30]
        assert [p["reason"] for p in await payloads(ledger, "PointsHoldRejected")] == ["duplicate_redemption"]
        assert (await ledger.balance(c)).held_points == 30

    async def test_a_cancellation_after_fulfilment_refunds_the_points_to_the_lots_they_came_from(self, ledger):
        c, rid = customer(), uuid.uuid4()
        await earned(ledger, c)
        for step in ("RedemptionRequested", "RedemptionFulfilled", "RedemptionCancelled"):
            await ledger.send("rewards", redemption(step, c, rid, 40))
        assert (await ledger.balance(c)).available_points == 100
        assert await ledger.hold_state(rid) == "refunded"
        assert await ledger.lots_of(c) == [(100, 0)]
        [released] = await payloads(ledger, "PointsReleased")
        assert (released["phase"], released["amount_points"]) == ("refund", 40)
        assert await ledger.trial_balance() == (0, 0)

    async def test_a_fulfilment_without_any_hold_is_dead_lettered(self, ledger):
        report = await ledger.send("rewards", redemption("RedemptionFulfilled", customer(), uuid.uuid4(), 10))
        assert report.dead_lettered == 1
        [letter] = await ledger.published("DeadLetter")
        assert letter["reason"] == "fulfilled_without_hold"
        assert await ledger.count("transfers") == 0

    async def test_an_adjustment_id_sent_again_is_answered_as_applied_and_with_other_fields_refused(self, ledger):
        c, aid = customer(), uuid.uuid4()
        first = await ledger.adjust(c, 50, adjustment_id=aid)
        again = await ledger.adjust(c, 50, adjustment_id=aid)
        assert (first.created, again.created, again.balance.available_points) == (True, False, 50)
        with pytest.raises(d.AdjustmentIdReused, match="amount_points"):
            await ledger.adjust(c, 60, adjustment_id=aid)
        assert (await ledger.balance(c)).available_points == 50
        assert await ledger.count("adjustments") == 1 and len(await payloads(ledger, "PointsAdjusted")) == 1

    async def test_a_refused_debit_rolls_back_with_its_event_and_a_replayed_adjustment_is_a_duplicate(self, ledger):
        c = customer()
        await ledger.adjust(c, 50, adjustment_id=uuid.uuid4())
        with pytest.raises(d.InsufficientPoints):
            await ledger.adjust(c, -80, adjustment_id=uuid.uuid4())
        [recorded] = await ledger.published("AdjustmentRecorded")  # only the applied one reaches ledger.adjustments
        replay = await ledger.send("adjustments", recorded)  # the admin API put its id in the inbox
        assert (replay.duplicates, (await ledger.balance(c)).available_points) == (1, 50)
        assert await ledger.trial_balance() == (0, 0)

    async def test_a_fulfilment_after_the_scheduler_voided_its_hold_is_redeemed_from_the_points_still_there(self, ledger):
        c, rid = customer(), uuid.uuid4()
        await earned(ledger, c)
        await ledger.send("rewards", redemption("RedemptionRequested", c, rid, 80, hold_timeout_s=60))
        ledger.advance(minutes=2)
        assert (await ledger.run_scheduler()).voided_holds == 1
        assert (await ledger.balance(c)).available_points == 100
        await ledger.send("rewards", redemption("RedemptionFulfilled", c, rid, 80))
        [redeemed] = await payloads(ledger, "PointsRedeemed")
        assert (redeemed["after_hold_voided"], redeemed["debt_points_added"]) == (True, 0)
        assert (await ledger.balance(c)).available_points == 20
        assert await ledger.trial_balance() == (0, 0)

    async def test_the_scheduler_matures_reminds_and_expires_once_however_often_it_runs(self):
        ledger = await self.harness(Program(pending_days=14, expiry_days=30))
        c = customer()
        await earned(ledger, c)
        assert (await ledger.balance(c)).pending_points == 100
        ledger.advance(days=15)
        first, again = await ledger.run_scheduler(), await ledger.run_scheduler()
        assert (first.matured_points, first.reminders) == (100, 1)
        assert (again.customers, again.matured_points, again.reminders) == (0, 0, 0)
        assert (await ledger.balance(c)).available_points == 100
        ledger.advance(days=30)
        expired = await ledger.run_scheduler()
        assert (expired.expired_points, (await ledger.balance(c)).available_points) == (100, 0)
        assert [p["amount_points"] for p in await payloads(ledger, "PointsExpired")] == [100]
        assert len(await payloads(ledger, "PointsWillExpire")) == 1
        assert await ledger.trial_balance() == (0, 0)


class TestInMemory(LedgerUseCases):
    async def harness(self, program: Program) -> LedgerHarness:
        return MemoryLedgerHarness(program)
