"""The ledger's answers (points.events): decode, apply in the pipeline's transaction (the
standing projection, the saga's decisions, the reservations), dead letters."""

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from services.rewards import domain, metrics
from services.rewards.domain import Redemption, Reward
from services.rewards.repository import RewardsRepository, StandingRow
from services.rewards.service import (
    PRODUCER,
    BatchOutcome,
    RewardsContext,
    failed_event,
    fulfilled_event,
    redemptions_finished,
)
from shared.events.points import (
    POINTS_EVENT_TYPES,
    PointsHeld,
    PointsHoldRejected,
    PointsRedeemed,
    PointsReleased,
)
from shared.outbox import OutboxMessage
from shared.pipeline import Batch, Record, Refused, dead_letter_message, json_errors
from shared.topics import REWARDS_DLQ

log = logging.getLogger(__name__)

# Discriminated by `type`: each model's Literal type field is the tag.
_POINTS_EVENT: TypeAdapter[Any] = TypeAdapter(
    Annotated[Union[tuple(POINTS_EVENT_TYPES)], Field(discriminator="type")]  # type: ignore[valid-type]
)
_KNOWN_POINTS_TYPES = frozenset(cls.model_fields["type"].default for cls in POINTS_EVENT_TYPES)


def decode_points_record(record: Record) -> Any | None:
    """One points.events record: the event, None for a type this service has no use for
    (forward compatible), or Refused with why it can never be read."""
    try:
        data = json.loads(record.value)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Refused("invalid_json", [{"msg": str(exc)}]) from None
    if not isinstance(data, dict):
        raise Refused("not_an_object")
    if not isinstance(data.get("type"), str):
        raise Refused("invalid_event", [{"msg": "type must be a string"}])
    if data.get("type") not in _KNOWN_POINTS_TYPES:
        return None
    try:
        return _POINTS_EVENT.validate_python(data)
    except ValidationError as exc:
        raise Refused("invalid_event", json_errors(exc)) from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise Refused("invalid_event", [{"msg": f"{type(exc).__name__}: {exc}"}]) from None


def points_dead_letter(ctx: RewardsContext, record: Record, reason: str, errors: list[dict[str, Any]],
                       now: datetime) -> OutboxMessage:
    """rewards.dlq's shape: a record that failed on its own says why in its reason."""
    if reason == "processing_failed" and errors:
        reason = f"processing_failed: {errors[0].get('msg', '')}"[:500]
    return dead_letter_message(record, topic=ctx.topic(REWARDS_DLQ), door="points.events consumer",
                               producer=PRODUCER, reason=reason, errors=errors, now=now, consumer=PRODUCER)


def count_dead_letter(reason: str) -> None:
    metrics.POINTS_EVENTS_DEAD_LETTERED.labels(reason).inc()


async def apply_points_events(ctx: RewardsContext, batch: Batch[Any]) -> None:
    """The ledger's answers and balances, in the batch's one transaction: the standing
    projection, then each saga answer decided in order and the reservations they call for."""
    now = ctx.now()
    repo = RewardsRepository(batch.conn)
    events = batch.events
    saga = [e for e in events if type(e) in LEDGER_ANSWERS]
    locked = await repo.lock_answered(redemption_ids=[e.payload.redemption_id for e in saga],
                                      standings=_latest_standings(events))
    answers = _LedgerAnswers(ctx, repo, locked, now=now)
    for event in saga:
        await answers.apply(event)
    await answers.reserve_held()
    await repo.save_and_enqueue(redemptions=answers.changed(), messages=answers.messages)
    outcome = BatchOutcome(finished=answers.finished())

    def done() -> None:
        redemptions_finished(ctx, outcome)
        if answers.messages:  # written with the redemptions, not through batch.publish
            ctx.wake_relay()

    batch.after_commit(done)


def _latest_standings(events: Sequence[Any]) -> list[StandingRow]:
    latest: dict[str, StandingRow] = {}
    for e in events:
        balance = getattr(e.payload, "balance", None)
        if balance is None or not e.customer_id:
            continue
        latest[e.customer_id] = StandingRow(
            customer_id=e.customer_id, available_points=balance.available_points, held_points=balance.held_points,
            tier=balance.tier, qualifying_points=balance.qualifying_points, as_of=e.recorded_at,
        )
    return list(latest.values())


