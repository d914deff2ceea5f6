"""Fault injection (`make chaos`): a sustained stream of purchases and redemptions through every
door while the harness kills, freezes and restarts what it runs on; then the end state is
checked against an independent reference model (bench/reference.py) computed from the inputs.

    .venv/bin/python -m bench.chaos [--size quick|full] [--seed N] [--keep]

The run has its own broker and durable PostgreSQL (bench.harness.infra), and the purchases,
ledger and rewards services as processes with a 6 s consumer session timeout. The stream, from
the seed: POS sales on purchases.raw (keyed by customer) and as HTTP batches, Shopify orders as
signed webhooks; the same sale through Kafka and HTTP, resent webhooks and Kafka resends;
partial returns and refunds through each door; malformed inputs on purchases.raw; customers
funded by idempotent ledger adjustments redeeming (and some cancelling) vouchers through the
rewards HTTP API. HTTP senders retry connection errors, timeouts and 5xx with the same body and
Idempotency-Key, as a POS back-end would.

Meanwhile, repeatedly: kill -9 of a random service at a random moment and its restart; SIGSTOP
of the broker, and separately of the whole PostgreSQL cluster, for longer than the session
timeout; `pg_ctl restart -m fast`. Then, once quiet (outboxes empty, every consumer group's
committed offsets at the end offsets), the checks: every accepted purchase credited exactly
once, balances, lots, qualifying points and tiers as the reference says, debits equal credits,
every redemption fulfilled or cancelled and refunded with the ledger's holds agreeing, no open
hold, no lag, and purchases.dlq holding exactly the malformed inputs (points.dlq and rewards.dlq
empty). Prints a table and one JSON line; exits 1 on any mismatch.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import secrets
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from bench import reference as ref
from bench.harness import (
    Infra, Service, create_topics, group_lag, infra, paused, pg_processes, pg_restart, process_tree, progress,
    progress_done, read_topic,
)
from services.rewards.token import mint_token
from shared.topics import (
    ALL_TOPICS, POINTS_DLQ, POINTS_EVENTS, PURCHASES_DLQ, PURCHASES_RAW, PURCHASES_RECORDED, REWARDS_DLQ,
    REWARDS_EVENTS,
)

PARTITIONS = 4
SESSION_TIMEOUT_MS = 6000
GROUP_PREFIX = "chaos"
# (topic, consumer group) of every consumer in the run: all must be caught up at the end.
GROUPS = (
    (PURCHASES_RAW, f"{GROUP_PREFIX}.purchases.ingest"),
    (PURCHASES_RECORDED, f"{GROUP_PREFIX}.ledger.purchases"),
    (REWARDS_EVENTS, f"{GROUP_PREFIX}.ledger.rewards"),
    (POINTS_EVENTS, f"{GROUP_PREFIX}.rewards.points-events"),
)
FAULT_KINDS = ("kill9", "broker_sigstop", "postgres_sigstop", "postgres_restart")
SERVICES = ("purchases", "ledger", "rewards")

SIZES = {
    # purchases, their offered rate, redeemers, and faults at least (each kind at least once)
    "quick": {"sales": 5_000, "rate_per_s": 90, "chunk": 100, "redeemers": 40, "min_faults": 6},
    "full": {"sales": 100_000, "rate_per_s": 350, "chunk": 350, "redeemers": 400, "min_faults": 12},
}
PAUSE_S = (SESSION_TIMEOUT_MS / 1000 + 1.5, SESSION_TIMEOUT_MS / 1000 + 4)
QUALIFYING_CAP_POINTS = 900  # below Silver (1,000): tiers stay Bronze
STORES = {"chaos-pos-1": "chaos-key-" + secrets.token_hex(8), "chaos-pos-2": "chaos-key-" + secrets.token_hex(8)}
SHOPIFY_SECRET = "chaos-shopify-" + secrets.token_hex(16)
ADMIN_KEY = "chaos-admin-" + secrets.token_hex(8)
JWT_SECRET = secrets.token_hex(32)
ISSUER, AUDIENCE = "loyalty-local", "loyalty-rewards"
REWARDS = {"chaos-voucher-10": 10, "chaos-voucher-25": 25}
SKUS = [("MILK", "grocery"), ("COFFEE", "grocery"), ("SOCKS", "clothing"), ("CABLE", "electronics"),
        ("MUG", "home"), ("SOAP", "beauty"), ("PEN", "office")]


# ---- the plan: every input of the run, from the seed ---------------------------------------


@dataclass
class Send:
    """One delivery attempt through one door (a duplicate is a second Send)."""

    door: str  # kafka | http | shopify
    kind: str  # sale | return | malformed | conflict | over_return
    key: str = ""  # Kafka key, or the HTTP store id
    body: bytes | dict = b""
    shopify_topic: str = ""


@dataclass
class Plan:
    sales: list[ref.Sale] = field(default_factory=list)
    returns: list[ref.Return] = field(default_factory=list)
    fundings: list[ref.Funding] = field(default_factory=list)
    redemptions: list[ref.Redemption] = field(default_factory=list)
    chunks: list[list[Send]] = field(default_factory=list)
    malformed: set[bytes] = field(default_factory=set)  # the bytes that must end in purchases.dlq
    redeemers: dict[str, tuple[list[ref.Funding], list[tuple[ref.Redemption, str]]]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)


def _money(d: Decimal) -> str:
    return format(d.quantize(Decimal("0.01")), "f")


def _lines_json(lines: tuple[ref.Line, ...], categories: dict[str, str]) -> list[dict]:
    return [{"line_id": x.line_id, "sku": x.sku, "category": categories[x.sku], "quantity": x.quantity,
             "unit_price": _money(x.unit_price), "discount": _money(x.discount)} for x in lines]


def pos_body(purchase_id: str, *, kind: str, original: str | None, store: str, customer: str, at: datetime,
             lines: tuple[ref.Line, ...]) -> dict:
    total = sum((x.quantity * x.unit_price - x.discount for x in lines), Decimal(0))
    return {"purchase_id": purchase_id, "type": kind, "original_purchase_id": original, "source": "pos",
            "store_id": store, "customer_id": customer, "occurred_at": at.isoformat(), "currency": "PLN",
            "lines": _lines_json(lines, dict(SKUS)), "total": _money(total)}


def shopify_order(order_id: int, customer: str, at: datetime, lines: tuple[ref.Line, ...]) -> bytes:
    body = {"id": order_id, "customer": {"id": customer}, "processed_at": at.isoformat(),
            "updated_at": at.isoformat(), "created_at": at.isoformat(), "currency": "PLN",
            "line_items": [{"id": int(x.line_id), "sku": x.sku, "quantity": x.quantity, "price": _money(x.unit_price),
                            "total_discount": _money(x.discount)} for x in lines]}
    return json.dumps(body).encode()


def shopify_refund(order_id: int, refund_id: int, at: datetime, bought: dict[str, ref.Line],
                   lines: tuple[ref.Line, ...]) -> bytes:
    body = {"id": refund_id, "order_id": order_id, "created_at": at.isoformat(), "processed_at": at.isoformat(),
            "refund_line_items": [{
                "line_item_id": int(x.line_id), "quantity": x.quantity,
                "subtotal": _money(x.quantity * x.unit_price - x.discount),
                "line_item": {"id": int(x.line_id), "sku": x.sku, "price": _money(x.unit_price),
                              "quantity": bought[x.line_id].quantity,
                              "price_set": {"shop_money": {"amount": _money(x.unit_price), "currency_code": "PLN"}}},
            } for x in lines]}
    return json.dumps(body).encode()


def _random_lines(rng: random.Random, *, numeric_from: int | None = None) -> tuple[ref.Line, ...]:
    lines = []
    for n, (sku, _) in enumerate(rng.sample(SKUS, rng.randint(1, 3)), start=1):
        price = Decimal(rng.randint(100, 4000)) / 100
        quantity = rng.randint(1, 3)
        discount = Decimal(rng.randint(10, 90)) / 100 if rng.random() < 0.15 else Decimal(0)
        line_id = str(numeric_from * 10 + n) if numeric_from is not None else str(n)
        lines.append(ref.Line(line_id, sku, quantity, price, discount))
    return tuple(lines)


def _partial_return(rng: random.Random, lines: tuple[ref.Line, ...], returned: dict[str, int]) -> tuple[ref.Line, ...]:
    """Some of what is left to return (at least one unit of one line), never all of it twice;
    priced as sold, with the line's discount pro rata (as a till refunds it)."""
    left = [x for x in lines if x.quantity - returned.get(x.line_id, 0) > 0]
    if not left:
        return ()
    chosen = rng.sample(left, rng.randint(1, len(left)))
    out = []
    for x in chosen:
        q = rng.randint(1, x.quantity - returned.get(x.line_id, 0))
        returned[x.line_id] = returned.get(x.line_id, 0) + q
        share = (x.discount * q / x.quantity).quantize(Decimal("0.01"))
        out.append(ref.Line(x.line_id, x.sku, q, x.unit_price, share))
    return tuple(out)


