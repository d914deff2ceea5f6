"""The rewards service in-process for tests, tokens, and a small fake ledger that answers
the redemption saga on points.events the way the ledger's contract says (shared/events)."""

import asyncio
import base64
import contextlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.rewards.main import create_app
from services.rewards.settings import RewardsSettings
from services.rewards.token import mint_token
from shared.events import envelope, utcnow
from shared.events.points import (
    BalanceAfter,
    PointsAdjusted,
    PointsAdjustedPayload,
    PointsHeld,
    PointsHeldPayload,
    PointsHoldRejected,
    PointsHoldRejectedPayload,
    PointsRedeemed,
    PointsRedeemedPayload,
    PointsReleased,
    PointsReleasedPayload,
)
from shared.topics import POINTS_EVENTS, REWARDS_EVENTS

JWT_SECRET = "test-secret-for-rewards-0123456789abcdef"
ADMIN_KEY = "admin-test-key"
ADMIN = {"X-Admin-Key": ADMIN_KEY}


def rewards_settings(base_env: dict[str, str], **overrides: Any) -> RewardsSettings:
    values: dict[str, Any] = {k.lower(): v for k, v in base_env.items()}
    values.update(jwt_secret=JWT_SECRET, admin_api_key=ADMIN_KEY, saga_wait_ms=2000, recovery_interval_s=0.5,
                  request_resend_after_s=2.0, metrics_sample_interval_s=1.0)
    values.update(overrides)
    return RewardsSettings(**values)