@dataclass(frozen=True, slots=True)
class _Held:
    """A redemption the ledger holds points for, waiting for its reservation."""

    redemption: Redemption
    hold_expires_at: datetime
    cause: str


# What a reservation gave: (the held redemption, its code, the failure reason or None).
Reservation = tuple[_Held, str | None, str | None]


class _LedgerAnswers:
    """One batch's ledger answers applied to its locked redemptions. Each answer is decided
    in order, in Python (domain.py); the reservations the holds call for are made together,
    a few statements per batch and reward instead of several per redemption, and every
    changed row is written back in one statement (RewardsRepository.save_redemptions)."""

    def __init__(self, ctx: RewardsContext, repo: RewardsRepository,
                 locked: dict[uuid.UUID, tuple[Redemption, Reward]], *, now: datetime) -> None:
        self.ctx, self.repo, self.now = ctx, repo, now
        self.initial = {rid: r for rid, (r, _) in locked.items()}
        self.current = dict(self.initial)
        self.messages: list[OutboxMessage] = []
        self._held_now: dict[uuid.UUID, _Held] = {}
        self._rewards: dict[str, Reward | None] = {reward.reward_id: reward for _, reward in locked.values()}

    async def apply(self, event: Any) -> None:
        rid = event.payload.redemption_id
        if rid not in self.current:
            # Not ours (another producer's redemption id) or a hold for a request this
            # database never committed: nothing to fulfil, and nothing we could void it for.
            log.warning("ledger answer for an unknown redemption", extra={"redemption_id": str(rid), "type": event.type})
            return
        if rid in self._held_now:
            await self.reserve_held()  # a second answer for it in this batch: decided on its outcome
        self._decide(self.current[rid], event)

    def _decide(self, r: Redemption, event: Any) -> None:
        LEDGER_ANSWERS[type(event)](self, r, event)

    def _held(self, r: Redemption, event: PointsHeld) -> None:
        """Points held: reserve (with the other holds of the batch), or refuse when the hold
        leaves too little time or the redemption is already decided."""
        hold_expires_at = event.payload.hold_expires_at
        decision, reason = domain.on_points_held(r, hold_expires_at=hold_expires_at, now=self.now,
                                                 margin_s=self.ctx.settings.hold_safety_margin_s)
        if decision == "reserve":
            self._held_now[r.redemption_id] = _Held(r, hold_expires_at, str(event.event_id))
        elif decision == "refuse":
            assert reason is not None
            if r.status == "requested":
                self._set(domain.fail(r, reason=reason, ledger_status="held", now=self.now,
                                      hold_expires_at=hold_expires_at))
            self.messages.append(failed_event(self.ctx, r, reason=reason, now=self.now, cause=str(event.event_id)))

    def _rejected(self, r: Redemption, event: PointsHoldRejected) -> None:
        if domain.on_hold_rejected(r, reason=event.payload.reason):
            self._set(domain.fail(r, reason=str(event.payload.reason), ledger_status="rejected", now=self.now))

    def _redeemed(self, r: Redemption, event: PointsRedeemed) -> None:
        self._set(replace(r, ledger_status="redeemed"))

    def _released(self, r: Redemption, event: PointsReleased) -> None:
        if r.status == "fulfilled" and event.payload.phase == "void":
            # The ledger voided a hold we fulfilled (it expired first). Our
            # RedemptionFulfilled still reaches the ledger, which then takes the points
            # anyway (debt for what the balance no longer covers) and answers
            # PointsRedeemed, which sets ledger_status to redeemed.
            log.warning("ledger voided the hold of a fulfilled redemption; it redeems late",
                        extra={"redemption_id": str(r.redemption_id)})
        self._set(replace(r, ledger_status="released"))

    def _set(self, r: Redemption) -> None:
        self.current[r.redemption_id] = r

    async def reserve_held(self) -> None:
        """Reserve stock and code for the held redemptions: fulfil, or fail so the hold is
        voided. In the same transaction as the inbox claim of the PointsHeld: a crash before
        the commit leaves them requested and the PointsHeld redelivered."""
        if not self._held_now:
            return
        held = list(self._held_now.values())
        self._held_now.clear()
        for h, code, failure in await _reserve_all(self.repo, held, now=self.now, rewards=self._rewards):
            r, cause = h.redemption, h.cause
            if failure is not None:
                self._set(domain.fail(r, reason=failure, ledger_status="held", now=self.now,
                                      hold_expires_at=h.hold_expires_at))
                self.messages.append(failed_event(self.ctx, r, reason=failure, now=self.now, cause=cause))
            else:
                self._set(domain.fulfil(r, code=code, hold_expires_at=h.hold_expires_at, now=self.now))
                self.messages.append(fulfilled_event(self.ctx, r, code=code, now=self.now, cause=cause))

    def changed(self) -> list[Redemption]:
        return [r for rid, r in self.current.items() if r != self.initial[rid]]

    def finished(self) -> list[Redemption]:
        """The redemptions this batch took out of flight (their waiters get the answer)."""
        return [r for rid, r in self.current.items()
                if self.initial[rid].status in domain.IN_FLIGHT and r.status not in domain.IN_FLIGHT]