def generate(seed: int, sales_n: int, chunk: int, redeemers_n: int) -> Plan:
    rng = random.Random(seed)
    plan = Plan()
    now = datetime.now(timezone.utc)
    chunks_n = (sales_n + chunk - 1) // chunk + 4  # follow-ups land up to 3 chunks later
    plan.chunks = [[] for _ in range(chunks_n)]
    earned: dict[str, int] = defaultdict(int)
    customers: list[str] = []

    def customer_for(points: int) -> str:
        # A known customer with room under the cap, else a new one: qualifying points stay Bronze.
        for _ in range(3):
            if customers:
                c = rng.choice(customers)
                if earned[c] + points <= QUALIFYING_CAP_POINTS:
                    return c
        c = f"cust-{len(customers):06d}"
        customers.append(c)
        return c

    def put(c: int, send: Send) -> None:
        plan.chunks[c].append(send)
        plan.counts[f"{send.door}_{send.kind}"] += 1

    for i in range(sales_n):
        c = i // chunk
        at = now - timedelta(seconds=rng.randint(60, 3600))
        shopify = rng.random() < 0.08
        order_id = 50_000_000 + i
        lines = _random_lines(rng, numeric_from=order_id if shopify else None)
        points = ref.floor_points(sum((x.net_amount for x in lines), Decimal(0)))
        customer = customer_for(points)
        earned[customer] += points
        if shopify:
            sale = ref.Sale(str(order_id), customer, lines)
            body = shopify_order(order_id, customer, at, lines)
            put(c, Send("shopify", "sale", body=body, shopify_topic="orders/paid"))
            if rng.random() < 0.2:  # Shopify retries a delivery it thinks failed
                put(c + rng.randint(0, 1), Send("shopify", "sale", body=body, shopify_topic="orders/paid"))
            returned: dict[str, int] = {}
            for k in range(rng.choice((0, 0, 0, 0, 1, 1, 2))):
                rlines = _partial_return(rng, lines, returned)
                if not rlines:
                    break
                refund_id = 70_000_000 + i * 3 + k
                plan.returns.append(ref.Return(f"{order_id}-refund-{refund_id}", sale.purchase_id, rlines))
                put(c + 1 + k, Send("shopify", "return", body=shopify_refund(order_id, refund_id, at, dict(
                    (x.line_id, x) for x in lines), rlines), shopify_topic="refunds/create"))
            plan.sales.append(sale)
            continue
        purchase_id = f"pos-{seed}-{i}"
        store = rng.choice(list(STORES))
        sale = ref.Sale(purchase_id, customer, lines)
        body = pos_body(purchase_id, kind="sale", original=None, store=store, customer=customer, at=at, lines=lines)
        roll = rng.random()
        doors = ["kafka"] if roll < 0.55 else ["http"] if roll < 0.80 else ["kafka", "http"] if roll < 0.93 \
            else ["kafka", "kafka"]
        for door in doors:
            put(c, Send(door, "sale", key=customer if door == "kafka" else store,
                        body=json.dumps(body).encode() if door == "kafka" else body))
        plan.sales.append(sale)
        returned = {}
        for k in range(rng.choice((0, 0, 0, 0, 0, 1, 1, 2))):
            rlines = _partial_return(rng, lines, returned)
            if not rlines:
                break
            rid = f"{purchase_id}-r{k}"
            rbody = pos_body(rid, kind="return", original=purchase_id, store=store, customer=customer,
                             at=at + timedelta(seconds=30 + k), lines=rlines)
            plan.returns.append(ref.Return(rid, purchase_id, rlines))
            # Over HTTP only when the sale went over HTTP: the till then knows it was recorded.
            door = rng.choice(("kafka", "http")) if "http" in doors else "kafka"
            put(c + 1 + k, Send(door, "return", key=customer if door == "kafka" else store,
                                body=json.dumps(rbody).encode() if door == "kafka" else rbody))
            if rng.random() < 0.2:  # the same return again, through Kafka
                put(c + 2 + k, Send("kafka", "return", key=customer, body=json.dumps(rbody).encode()))
        if rng.random() < 0.004:  # the same purchase id with other content: a conflict, dead-lettered
            changed = dict(body, total=_money(Decimal(body["total"]) + lines[0].quantity),
                           lines=[dict(body["lines"][0], unit_price=_money(lines[0].unit_price + 1))] + body["lines"][1:])
            _malformed(plan, put, c + 1, customer, json.dumps(changed).encode(), "conflict")
        if rng.random() < 0.003:  # returning more than was bought
            over = (ref.Line(lines[0].line_id, lines[0].sku, lines[0].quantity + 1, lines[0].unit_price),)
            obody = pos_body(f"{purchase_id}-over", kind="return", original=purchase_id, store=store,
                             customer=customer, at=at + timedelta(seconds=40), lines=over)
            _malformed(plan, put, c + 1, customer, json.dumps(obody).encode(), "over_return")
        if rng.random() < 0.008:
            _malformed(plan, put, c, customer, _broken(rng, body, i), "malformed")

    # Redeemers: some purchasing customers, some only funded. Funding covers every redemption.
    pool = customers[: redeemers_n // 2] + [f"redeemer-{n:05d}" for n in range(redeemers_n - redeemers_n // 2)]
    for n, customer in enumerate(pool):
        redemptions = []
        for k in range(rng.randint(2, 4)):
            reward_id = rng.choice(list(REWARDS))
            r = ref.Redemption(f"chaos-{seed}-{n}-{k}", customer, REWARDS[reward_id], cancel=rng.random() < 0.2)
            redemptions.append((r, reward_id))
            plan.redemptions.append(r)
        need = sum(r.cost_points for r, _ in redemptions) + rng.randint(0, 20)
        first = rng.randint(1, need - 1)
        fundings = [ref.Funding(str(uuid.uuid5(uuid.NAMESPACE_URL, f"chaos/{seed}/{customer}/{k}")), customer, amount)
                    for k, amount in enumerate((first, need - first))]
        plan.fundings.extend(fundings)
        plan.redeemers[customer] = (fundings, redemptions)
    plan.counts["redemptions"] = len(plan.redemptions)
    plan.counts["cancellations"] = sum(r.cancel for r in plan.redemptions)
    plan.counts["fundings"] = len(plan.fundings)
    return plan


def _malformed(plan: Plan, put, c: int, key: str, value: bytes, kind: str) -> None:
    plan.malformed.add(value)
    put(c, Send("kafka", kind, key=key, body=value))


def _broken(rng: random.Random, body: dict, i: int) -> bytes:
    """An input no till should send: each kind of refusal the Kafka door knows."""
    bad = dict(body, purchase_id=f"bad-{i}")
    kind = rng.choice(("json", "missing", "total", "currency", "future", "negative"))
    if kind == "json":
        return json.dumps(bad).encode()[:-7]
    if kind == "missing":
        bad.pop("lines")
    elif kind == "total":
        bad["total"] = _money(Decimal(bad["total"]) + Decimal("0.01"))
    elif kind == "currency":
        bad["currency"] = "QQQ"
    elif kind == "future":
        bad["occurred_at"] = (datetime.now(timezone.utc) + timedelta(days=2)).isoformat()
    else:
        bad["lines"] = [dict(bad["lines"][0], quantity=-1)] + bad["lines"][1:]
    return json.dumps(bad).encode()


# ---- driving the doors -------------------------------------------------------------------------


def shopify_signature(body: bytes) -> str:
    """X-Shopify-Hmac-Sha256: base64 of the HMAC-SHA256 of the raw body with the shop's secret."""
    return base64.b64encode(hmac.new(SHOPIFY_SECRET.encode(), body, hashlib.sha256).digest()).decode()


@dataclass
class Stats:
    sent: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    redemption_status: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # key -> (status, reason)


async def with_retries(call, stats: Stats, label: str, *, deadline_s: float = 900):
    """Retry what a real client retries (connection errors, timeouts, 5xx), with the same
    request. Other answers go back to the caller."""
    deadline = time.monotonic() + deadline_s
    backoff_s = 0.2
    while True:
        try:
            response = await call()
            if response.status_code < 500:
                return response
            stats.retries[f"{label}_5xx"] += 1
        except httpx.TransportError as exc:
            stats.retries[f"{label}_{type(exc).__name__}"] += 1
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: no answer for {deadline_s}s")
        await asyncio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, 2.0)