def bearer(customer_id: str, settings: RewardsSettings, **kwargs: Any) -> dict[str, str]:
    token = mint_token(customer_id, key=JWT_SECRET, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
                       **kwargs)
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def running_rewards(settings: RewardsSettings):
    """The service in this process (consumer, relay, recovery included) and a client for it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rewards",
                                     timeout=30) as client:
            yield app, client


@dataclass
class _Hold:
    customer_id: str
    amount_points: int
    state: str  # held, posted, voided, refunded


@dataclass
class FakeLedger:
    """Consumes rewards.events and answers on points.events: holds when the balance allows,
    posts on fulfilment, voids on failure, refunds on cancellation. Idempotent by
    redemption_id like the real one. `paused` holds answers back (a slow or dead ledger)."""

    bootstrap: str
    settings: RewardsSettings
    available: dict[str, int] = field(default_factory=dict)
    holds: dict[uuid.UUID, _Hold] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    paused: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.paused.set()  # set = running
        self._task: asyncio.Task | None = None
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=1)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None,
                                          fetch_max_wait_ms=10)

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
        topic = self.settings.topic(REWARDS_EVENTS)
        partitions = self._consumer.partitions_for_topic(topic)
        while not partitions:
            await self._consumer.topics()
            await asyncio.sleep(0.05)
            partitions = self._consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()
        await self._producer.stop()

    def pause(self) -> None:
        self.paused.clear()

    def resume(self) -> None:
        self.paused.set()

    def held_points(self, customer_id: str) -> int:
        return sum(h.amount_points for h in self.holds.values() if h.customer_id == customer_id and h.state == "held")

    def balance(self, customer_id: str) -> BalanceAfter:
        return BalanceAfter(available_points=self.available.get(customer_id, 0), pending_points=0,
                            held_points=self.held_points(customer_id), debt_points=0, tier="Bronze",
                            qualifying_points=0)

    async def credit(self, customer_id: str, amount_points: int, *, tier: str = "Bronze") -> None:
        self.available[customer_id] = self.available.get(customer_id, 0) + amount_points
        balance = self.balance(customer_id).model_copy(update={"tier": tier})
        await self._emit(customer_id, envelope(
            PointsAdjusted, event_id=uuid.uuid4(), occurred_at=utcnow(), producer="fake-ledger",
            correlation_id="seed", customer_id=customer_id,
            payload=PointsAdjustedPayload(amount_points=amount_points, balance=balance, reason_code="seed",
                                          actor="test"),
        ))

    async def _emit(self, customer_id: str, event: Any) -> None:
        self.answered.append(event.type)
        await (await self._producer.send(self.settings.topic(POINTS_EVENTS), event.model_dump_json().encode(),
                                         key=customer_id.encode()))

    async def _run(self) -> None:
        while True:
            await self.paused.wait()
            batch = await self._consumer.getmany(timeout_ms=20, max_records=500)
            for records in batch.values():
                for r in records:
                    await self.paused.wait()
                    event = json.loads(r.value)
                    self.seen.append(event)
                    await self._answer(event)

    async def _answer(self, event: dict[str, Any]) -> None:
        p = event["payload"]
        rid = uuid.UUID(p["redemption_id"])
        customer = event["customer_id"]
        cost = p["cost_points"]
        common = dict(event_id=uuid.uuid4(), occurred_at=utcnow(), producer="fake-ledger",
                      correlation_id=event["correlation_id"], causation_id=event["event_id"], customer_id=customer)
        hold = self.holds.get(rid)
        if event["type"] == "RedemptionRequested":
            if hold is not None:
                payload = PointsHoldRejectedPayload(amount_points=cost, balance=self.balance(customer),
                                                    redemption_id=rid, reason="duplicate_redemption")
                await self._emit(customer, envelope(PointsHoldRejected, payload=payload, **common))
            elif self.available.get(customer, 0) >= cost:
                self.available[customer] -= cost
                self.holds[rid] = _Hold(customer, cost, "held")
                payload = PointsHeldPayload(amount_points=cost, balance=self.balance(customer), redemption_id=rid,
                                            hold_expires_at=utcnow() + timedelta(seconds=p["hold_timeout_s"]))
                await self._emit(customer, envelope(PointsHeld, payload=payload, **common))
            else:
                self.holds[rid] = _Hold(customer, cost, "rejected")
                payload = PointsHoldRejectedPayload(amount_points=cost, balance=self.balance(customer),
                                                    redemption_id=rid, reason="insufficient_points")
                await self._emit(customer, envelope(PointsHoldRejected, payload=payload, **common))
        elif event["type"] == "RedemptionFulfilled" and hold is not None and hold.state == "held":
            hold.state = "posted"
            payload = PointsRedeemedPayload(amount_points=cost, balance=self.balance(customer), redemption_id=rid)
            await self._emit(customer, envelope(PointsRedeemed, payload=payload, **common))
        elif event["type"] == "RedemptionFailed" and hold is not None and hold.state == "held":
            hold.state = "voided"
            self.available[customer] += cost
            payload = PointsReleasedPayload(amount_points=cost, balance=self.balance(customer), redemption_id=rid,
                                            phase="void", reason=p["reason"])
            await self._emit(customer, envelope(PointsReleased, payload=payload, **common))
        elif event["type"] == "RedemptionCancelled" and hold is not None and hold.state == "posted":
            hold.state = "refunded"
            self.available[customer] += cost
            payload = PointsReleasedPayload(amount_points=cost, balance=self.balance(customer), redemption_id=rid,
                                            phase="refund", reason=p["reason"])
            await self._emit(customer, envelope(PointsReleased, payload=payload, **common))


@contextlib.asynccontextmanager
async def fake_ledger(bootstrap: str, settings: RewardsSettings):
    ledger = FakeLedger(bootstrap, settings)
    await ledger.start()
    try:
        yield ledger
    finally:
        await ledger.stop()


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def assert_bad_tokens_refused(client: httpx.AsyncClient, settings: RewardsSettings, *, victim: str,
                                    redemption_id: str, reward_id: str) -> None:
    """Missing, expired, tampered, alg:none and wrong-audience tokens naming `victim` get 401
    on every customer endpoint, including the ones that would act on the victim's redemption."""
    good = bearer(victim, settings)["Authorization"].removeprefix("Bearer ")
    header, _payload, signature = good.split(".")
    now = int(utcnow().timestamp())
    claims = {"sub": victim, "iss": settings.jwt_issuer, "aud": settings.jwt_audience, "iat": now, "exp": now + 600}
    tokens = {
        "missing": None,
        "expired": bearer(victim, settings, now_s=now - 7200, ttl_s=60)["Authorization"].removeprefix("Bearer "),
        # a payload swapped under the victim's real signature
        "tampered": f"{header}.{_b64(claims | {'exp': now + 86_400 * 365})}.{signature}",
        "alg_none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
        "wrong_audience": bearer(victim, settings.model_copy(update={"jwt_audience": "other"}))[
            "Authorization"].removeprefix("Bearer "),
        "wrong_key": mint_token(victim, key="another-secret-" + "x" * 32, issuer=settings.jwt_issuer,
                                audience=settings.jwt_audience),
    }
    endpoints = [("GET", "/v1/rewards", None), ("POST", "/v1/redemptions", {"reward_id": reward_id}),
                 ("GET", f"/v1/redemptions/{redemption_id}", None), ("GET", "/v1/redemptions", None),
                 ("POST", f"/v1/redemptions/{redemption_id}/cancel", None)]
    for name, token in tokens.items():
        headers = {"Idempotency-Key": f"bad-{name}"} | ({"Authorization": f"Bearer {token}"} if token else {})
        for method, path, body in endpoints:
            response = await client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (name, path, response.text)
            assert response.json()["error"] in ("missing_token", "invalid_token"), (name, path)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def outcome(client: httpx.AsyncClient, headers: dict[str, str], response: httpx.Response,
                  *, timeout_s: float = 30.0) -> dict[str, Any]:
    """The redemption a POST /v1/redemptions answered, once it is no longer in flight: a 200
    carries it; a 202 (the saga outlasted the wait, e.g. on a busy machine) is followed to
    its status URL."""
    assert response.status_code in (200, 202), response.text
    body = response.json()
    if body["status"] != "requested":
        return body

    async def finished():
        current = (await client.get(response.headers["Location"], headers=headers)).json()
        return current if current["status"] != "requested" else None

    return await eventually(finished, timeout_s=timeout_s)


async def eventually(predicate, *, timeout_s: float = 10.0, interval_s: float = 0.05):
    """Poll an async predicate until it returns a truthy value (returned) or time runs out."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last value: {value!r})")
        await asyncio.sleep(interval_s)
