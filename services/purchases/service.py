"""Use cases of the purchases service: record purchases from any door, claim an anonymous
purchase. Each opens one transaction, applies the rules, writes state and outbox together."""

import hashlib
import json
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg

from services.purchases import domain, metrics, repository
from services.purchases.domain import PurchaseIn, Rejection
from services.purchases.settings import PurchasesSettings
from shared.events import DeadLetter, derived_event_id, envelope, utcnow
from shared.events.purchases import (
    PurchaseClaimed,
    PurchaseClaimedPayload,
    purchase_event_json,
)
from shared.outbox import OutboxMessage, enqueue
from shared.pipeline import Batch
from shared.topics import PURCHASES_DLQ, PURCHASES_RECORDED

PRODUCER = "purchases"

Clock = Callable[[], datetime]


@dataclass
class Inbound:
    """One input from any door: its original bytes, and either the parsed purchase or why
    it could not be parsed. Kafka coordinates are kept for the dead letter."""

    door: str
    original: bytes
    parsed: PurchaseIn | Rejection
    correlation_id: str | None = None
    kafka: dict[str, Any] = field(default_factory=dict)
    # Doors with no caller waiting for an answer: refusals are dead-lettered, and a return
    # that arrives before its sale is parked until the sale comes.
    dead_letter_on_reject: bool = True
    # Imported history (purchases.import): recorded with the marker and this policy, no age
    # limit. None for live purchases.
    import_policy: str | None = None


@dataclass
class Outcome:
    status: Literal["recorded", "duplicate", "rejected", "conflict", "parked"]
    purchase_id: str | None = None
    event_id: uuid.UUID | None = None
    reason: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "purchase_id": self.purchase_id}
        if self.event_id:
            body["event_id"] = str(self.event_id)
        if self.reason:
            body["reason"] = self.reason
            body["errors"] = self.errors
        return body


@dataclass
class _Accepted:
    index: int
    item: Inbound
    purchase: PurchaseIn
    content_hash: bytes


def purchase_event_id(source: str, store_id: str, purchase_id: str) -> uuid.UUID:
    return derived_event_id("purchases.recorded", source, store_id, purchase_id)


# JSON escaping can grow an input six-fold; a dead letter must stay under the broker's
# message size limit, so a huge original is kept in part, with its size and digest.
MAX_DEAD_LETTER_ORIGINAL_BYTES = 256 * 1024


def dead_letter(topic: str, item: Inbound, rejection: Rejection) -> OutboxMessage:
    original, errors = item.original, list(rejection.errors)
    if len(original) > MAX_DEAD_LETTER_ORIGINAL_BYTES:
        errors.append({"loc": [], "type": "original_truncated",
                       "msg": f"the original was {len(original)} bytes (sha256 {hashlib.sha256(original).hexdigest()}); "
                              f"its first {MAX_DEAD_LETTER_ORIGINAL_BYTES} bytes are kept here"})
        original = original[:MAX_DEAD_LETTER_ORIGINAL_BYTES]
    k = item.kafka
    # A redelivered record (crash before the offset commit) gets the same dead-letter id.
    dead_letter_id = (derived_event_id("purchases.dlq", k["topic"], str(k["partition"]), str(k["offset"]))
                      if "offset" in k else uuid.uuid4())
    dl = DeadLetter(
        dead_letter_id=dead_letter_id,
        door=item.door,
        reason=rejection.reason,
        errors=errors,
        original=original.decode("utf-8", errors="replace"),
        original_key=item.kafka.get("key"),
        original_topic=item.kafka.get("topic"),
        original_partition=item.kafka.get("partition"),
        original_offset=item.kafka.get("offset"),
        producer=PRODUCER,
        recorded_at=utcnow(),
    )
    return OutboxMessage(topic=topic, key=item.kafka.get("key"), value=dl.model_dump_json().encode(),
                         headers={"reason": rejection.reason, "door": item.door})