class Driver:
    def __init__(self, env: Infra, services: dict[str, Service], plan: Plan, stats: Stats) -> None:
        self.env, self.services, self.plan, self.stats = env, services, plan, stats
        self.http = httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=64))
        self.producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap, acks="all", linger_ms=5,
                                         request_timeout_ms=60_000, max_batch_size=512 * 1024)

    async def start(self) -> None:
        await self.producer.start()

    async def close(self) -> None:
        await self.http.aclose()
        await self.producer.stop()

    async def stream(self, rate_per_s: float, chunk: int) -> None:
        """Chunk by chunk at the offered rate; a chunk's follow-ups (returns, conflicts) come in
        later chunks, after the sales they refer to were delivered."""
        started = time.monotonic()
        for n, sends in enumerate(self.plan.chunks):
            due = started + n * chunk / rate_per_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await asyncio.gather(self._kafka([s for s in sends if s.door == "kafka"]),
                                 self._http_batches([s for s in sends if s.door == "http"]),
                                 *(self._webhook(s) for s in sends if s.door == "shopify"))
            sent = sum(self.stats.sent.values())
            progress(f"stream: chunk {n + 1}/{len(self.plan.chunks)}, {sent:,} sent, "
                     f"redemptions {len(self.stats.redemption_status):,}/{len(self.plan.redemptions):,}")

    async def _kafka(self, sends: list[Send]) -> None:
        for _attempt in range(100):
            try:
                futures = [await self.producer.send(PURCHASES_RAW, s.body, key=s.key.encode()) for s in sends]
                await asyncio.gather(*futures)
                break
            except KafkaError:
                # Some may have been written: resending is what a till does (a duplicate at most;
                # the dead-letter check reads the topic, so a resent malformed input counts twice).
                self.stats.retries["kafka"] += 1
                await asyncio.sleep(0.5)
        else:
            self.stats.problems.append("kafka: gave up producing a chunk")
        for s in sends:
            self.stats.sent[f"kafka_{s.kind}"] += 1

    async def _http_batches(self, sends: list[Send]) -> None:
        by_store: dict[str, list[Send]] = defaultdict(list)
        for s in sends:
            by_store[s.key].append(s)
        jobs = []
        for store, items in by_store.items():
            for i in range(0, len(items), 50):
                jobs.append(self._http_batch(store, items[i:i + 50]))
        await asyncio.gather(*jobs)

    async def _http_batch(self, store: str, items: list[Send]) -> None:
        url = f"{self.services['purchases'].url}/v1/purchases/batch"
        body = {"purchases": [s.body for s in items]}
        response = await with_retries(lambda: self.http.post(url, json=body, headers={"X-API-Key": STORES[store]}),
                                      self.stats, "http")
        if response.status_code != 200:
            self.stats.problems.append(f"http batch answered {response.status_code}: {response.text[:300]}")
            return
        for s, result in zip(items, response.json()["results"]):
            self.stats.sent[f"http_{s.kind}"] += 1
            self.stats.outcomes[f"http_{result['status']}"] += 1
            if result["status"] not in ("recorded", "duplicate"):
                self.stats.problems.append(f"http {s.body['purchase_id']}: {result}")

    async def _webhook(self, s: Send) -> None:
        url = f"{self.services['purchases'].url}/v1/webhooks/shopify"
        headers = {"X-Shopify-Topic": s.shopify_topic, "X-Shopify-Hmac-Sha256": shopify_signature(s.body),
                   "Content-Type": "application/json", "X-Shopify-Webhook-Id": str(uuid.uuid4())}
        response = await with_retries(lambda: self.http.post(url, content=s.body, headers=headers), self.stats,
                                      "shopify")
        self.stats.sent[f"shopify_{s.kind}"] += 1
        status = response.json().get("status") if response.headers.get("content-type", "").startswith(
            "application/json") else None
        self.stats.outcomes[f"shopify_{status}"] += 1
        if response.status_code not in (200, 201, 202) or status not in ("recorded", "duplicate", "parked"):
            self.stats.problems.append(f"shopify {s.shopify_topic} answered {response.status_code}: {response.text[:300]}")

    # -- redemptions --

    async def redemptions(self, spread_s: float, concurrency: int = 24) -> None:
        gate = asyncio.Semaphore(concurrency)
        rng = random.Random(len(self.plan.redeemers))

        async def one(customer: str, delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            async with gate:
                await self._redeemer(customer)

        await asyncio.gather(*(one(c, rng.uniform(0, spread_s)) for c in self.plan.redeemers))

    def _token(self, customer: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + mint_token(customer, key=JWT_SECRET, issuer=ISSUER, audience=AUDIENCE)}

    async def _redeemer(self, customer: str) -> None:
        fundings, redemptions = self.plan.redeemers[customer]
        ledger_url = self.services["ledger"].url
        for n, f in enumerate(fundings):
            body = {"adjustment_id": f.adjustment_id, "customer_id": customer, "amount_points": f.amount_points,
                    "reason_code": "goodwill", "actor": "chaos"}
            for _ in range(2 if n == 0 else 1):  # the first one twice: the same adjustment_id never adds twice
                r = await with_retries(lambda: self.http.post(f"{ledger_url}/v1/admin/adjustments", json=body,
                                                              headers={"X-Admin-Key": ADMIN_KEY}), self.stats, "ledger")
                self.stats.sent["adjustments"] += 1
                if r.status_code not in (200, 201):
                    self.stats.problems.append(f"adjustment for {customer} answered {r.status_code}: {r.text[:300]}")
        rewards_url = self.services["rewards"].url
        for r, reward_id in redemptions:
            response = await with_retries(lambda: self.http.post(
                f"{rewards_url}/v1/redemptions", json={"reward_id": reward_id},
                headers={**self._token(customer), "Idempotency-Key": r.key}), self.stats, "rewards")
            self.stats.sent["redemptions"] += 1
            if response.status_code not in (200, 202):
                self.stats.problems.append(f"redemption {r.key} answered {response.status_code}: {response.text[:300]}")
                continue
            redemption = await self._until_done(customer, response.json())
            if r.cancel and redemption["status"] == "fulfilled":
                redemption = await self._cancel(customer, redemption)
            self.stats.redemption_status[r.key] = (redemption["status"], redemption.get("failure_reason"))

    async def _until_done(self, customer: str, redemption: dict, *, timeout_s: float = 600) -> dict:
        url = f"{self.services['rewards'].url}/v1/redemptions/{redemption['redemption_id']}"
        deadline = time.monotonic() + timeout_s
        while redemption["status"] == "requested" and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            response = await with_retries(lambda: self.http.get(url, headers=self._token(customer)), self.stats,
                                          "rewards")
            if response.status_code == 200:
                redemption = response.json()
        return redemption

    async def _cancel(self, customer: str, redemption: dict) -> dict:
        rid = redemption["redemption_id"]
        base = f"{self.services['rewards'].url}/v1/redemptions/{rid}"
        for _ in range(60):
            response = await with_retries(lambda: self.http.post(f"{base}/cancel", headers=self._token(customer)),
                                          self.stats, "rewards")
            self.stats.sent["cancellations"] += 1
            if response.status_code == 200:
                return response.json()
            # A cancel whose answer was lost answers 409 when repeated: look at what happened.
            current = await with_retries(lambda: self.http.get(base, headers=self._token(customer)), self.stats,
                                         "rewards")
            if current.status_code == 200 and current.json()["status"] == "cancelled":
                return current.json()
            await asyncio.sleep(0.5)
        self.stats.problems.append(f"cancellation of {rid} never succeeded: {response.status_code} {response.text[:200]}")
        return redemption


# ---- faults ------------------------------------------------------------------------------------


@dataclass
class Faults:
    injected: Counter = field(default_factory=Counter)
    kills: Counter = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)