# What each of the ledger's answers does to its redemption; every other points.events type
# only updates the customer's standing (its balance).
LEDGER_ANSWERS: dict[type, Callable[[_LedgerAnswers, Redemption, Any], None]] = {
    PointsHeld: _LedgerAnswers._held,
    PointsHoldRejected: _LedgerAnswers._rejected,
    PointsRedeemed: _LedgerAnswers._redeemed,
    PointsReleased: _LedgerAnswers._released,
}


async def _reserve_all(repo: RewardsRepository, held: Sequence[_Held], *, now: datetime,
                       rewards: dict[str, Reward | None]) -> list[Reservation]:
    """Reservations for a batch of holds: the catalog rows read once, the limited stock of
    each reward locked once and taken once with the count, codes taken per reward at once."""
    missing = {h.redemption.reward_id for h in held} - rewards.keys()
    if missing:
        found = await repo.get_rewards(reward_ids=sorted(missing))
        rewards.update({reward_id: found.get(reward_id) for reward_id in missing})
    results: list[Reservation] = []
    by_reward: dict[str, list[_Held]] = {}
    for h in held:
        failure = domain.reservation_failure(rewards[h.redemption.reward_id], now=now)
        if failure is not None:
            results.append((h, None, failure))
        else:
            by_reward.setdefault(h.redemption.reward_id, []).append(h)
    limited = [reward_id for reward_id in by_reward if rewards[reward_id].stock_remaining is not None]  # type: ignore[union-attr]
    stock = await repo.lock_stock(reward_ids=limited) if limited else {}
    taken: dict[str, int] = {}
    for reward_id, group in by_reward.items():
        reward = rewards[reward_id]
        assert reward is not None
        reserved = await _reserve_for_reward(repo, reward, group, stock_left=stock.get(reward_id), now=now)
        results += reserved
        if reward_id in stock:
            taken[reward_id] = sum(1 for _, _, failure in reserved if failure is None)
    await repo.take_stock_units(units={reward_id: n for reward_id, n in taken.items() if n})
    return results


async def _reserve_for_reward(repo: RewardsRepository, reward: Reward, held: Sequence[_Held], *,
                              stock_left: int | None, now: datetime) -> list[Reservation]:
    """The holds of one reward, in batch order, as if reserved one after the other: a unit of
    stock each while it lasts (stock_left None: unlimited), then the code (coupon: from the
    pool while it lasts; voucher: generated). A coupon redemption left without a code takes
    no stock, so it fails coupon_pool_empty unless the stock is gone too."""
    served = list(held) if stock_left is None else list(held[:stock_left])
    if reward.kind == "coupon":
        codes = await repo.take_coupon_codes(reward_id=reward.reward_id,
                                             redemption_ids=[h.redemption.redemption_id for h in served],
                                             now=now) if served else {}
        reserved = [(h, codes[h.redemption.redemption_id]) for h in served if h.redemption.redemption_id in codes]
    elif reward.kind == "voucher":
        reserved = [(h, domain.new_voucher_code()) for h in served]
    else:
        reserved = [(h, None) for h in served]
    stock_gone = stock_left is not None and stock_left == len(reserved)
    refused = "out_of_stock" if stock_gone else "coupon_pool_empty"
    taken = {h.redemption.redemption_id for h, _ in reserved}
    return [(h, code, None) for h, code in reserved] + [(h, None, refused) for h in held
                                                        if h.redemption.redemption_id not in taken]