class PurchaseRecorder:
    """Records batches of inbound purchases. One instance per process."""

    def __init__(self, *, settings: PurchasesSettings, clock: Clock = utcnow) -> None:
        self._settings = settings
        self.clock = clock
        self._recorded_topic = settings.topic(PURCHASES_RECORDED)
        self.dlq_topic = settings.topic(PURCHASES_DLQ)

    async def record(self, conn: asyncpg.Connection, items: Sequence[Inbound]) -> list[Outcome]:
        """Validate, de-duplicate and record `items` in one transaction on `conn` (the HTTP
        doors). Returns one outcome per item, in order. Raises on database errors (nothing is
        written)."""
        started = time.perf_counter()
        counted: list[Callable[[], None]] = []
        async with conn.transaction():
            outcomes, messages = await self.record_in(conn, items, counted)
            await enqueue(conn, messages)
        for count in counted:
            count()
        self._observe(items, outcomes, time.perf_counter() - started)
        return outcomes

    async def apply(self, batch: Batch[Inbound]) -> None:
        """The Kafka door: a batch of purchases.raw inside the pipeline's transaction; what
        is refused goes to purchases.dlq in it, counted once the batch committed."""
        started = time.perf_counter()
        counted: list[Callable[[], None]] = []
        items = batch.events
        outcomes, messages = await self.record_in(batch.conn, items, counted)
        batch.publish(*messages)
        elapsed_s = time.perf_counter() - started

        def observe() -> None:
            for count in counted:
                count()
            self._observe(items, outcomes, elapsed_s)

        batch.after_commit(observe)

    async def record_in(self, conn: asyncpg.Connection, items: Sequence[Inbound],
                        counted: list[Callable[[], None]]) -> tuple[list[Outcome], list[OutboxMessage]]:
        """The work of `record` inside a transaction already open on `conn`: the outcomes,
        and the messages to enqueue (events and dead letters). Counters of returns parked
        earlier are left in `counted`, for after the commit."""
        s = self._settings
        now = self.clock()
        outcomes: list[Outcome | None] = [None] * len(items)
        accepted: list[_Accepted] = []
        first_seen: dict[tuple[str, str, str], _Accepted] = {}

        for i, item in enumerate(items):
            parsed = item.parsed
            if isinstance(parsed, Rejection):
                outcomes[i] = Outcome("rejected", reason=parsed.reason, errors=parsed.errors)
                continue
            rejection = domain.check_purchase(
                parsed, now=now, max_clock_skew_s=s.max_clock_skew_s,
                max_age_days=None if item.import_policy else s.max_purchase_age_days)
            if rejection is not None:
                outcomes[i] = Outcome("rejected", parsed.purchase_id, reason=rejection.reason, errors=rejection.errors)
                continue
            candidate = _Accepted(i, item, parsed, parsed.content_hash())
            earlier = first_seen.get(parsed.key)
            if earlier is not None:  # the same purchase twice in one batch
                outcomes[i] = self._repeat(candidate, (earlier.content_hash, purchase_event_id(*parsed.key)))
                continue
            first_seen[parsed.key] = candidate
            accepted.append(candidate)

        messages: list[OutboxMessage] = []
        known = await repository.find_hashes(conn, keys=[a.purchase.key for a in accepted])
        sales, returns = [], []
        for a in accepted:
            if a.purchase.key in known:
                outcomes[a.index] = self._repeat(a, known[a.purchase.key])
            elif a.purchase.type == "sale":
                sales.append(a)
            else:
                returns.append(a)

        inserted = await repository.insert_purchases(conn, purchases=[
            (a.purchase, a.purchase.customer_id, a.content_hash, a.item.door,
             purchase_event_id(*a.purchase.key), a.item.import_policy) for a in sales
        ])
        raced = [a for a in sales if a.purchase.key not in inserted]
        if raced:  # another transaction recorded them between our look-up and insert
            known = await repository.find_hashes(conn, keys=[a.purchase.key for a in raced])
            for a in raced:
                outcomes[a.index] = self._repeat(a, known[a.purchase.key])
        # Each message's place: the arrival index of its input. Events go out in the order
        # their inputs came (a sale after a return in the batch stays after it), which
        # imported history relies on: the ledger earns each purchase at its own time, with the
        # returns made before it already applied.
        # A return never goes before its own sale, should it have come first in the batch.
        arrival: list[float] = []
        sale_arrival: dict[tuple[str, str, str], int] = {}
        for a in sales:
            if a.purchase.key in inserted:
                outcomes[a.index] = self._recorded(a, a.purchase.customer_id, now, messages)
                arrival += [a.index] * (len(messages) - len(arrival))
                sale_arrival[a.purchase.key] = a.index

        # Returns one by one, in arrival order: each locks its sale, so concurrent
        # partial returns of one sale can never together return more than was bought.
        # Returns parked earlier for the sales just recorded go first.
        for row in await repository.unpark_returns_for(conn, sales=sorted(inserted)):
            unparked = self._unparked(row)
            outcome = await self._record_return(conn, unparked, now, messages)
            if outcome.status in ("rejected", "conflict"):
                messages.append(dead_letter(self.dlq_topic, unparked.item,
                                            Rejection(outcome.reason or "rejected", outcome.errors)))
                counted.append(metrics.REJECTED.labels(unparked.item.door, outcome.reason or "rejected").inc)
            elif outcome.status == "recorded":
                counted.append(metrics.RECORDED.labels(unparked.item.door, "return").inc)
            arrival += [len(items)] * (len(messages) - len(arrival))  # after the sales that released them
        for a in returns:
            outcomes[a.index] = await self._record_return(conn, a, now, messages)
            r = a.purchase
            after_sale = sale_arrival.get((r.source, r.store_id, r.original_purchase_id or ""), -1) + 0.5
            arrival += [max(a.index, after_sale)] * (len(messages) - len(arrival))
        messages = [m for _, m in sorted(zip(arrival, messages), key=lambda x: x[0])]

        for i, item in enumerate(items):
            outcome = outcomes[i]
            assert outcome is not None
            if outcome.status in ("rejected", "conflict") and item.dead_letter_on_reject:
                messages.append(dead_letter(self.dlq_topic, item, Rejection(outcome.reason or "rejected", outcome.errors)))
        return [o for o in outcomes if o is not None], messages

    def _repeat(self, a: _Accepted, recorded: tuple[bytes, uuid.UUID]) -> Outcome:
        recorded_hash, event_id = recorded
        if recorded_hash == a.content_hash:
            return Outcome("duplicate", a.purchase.purchase_id, event_id)
        return Outcome("conflict", a.purchase.purchase_id, reason="conflict", errors=[{
            "loc": ["purchase_id"], "type": "conflict",
            "msg": f"{a.purchase.source} purchase {a.purchase.purchase_id} of store {a.purchase.store_id} was "
                   "already recorded with different content; a correction must be sent as a return"}])

    def _recorded(self, a: _Accepted, customer_id: str | None, now: datetime, messages: list[OutboxMessage]) -> Outcome:
        p = a.purchase
        event_id = purchase_event_id(*p.key)
        event_type = "PurchaseRecorded" if p.type == "sale" else "ReturnRecorded"
        correlation_id = a.item.correlation_id or str(event_id)
        # Written from a template: every field was validated on the way in (hot path).
        value = purchase_event_json(event_type=event_type, event_id=str(event_id), recorded_at=now, producer=PRODUCER,
                                    correlation_id=correlation_id, customer_id=customer_id, purchase=p,
                                    door=a.item.door, history=a.item.import_policy is not None,
                                    import_policy=a.item.import_policy)
        messages.append(OutboxMessage(self._recorded_topic, customer_id or f"anonymous:{p.store_id}", value,
                                      {"type": event_type, "correlation_id": correlation_id}))
        return Outcome("recorded", p.purchase_id, event_id)

    async def _record_return(self, conn: asyncpg.Connection, a: _Accepted, now: datetime,
                             messages: list[OutboxMessage]) -> Outcome:
        r = a.purchase
        # The sale of the return's own store: receipt ids are unique per store only.
        row = await repository.lock_sale(conn, source=r.source, store_id=r.store_id,
                                         purchase_id=r.original_purchase_id or "")
        sale = repository.recorded_sale(row) if row is not None else None
        rejection = domain.check_return(r, sale)
        if rejection is not None and rejection.reason == "unknown_original" and a.item.dead_letter_on_reject:
            await repository.park_return(conn, purchase=r, door=a.item.door, original=a.item.original,
                                         correlation_id=a.item.correlation_id, kafka=a.item.kafka, parked_at=now,
                                         import_policy=a.item.import_policy)
            return Outcome("parked", r.purchase_id)
        if rejection is not None:
            return Outcome("rejected", r.purchase_id, reason=rejection.reason, errors=rejection.errors)
        assert sale is not None
        # A return is booked to the customer of the sale (whoever the till says), so that
        # the points it reverses are the ones that sale earned.
        inserted = await repository.insert_purchases(conn, purchases=[
            (r, sale.customer_id, a.content_hash, a.item.door, purchase_event_id(*r.key), a.item.import_policy)])
        if not inserted:
            known = await repository.find_hashes(conn, keys=[r.key])
            return self._repeat(a, known[r.key])
        await repository.set_returned(conn, source=sale.source, store_id=sale.store_id, purchase_id=sale.purchase_id,
                                      returned=domain.returned_after(sale, r))
        return self._recorded(a, sale.customer_id, now, messages)

    @staticmethod
    def _unparked(row: asyncpg.Record) -> _Accepted:
        purchase = PurchaseIn.model_validate_json(row["purchase"])
        item = Inbound(door=row["door"], original=bytes(row["original"]), parsed=purchase,
                       correlation_id=row["correlation_id"], kafka=json.loads(row["kafka"]),
                       import_policy=row["import_policy"])
        return _Accepted(-1, item, purchase, purchase.content_hash())

    async def expire_parked_returns(self, conn: asyncpg.Connection) -> int:
        """Dead-letter returns whose sale never came within `return_park_s`."""
        async with conn.transaction():
            rows = await repository.unpark_expired(
                conn, parked_before=self.clock() - timedelta(seconds=self._settings.return_park_s))
            messages, refused = [], []
            for row in rows:
                a = self._unparked(row)
                rejection = domain.check_return(a.purchase, None)
                messages.append(dead_letter(self.dlq_topic, a.item, rejection))
                refused.append((a.item.door, rejection.reason))
            await enqueue(conn, messages)
        for door, reason in refused:
            metrics.REJECTED.labels(door, reason).inc()
        return len(rows)

    @staticmethod
    def _observe(items: Sequence[Inbound], outcomes: Sequence[Outcome | None], elapsed_s: float) -> None:
        doors = Tally(item.door for item in items)
        for door, n in doors.items():
            metrics.RECEIVED.labels(door).inc(n)
            metrics.BATCH_SIZE.labels(door).observe(n)
            metrics.PROCESSING_SECONDS.labels(door).observe(elapsed_s)
        tally = Tally()
        for item, o in zip(items, outcomes):
            if o is not None:
                tally[(item.door, o.status, o.reason or "", item.parsed.type if isinstance(item.parsed, PurchaseIn) else "")] += 1
        for (door, status, reason, kind), n in tally.items():
            if status == "recorded":
                metrics.RECORDED.labels(door, kind).inc(n)
            elif status == "parked":
                metrics.PARKED.labels(door).inc(n)
            elif status == "duplicate":
                metrics.DUPLICATES.labels(door).inc(n)
            else:
                metrics.REJECTED.labels(door, reason).inc(n)