async def inject_faults(env: Infra, services: dict[str, Service], faults: Faults, rng: random.Random,
                        *, min_faults: int, done: asyncio.Event) -> None:
    """Faults one after another until the stream is done and at least `min_faults` (every
    kind, every service killed) were injected."""
    schedule: list[tuple[str, str | None]] = [("kill9", s) for s in SERVICES] + [
        (k, None) for k in FAULT_KINDS if k != "kill9"]
    rng.shuffle(schedule)
    started = time.monotonic()
    while not (done.is_set() and sum(faults.injected.values()) >= min_faults):
        if not schedule:
            kind = rng.choice(FAULT_KINDS + ("kill9",))  # kills twice as often as each other kind
            schedule.append((kind, rng.choice(SERVICES) if kind == "kill9" else None))
        kind, victim = schedule.pop(0)
        await asyncio.sleep(rng.uniform(1.0, 4.0))  # a random moment
        for s in services.values():
            if not s.alive():
                faults.unexpected_exits.append(f"{s.name} exited on its own; see {s.log_path}")
                s.start()
                await s.wait_ready(180)
        at = time.monotonic() - started
        if kind == "kill9":
            service = services[victim]
            service.kill9()
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            service.start()
            await service.wait_ready(180)
            faults.kills[victim] += 1
            what = f"kill -9 {victim}, restarted"
        elif kind == "broker_sigstop":
            pause_s = rng.uniform(*PAUSE_S)
            async with paused(process_tree(env.broker.pid)):
                await asyncio.sleep(pause_s)
            what = f"broker SIGSTOP {pause_s:.1f}s"
        elif kind == "postgres_sigstop":
            pause_s = rng.uniform(*PAUSE_S)
            async with paused(pg_processes(env.pg)) as n:
                await asyncio.sleep(pause_s)
            what = f"PostgreSQL SIGSTOP ({n} processes) {pause_s:.1f}s"
        else:
            await asyncio.to_thread(pg_restart, env.pg)
            what = "pg_ctl restart -m fast"
        faults.injected[kind] += 1
        faults.log.append(f"{at:7.1f}s {what}")
        sys.stderr.write(f"\r\x1b[2Kfault {faults.log[-1]}\n")


# ---- quiet and checks --------------------------------------------------------------------------


async def wait_until_quiet(env: Infra, *, timeout_s: float) -> dict:
    """Outboxes empty, no parked return, no redemption in flight, every group caught up:
    twice in a row, a second apart."""
    deadline = time.monotonic() + timeout_s
    quiet_in_a_row = 0
    state: dict = {}
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(env.dsn())
            try:
                state = {
                    "outbox_rows": sum([await conn.fetchval(f"SELECT count(*) FROM {s}.outbox") for s in SERVICES]),
                    "parked_returns": await conn.fetchval("SELECT count(*) FROM purchases.parked_returns"),
                    "redemptions_in_flight": await conn.fetchval(
                        "SELECT count(*) FROM rewards.redemptions WHERE status = 'requested'"),
                }
            finally:
                await conn.close()
            lags = {group: sum((await group_lag(env.bootstrap, group, topic, PARTITIONS)).values())
                    for topic, group in GROUPS}
            state["lag"] = lags
        except (OSError, asyncpg.PostgresError, KafkaError) as exc:
            state = {"error": repr(exc)}
            quiet_in_a_row = 0
            await asyncio.sleep(1)
            continue
        quiet = not any(v for k, v in state.items() if k != "lag") and not any(state["lag"].values())
        quiet_in_a_row = quiet_in_a_row + 1 if quiet else 0
        progress(f"waiting until quiet: {state}")
        if quiet_in_a_row >= 2:
            progress_done()
            return {"quiet": True, **state}
        await asyncio.sleep(1)
    progress_done()
    return {"quiet": False, **state}