# ---- claims -------------------------------------------------------------------------------


@dataclass
class ClaimResult:
    created: bool
    event_id: uuid.UUID
    customer_id: str


async def claim_purchase(conn: asyncpg.Connection, *, settings: PurchasesSettings, store_id: str, source: str,
                         purchase_id: str, customer_id: str, correlation_id: str | None, clock: Clock = utcnow) -> ClaimResult:
    """A customer claims an anonymous sale: it becomes theirs and PurchaseClaimed carries
    what they kept (after any returns), so the ledger can credit it now."""
    now = clock()
    event_id = derived_event_id("purchases.claimed", source, store_id, purchase_id)
    async with conn.transaction():
        row = await repository.lock_sale(conn, source=source, store_id=store_id, purchase_id=purchase_id)
        if row is None or row["type"] != "sale" or row["store_id"] != store_id:
            raise domain.ClaimRefused("unknown_purchase", f"no {source} sale {purchase_id} at store {store_id}", 404)
        lines = json.loads(row["lines"])
        returned = {k: int(v) for k, v in json.loads(row["returned"]).items()}
        kept = domain.kept_lines(lines, returned)
        is_new = domain.check_claim(sale_customer_id=row["customer_id"], claimed_by=customer_id,
                                    sale_occurred_at=row["occurred_at"], now=now,
                                    window_days=settings.claim_window_days, fully_returned=not kept)
        if not is_new:
            return ClaimResult(False, event_id, customer_id)
        await repository.set_claimed(conn, source=source, store_id=store_id, purchase_id=purchase_id,
                                     customer_id=customer_id, claimed_at=now)
        total = sum((domain.LineIn(**line).net_amount for line in kept), start=domain.Decimal("0"))
        payload = PurchaseClaimedPayload(
            purchase_id=purchase_id, type="sale", source=source, store_id=store_id, occurred_at=row["occurred_at"],
            currency=row["currency"].strip(), lines=kept, total=total, door=row["door"], claimed_at=now)
        event = envelope(PurchaseClaimed, event_id=event_id, occurred_at=now, producer=PRODUCER,
                         correlation_id=correlation_id or str(event_id), customer_id=customer_id, payload=payload,
                         causation_id=str(purchase_event_id(source, store_id, purchase_id)), recorded_at=now)
        await enqueue(conn, [OutboxMessage.event(settings.topic(PURCHASES_RECORDED), event, key=customer_id)])
    return ClaimResult(True, event_id, customer_id)