async def check(env: Infra, plan: Plan, stats: Stats, expected: ref.Expected, quiet: dict) -> tuple[list[str], dict]:
    mismatches: list[str] = []
    figures: dict = {}

    def expect(ok: bool, what: str) -> None:
        if not ok:
            mismatches.append(what)

    expect(quiet["quiet"], f"never quiet: {quiet}")
    conn = await asyncpg.connect(env.dsn())
    try:
        # purchases: every sale and return recorded once
        rows = await conn.fetch("SELECT purchase_id, type FROM purchases.purchases")
        recorded = Counter((r["purchase_id"], r["type"]) for r in rows)
        wanted = Counter([(s.purchase_id, "sale") for s in plan.sales] + [(r.return_id, "return") for r in plan.returns])
        expect(recorded == wanted, f"purchases recorded differ: missing {list((wanted - recorded).items())[:5]}, "
                                   f"unexpected {list((recorded - wanted).items())[:5]}")

        # ledger: transfers per purchase, return, adjustment, redemption
        transfers = await conn.fetch(
            "SELECT code, ref, count(*) AS n, sum(amount_points) AS points FROM ledger.transfers GROUP BY code, ref")
        by_code: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
        for t in transfers:
            by_code[t["code"]][t["ref"]] = (t["n"], int(t["points"]))
        figures["transfers_by_code"] = {code: sum(n for n, _ in refs.values()) for code, refs in by_code.items()}
        _compare(mismatches, "earn transfers", by_code.pop("earn", {}), {k: (1, v) for k, v in expected.earn_points.items()})
        # returns: at most one reversal each, and together what the reference takes back per sale
        reversals = by_code.pop("reverse", {})
        unknown = {k: v for k, v in reversals.items() if k not in expected.sale_of_return or v[0] != 1}
        expect(not unknown, f"reverse transfers of unknown returns or repeated: {list(unknown.items())[:5]}")
        reversed_by_sale: Counter = Counter()
        for return_id, (_, points) in reversals.items():
            reversed_by_sale[expected.sale_of_return.get(return_id, "?")] += points
        _compare(mismatches, "points reversed per sale", {k: v for k, v in reversed_by_sale.items() if v},
                 {k: v for k, v in expected.reversal_points_by_sale.items() if v})
        _compare(mismatches, "adjust transfers", by_code.pop("adjust", {}),
                 {f.adjustment_id: (1, f.amount_points) for f in plan.fundings})

        redemptions = await conn.fetch(
            "SELECT redemption_id, customer_id, idempotency_key, status, ledger_status, failure_reason, cost_points "
            "FROM rewards.redemptions")
        by_key = {r["idempotency_key"]: r for r in redemptions}
        rid_of = {k: str(r["redemption_id"]) for k, r in by_key.items()}
        want_hold, want_post, want_refund = {}, {}, {}
        for r in plan.redemptions:
            if r.key not in rid_of:
                continue
            rid = rid_of[r.key]
            want_hold[rid] = want_post[rid] = (1, r.cost_points)
            if r.cancel:
                want_refund[rid] = (1, r.cost_points)
        _compare(mismatches, "hold transfers", by_code.pop("hold", {}), want_hold)
        _compare(mismatches, "post transfers", by_code.pop("post", {}), want_post)
        _compare(mismatches, "refund transfers", by_code.pop("refund", {}), want_refund)
        for code, refs in by_code.items():  # void, debt, debt_payoff, mature, expire: none expected
            mismatches.append(f"unexpected {code} transfers: {len(refs)} (e.g. {list(refs.items())[:3]})")

        # redemptions: every one as planned, the rewards service and the ledger agree, no open hold
        holds = {str(h["redemption_id"]): h for h in await conn.fetch(
            "SELECT redemption_id, customer_id, amount_points, state FROM ledger.holds")}
        ledger_word = {"fulfilled": "redeemed", "cancelled": "released"}
        for r in plan.redemptions:
            row = by_key.get(r.key)
            if row is None:
                mismatches.append(f"redemption {r.key} missing in the rewards service")
                continue
            want = expected.redemption_outcome[r.key]
            expect(row["status"] == want and row["customer_id"] == r.customer_id,
                   f"redemption {r.key}: {row['status']} ({row['failure_reason']}), expected {want}")
            expect(row["ledger_status"] == ledger_word[want],
                   f"redemption {r.key}: ledger_status {row['ledger_status']}, expected {ledger_word[want]}")
            hold = holds.pop(str(row["redemption_id"]), None)
            expect(hold is not None and hold["state"] == expected.hold_state[r.key]
                   and hold["amount_points"] == r.cost_points,
                   f"redemption {r.key}: ledger hold {dict(hold) if hold else None}, expected {expected.hold_state[r.key]}")
        expect(len(by_key) == len(plan.redemptions), f"{len(by_key)} redemptions in the rewards service, "
                                                     f"{len(plan.redemptions)} requested")
        expect(not holds, f"{len(holds)} ledger holds without a planned redemption: {list(holds.values())[:3]}")
        open_holds = await conn.fetchval("SELECT count(*) FROM ledger.holds WHERE state = 'held'")
        expect(open_holds == 0, f"{open_holds} holds still open")
        figures["redemptions"] = dict(Counter(r["status"] for r in redemptions))

        # balances, qualifying points and tiers
        accounts = await conn.fetch("SELECT customer_id, kind, debits_pending, debits_posted, credits_pending, "
                                    "credits_posted FROM ledger.accounts WHERE customer_id IS NOT NULL")
        balance: dict[str, dict[str, int]] = defaultdict(dict)
        for a in accounts:
            b = balance[a["customer_id"]]
            if a["kind"] == "available":
                b["available_points"] = a["credits_posted"] - a["debits_posted"] - a["debits_pending"]
                b["held_points"] = a["debits_pending"]
            elif a["kind"] == "pending":
                b["pending_points"] = a["credits_posted"] - a["debits_posted"]
            elif a["kind"] == "debt":
                b["debt_points"] = a["debits_posted"] - a["credits_posted"]
        customers = {c["customer_id"]: c for c in await conn.fetch(
            "SELECT customer_id, tier, qualifying_points FROM ledger.customers")}
        expect(set(customers) == set(expected.customers),
               f"ledger customers differ: missing {sorted(set(expected.customers) - set(customers))[:5]}, "
               f"unexpected {sorted(set(customers) - set(expected.customers))[:5]}")
        wrong = 0
        for cid, want_c in expected.customers.items():
            got = {"available_points": 0, "pending_points": 0, "held_points": 0, "debt_points": 0, **balance.get(cid, {})}
            row = customers.get(cid)
            got["tier"] = row["tier"] if row else None
            got["qualifying_points"] = row["qualifying_points"] if row else None
            want = want_c.__dict__
            if got != want:
                wrong += 1
                if wrong <= 10:
                    mismatches.append(f"customer {cid}: {got}, expected {want}")
        if wrong > 10:
            mismatches.append(f"... {wrong - 10} more customers differ")

        # lots
        lots = await conn.fetch("SELECT l.lot_id, l.source, l.purchase_id, l.amount_points, l.remaining_points, "
                                "l.reversed_points, l.held_points, l.pending, t.ref AS adjustment_id FROM ledger.lots l "
                                "LEFT JOIN ledger.transfers t ON t.lot_id = l.lot_id AND t.code = 'adjust'")
        got_lots = {}
        for lot in lots:
            key = lot["purchase_id"] if lot["source"] == "purchase" else f"adjustment:{lot['adjustment_id']}"
            got_lots[key] = (lot["amount_points"], lot["remaining_points"], lot["reversed_points"], lot["pending"],
                             lot["held_points"])
        want_lots = {k: (v.amount_points, v.remaining_points, v.reversed_points, v.pending, 0)
                     for k, v in expected.purchase_lots.items()}
        want_lots.update({f"adjustment:{k}": (v.amount_points, v.remaining_points, 0, False, 0)
                          for k, v in expected.adjustment_lots.items()})
        _compare(mismatches, "lots (amount, remaining, reversed, pending, held)", got_lots, want_lots)

        # debits equal credits, posted and pending
        posted, pending = await conn.fetchrow("SELECT sum(debits_posted) - sum(credits_posted), "
                                              "sum(debits_pending) - sum(credits_pending) FROM ledger.accounts")
        expect(posted == 0 and pending == 0, f"debits != credits: posted {posted}, pending {pending}")
        figures["ledger_imbalance"] = {"posted": int(posted), "pending": int(pending)}
    finally:
        await conn.close()

    # no lag left (also part of quiet, asserted again after the checks)
    for topic, group in GROUPS:
        lag = await group_lag(env.bootstrap, group, topic, PARTITIONS)
        expect(not any(lag.values()), f"group {group} lags on {topic}: {lag}")

    # dead letters: exactly the malformed inputs, from wherever they landed on purchases.raw
    raw = await read_topic(env.bootstrap, PURCHASES_RAW, PARTITIONS)
    malformed_at = {(r.partition, r.offset): r.value for r in raw if r.value in plan.malformed}
    expect({v for v in malformed_at.values()} == plan.malformed,
           f"{len(plan.malformed - set(malformed_at.values()))} malformed inputs never reached purchases.raw")
    dead = [json.loads(r.value) for r in await read_topic(env.bootstrap, PURCHASES_DLQ, PARTITIONS)]
    dead_at: dict[tuple[int, int], dict] = {}
    for d in dead:
        if d.get("door") != "kafka" or d.get("original_topic") != PURCHASES_RAW:
            mismatches.append(f"dead letter from {d.get('door')}: {d.get('reason')} {d.get('original', '')[:120]}")
            continue
        dead_at.setdefault((d["original_partition"], d["original_offset"]), d)
    missing = set(malformed_at) - set(dead_at)
    unexpected = set(dead_at) - set(malformed_at)
    expect(not missing, f"{len(missing)} malformed inputs not dead-lettered: "
                        f"{[malformed_at[k][:100] for k in list(missing)[:3]]}")
    expect(not unexpected, f"{len(unexpected)} dead letters for accepted inputs: "
                           f"{[(dead_at[k]['reason'], dead_at[k]['original'][:100]) for k in list(unexpected)[:3]]}")
    for at, d in dead_at.items():
        if at in malformed_at:
            expect(d["original"].encode() == malformed_at[at], f"dead letter at {at} does not carry the original")
    figures["dead_letters"] = {"distinct": len(dead_at), "records": len(dead),
                               "reasons": dict(Counter(d.get("reason") for d in dead_at.values()))}
    for topic in (POINTS_DLQ, REWARDS_DLQ):
        extra = await read_topic(env.bootstrap, topic, PARTITIONS)
        expect(not extra, f"{len(extra)} dead letters on {topic}: {[r.value[:200] for r in extra[:3]]}")

    recorded = await read_topic(env.bootstrap, PURCHASES_RECORDED, PARTITIONS)
    figures["purchases_recorded"] = {"records": len(recorded),
                                     "distinct_events": len({json.loads(r.value)["event_id"] for r in recorded})}
    figures["points_events"] = len(await read_topic(env.bootstrap, POINTS_EVENTS, PARTITIONS))
    figures["rewards_events"] = len(await read_topic(env.bootstrap, REWARDS_EVENTS, PARTITIONS))
    mismatches.extend(stats.problems)
    return mismatches, figures


def _compare(mismatches: list[str], what: str, got: dict, want: dict) -> None:
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    different = [k for k in want if k in got and got[k] != want[k]]
    if missing or unexpected or different:
        mismatches.append(
            f"{what}: {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
            f"{[(k, got[k]) for k in unexpected[:3]]}, {len(different)} different "
            f"{[(k, got[k], want[k]) for k in different[:3]]}")


# ---- the run -----------------------------------------------------------------------------------


async def run(size: str = "quick", *, seed: int = 7, keep: bool = False, quiet_timeout_s: float = 600) -> dict:
    cfg = SIZES[size]
    started = time.monotonic()
    plan = generate(seed, cfg["sales"], cfg["chunk"], cfg["redeemers"])
    expected = ref.expected_state(plan.sales, plan.returns, plan.fundings, plan.redemptions)
    stats, faults = Stats(), Faults()
    rng = random.Random(seed * 31 + 1)
    with infra(durable=True, keep=keep) as env:
        print(f"work folder (logs): {env.workdir}", file=sys.stderr)
        await create_topics(env.bootstrap, list(ALL_TOPICS), PARTITIONS)
        common = {"TOPIC_PARTITIONS": str(PARTITIONS), "CONSUMER_GROUP_PREFIX": GROUP_PREFIX,
                  "CONSUMER_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS), "OUTBOX_POLL_INTERVAL_MS": "100"}
        services = {
            "purchases": Service(env, "purchases", {**common, "SHOPIFY_WEBHOOK_SECRET": SHOPIFY_SECRET}),
            "ledger": Service(env, "ledger", {**common, "ADMIN_API_KEY": ADMIN_KEY, "SCHEDULER_INTERVAL_S": "2"}),
            "rewards": Service(env, "rewards", {**common, "ADMIN_API_KEY": ADMIN_KEY, "JWT_SECRET": JWT_SECRET,
                                                "RECOVERY_INTERVAL_S": "1", "REQUEST_RESEND_AFTER_S": "3",
                                                "SAGA_WAIT_MS": "1000"}),
        }
        for s in services.values():
            s.start()
        await asyncio.gather(*(s.wait_ready(180) for s in services.values()))
        await provision(env, services)
        driver = Driver(env, services, plan, stats)
        await driver.start()
        done = asyncio.Event()
        stream_s = cfg["sales"] / cfg["rate_per_s"]
        fault_task = asyncio.create_task(inject_faults(env, services, faults, rng, min_faults=cfg["min_faults"],
                                                       done=done))
        stream_started = time.monotonic()
        try:
            work = asyncio.gather(driver.stream(cfg["rate_per_s"], cfg["chunk"]), driver.redemptions(stream_s))
            while not work.done():
                await asyncio.wait([work, fault_task], return_when=asyncio.FIRST_COMPLETED)
                if fault_task.done() and fault_task.exception():
                    work.cancel()
                    raise fault_task.exception()
            await work
            stream_took_s = time.monotonic() - stream_started
            done.set()
            await fault_task
        finally:
            done.set()
            if not fault_task.done():
                fault_task.cancel()
            await driver.close()
        progress_done()
        for s in services.values():
            if not s.alive():
                faults.unexpected_exits.append(f"{s.name} exited on its own; see {s.log_path}")
                s.start()
                await s.wait_ready(180)
        quiet_started = time.monotonic()
        quiet = await wait_until_quiet(env, timeout_s=quiet_timeout_s)
        quiet_s = time.monotonic() - quiet_started
        mismatches, figures = await check(env, plan, stats, expected, quiet)
        mismatches.extend(faults.unexpected_exits)
    return {
        "benchmark": "chaos", "size": size, "seed": seed, "mismatches": len(mismatches),
        "mismatch_list": mismatches[:50],
        "faults": {**{k: faults.injected.get(k, 0) for k in FAULT_KINDS}, "total": sum(faults.injected.values()),
                   "kill9_by_service": dict(faults.kills)},
        "fault_log": faults.log,
        "inputs": {"sales": len(plan.sales), "returns": len(plan.returns), "malformed": len(plan.malformed),
                   "fundings": len(plan.fundings), "redemptions": len(plan.redemptions),
                   "cancellations": sum(r.cancel for r in plan.redemptions), "customers": len(expected.customers),
                   "sends": dict(sorted(plan.counts.items()))},
        "sent": dict(sorted(stats.sent.items())), "client_retries": dict(sorted(stats.retries.items())),
        "answers": dict(sorted(stats.outcomes.items())), **figures,
        "stream_s": round(stream_took_s, 1), "quiet_after_s": round(quiet_s, 1),
        "duration_s": round(time.monotonic() - started, 1),
    }


async def provision(env: Infra, services: dict[str, Service]) -> None:
    """Store API keys (the purchases service's own repository, as `make up` does) and the
    vouchers to redeem."""
    from services.purchases.repository import add_api_key
    from shared.db import create_pool

    pool = await create_pool(env.dsn(), schema="purchases")
    try:
        for store, key in STORES.items():
            await add_api_key(pool, key=key, store_id=store, label="chaos")
    finally:
        await pool.close()
    async with httpx.AsyncClient(timeout=20) as http:
        for reward_id, cost in REWARDS.items():
            r = await http.post(f"{services['rewards'].url}/v1/admin/rewards", headers={"X-Admin-Key": ADMIN_KEY}, json={
                "reward_id": reward_id, "name": f"Voucher {cost}", "cost_points": cost, "kind": "voucher",
                "voucher_value": "5.00", "voucher_currency": "PLN"})
            r.raise_for_status()


def print_table(f: dict) -> None:
    print()
    print(f"{'fault':<36} {'injected':>9}")
    for k in FAULT_KINDS:
        extra = f"   {f['faults']['kill9_by_service']}" if k == "kill9" else ""
        print(f"{k:<36} {f['faults'][k]:>9}{extra}")
    print(f"{'total':<36} {f['faults']['total']:>9}")
    print()
    print(f"{'events':<36} {'count':>9}")
    i = f["inputs"]
    for label, value in (("sales (distinct)", i["sales"]), ("returns (distinct)", i["returns"]),
                         ("malformed inputs", i["malformed"]), ("deliveries (all doors, with duplicates)",
                                                                sum(f["sent"].get(k, 0) for k in f["sent"]
                                                                    if k.split("_")[0] in ("kafka", "http", "shopify"))),
                         ("ledger adjustments (with resends)", f["sent"].get("adjustments", 0)),
                         ("redemptions", i["redemptions"]), ("cancellations", i["cancellations"]),
                         ("customers", i["customers"]), ("purchases.recorded records", f["purchases_recorded"]["records"]),
                         ("points.events records", f["points_events"]), ("rewards.events records", f["rewards_events"]),
                         ("purchases.dlq distinct / records", f"{f['dead_letters']['distinct']} / {f['dead_letters']['records']}"),
                         ("client retries", sum(f["client_retries"].values()))):
        print(f"{label:<36} {value:>9}")
    print()
    print(f"{'stream / quiet after / whole run (s)':<36} {f['stream_s']:>5} / {f['quiet_after_s']} / {f['duration_s']}")
    print(f"{'MISMATCHES':<36} {f['mismatches']:>9}")
    for m in f["mismatch_list"]:
        print(f"  - {m}")
    print()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default=os.environ.get("CHAOS_SIZE", "full"))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED", "7")))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, data) afterwards")
    args = parser.parse_args()
    figures = await run(args.size, seed=args.seed, keep=args.keep)
    print_table(figures)
    print(json.dumps({k: v for k, v in figures.items() if k not in ("fault_log",)}, default=str))
    return 1 if figures["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
