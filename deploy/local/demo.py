"""Demo traffic for `make run`: several POS stores producing to purchases.raw, a POS back-end
posting batches over HTTP and an e-shop sending signed Shopify webhooks; customers redeeming
rewards through the rewards API. Realistic baskets, some (partial) returns, some duplicates
(also across doors) and a few malformed events, with a live summary read back from the
topics and the services' /metrics (deploy/local/summary.py). Runs until Ctrl-C / SIGTERM."""

import asyncio
import base64
import hashlib
import hmac
import json
import random
import sys
import time
import uuid
from collections import Counter, deque
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from deploy.local.summary import Display, Snapshot, read_services, render
from shared.auth import mint_token

CATALOG = [  # sku, category, unit price
    ("MILK-1L", "grocery", "3.49"), ("BREAD-RYE", "grocery", "6.90"), ("COFFEE-500", "grocery", "34.99"),
    ("CHEESE-200", "grocery", "9.79"), ("APPLES-1KG", "grocery", "4.99"), ("OLIVE-OIL", "grocery", "29.90"),
    ("TSHIRT-M", "clothing", "49.00"), ("JEANS-32", "clothing", "189.00"), ("SOCKS-3P", "clothing", "24.99"),
    ("JACKET-L", "clothing", "399.00"), ("HEADPHONES", "electronics", "249.00"), ("USB-C-CABLE", "electronics", "39.99"),
    ("POWERBANK", "electronics", "129.00"), ("KETTLE", "home", "119.00"), ("TOWEL-SET", "home", "79.90"),
    ("CANDLE", "home", "19.99"), ("SHAMPOO", "beauty", "21.49"), ("FACE-CREAM", "beauty", "64.00"),
]
POS_STORES = ("store-001", "store-003")  # straight to Kafka
HTTP_STORE = "store-002"  # a POS back-end posting batches
# What the demo customers can redeem (created through the rewards admin API, idempotently).
DEMO_REWARDS = [
    {"reward_id": "demo-coffee-voucher", "name": "Coffee voucher", "cost_points": 150, "kind": "voucher",
     "voucher_value": "10.00", "voucher_currency": "PLN"},
    {"reward_id": "demo-tote-voucher", "name": "Tote bag voucher", "cost_points": 400, "kind": "voucher",
     "voucher_value": "30.00", "voucher_currency": "PLN", "stock": 500},
]
# Earned points stay pending for the return window (14 days in services/ledger/program.yaml),
# so a demo customer has nothing to spend: each gets a welcome credit through the ledger's
# admin adjustments the first time they redeem (one adjustment id per customer: never twice).
WELCOME_POINTS = 1000
REDEMPTIONS_PER_PURCHASE = 0.02


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k] = v
    return env


class Traffic:
    """Builds purchases in the inbound contract; remembers recent sales for returns and
    duplicates."""

    def __init__(self, seed: int | None = None, customers: int = 400) -> None:
        self.rng = random.Random(seed)
        self.customers = [f"cust-{i:05d}" for i in range(customers)]
        self.recent: deque[dict[str, Any]] = deque(maxlen=2000)
        self.returned: set[str] = set()

    def sale(self, store_id: str, source: str = "pos") -> dict[str, Any]:
        rng = self.rng
        lines = []
        for i, (sku, category, price) in enumerate(rng.sample(CATALOG, rng.randint(1, 5)), start=1):
            qty = rng.choice((1, 1, 1, 2, 3))
            gross = Decimal(price) * qty
            discount = (gross * Decimal(rng.choice((0, 0, 0, 5, 10, 20))) / 100).quantize(Decimal("0.01"))
            lines.append({"line_id": str(i), "sku": sku, "category": category, "quantity": qty,
                          "unit_price": price, "discount": format(discount, "f")})
        total = sum(Decimal(line["unit_price"]) * line["quantity"] - Decimal(line["discount"]) for line in lines)
        purchase = {
            "purchase_id": f"{store_id}-{uuid.uuid4().hex[:12]}", "type": "sale", "original_purchase_id": None,
            "source": source, "store_id": store_id,
            "customer_id": None if rng.random() < 0.12 else rng.choice(self.customers),
            "occurred_at": datetime.now(timezone.utc).isoformat(), "currency": "PLN", "lines": lines,
            "total": format(total, "f"),
        }
        self.recent.append(purchase)
        return purchase

    def partial_return(self) -> dict[str, Any] | None:
        candidates = [p for p in self.recent if p["source"] == "pos" and p["purchase_id"] not in self.returned]
        if not candidates:
            return None
        sale = self.rng.choice(candidates)
        self.returned.add(sale["purchase_id"])
        line = self.rng.choice(sale["lines"])
        qty = self.rng.randint(1, line["quantity"])
        discount = (Decimal(line["discount"]) * qty / line["quantity"]).quantize(Decimal("0.01"))
        ret_line = {**line, "quantity": qty, "discount": format(discount, "f")}
        total = Decimal(line["unit_price"]) * qty - discount
        return {**sale, "purchase_id": f"ret-{uuid.uuid4().hex[:12]}", "type": "return",
                "original_purchase_id": sale["purchase_id"], "lines": [ret_line], "total": format(total, "f"),
                "occurred_at": datetime.now(timezone.utc).isoformat()}

    def duplicate(self) -> dict[str, Any] | None:
        return self.rng.choice(self.recent) if self.recent else None

    def malformed(self) -> bytes:
        kind = self.rng.choice(("json", "total", "currency"))
        if kind == "json":
            return b'{"purchase_id": "broken", "lines": ['
        bad = self.sale(self.rng.choice(POS_STORES))
        self.recent.pop()
        if kind == "total":
            bad["total"] = "0.01"
        else:
            bad["currency"] = "XXQ"
        return json.dumps(bad).encode()

    def shopify_order(self) -> dict[str, Any]:
        rng = self.rng
        now = datetime.now(timezone.utc).isoformat()
        items = []
        for sku, category, price in rng.sample(CATALOG, rng.randint(1, 3)):
            items.append({"id": rng.randint(10**9, 10**10), "sku": sku, "quantity": rng.randint(1, 2), "price": price,
                          "total_discount": "0.00", "product_type": category, "gift_card": False})
        customer = None if rng.random() < 0.1 else {"id": int(rng.choice(self.customers).split("-")[1]) + 7000000}
        return {"id": rng.randint(10**11, 10**12), "currency": "PLN", "processed_at": now, "created_at": now,
                "updated_at": now, "customer": customer, "line_items": items}


def sign(secret: str, body: bytes) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


class Tally:
    def __init__(self) -> None:
        self.sent = Counter()
        self.seen = Counter()
        self.redemptions = Counter()  # requested (in flight), fulfilled, failed, refused


async def setup_rewards(http: httpx.AsyncClient, env: dict[str, str]) -> None:
    headers = {"X-Admin-Key": env["REWARDS_ADMIN_API_KEY"]}
    for reward in DEMO_REWARDS:
        r = await http.post(f"{env['REWARDS_URL']}/v1/admin/rewards", json=reward, headers=headers)
        if r.status_code not in (201, 409):  # 409: already there from an earlier run
            raise RuntimeError(f"creating the demo reward {reward['reward_id']}: {r.status_code} {r.text}")


async def redeem_once(http: httpx.AsyncClient, env: dict[str, str], traffic: "Traffic", tally: Tally,
                      welcomed: set[str]) -> None:
    """One customer redeems one reward, with their own token; the outcome counted."""
    customer = traffic.rng.choice(traffic.customers)
    if customer not in welcomed:
        r = await http.post(f"{env['LEDGER_URL']}/v1/admin/adjustments", headers={
            "X-Admin-Key": env["LEDGER_ADMIN_API_KEY"]}, json={
            "adjustment_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"loyalty-demo-welcome/{customer}")),
            "customer_id": customer, "amount_points": WELCOME_POINTS, "reason_code": "goodwill",
            "actor": "make run", "note": "demo welcome credit"})
        if r.status_code in (200, 201):
            welcomed.add(customer)
    token = mint_token(customer, key=env["REWARDS_JWT_SECRET"], issuer="loyalty-local", audience="loyalty-rewards")
    reward = traffic.rng.choice(DEMO_REWARDS)["reward_id"]
    r = await http.post(f"{env['REWARDS_URL']}/v1/redemptions", json={"reward_id": reward}, headers={
        "Authorization": f"Bearer {token}", "Idempotency-Key": uuid.uuid4().hex})
    if r.status_code == 200:
        tally.redemptions[r.json().get("status", "fulfilled")] += 1
    elif r.status_code == 202:
        tally.redemptions["requested"] += 1
    else:
        tally.redemptions["refused"] += 1


async def redemption_loop(env: dict[str, str], rate: float, tally: Tally, traffic: Traffic) -> None:
    """Customers redeeming at REDEMPTIONS_PER_PURCHASE of the purchase rate, a few at a time
    (each request waits for the saga's outcome)."""
    interval_s = 1.0 / max(0.2, rate * REDEMPTIONS_PER_PURCHASE)
    welcomed: set[str] = set()
    running: set[asyncio.Task] = set()
    async with httpx.AsyncClient(timeout=15) as http:
        await setup_rewards(http, env)
        while True:
            if len(running) < 8:
                task = asyncio.create_task(redeem_once(http, env, traffic, tally, welcomed))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.sleep(interval_s)


async def register_contacts(env: dict[str, str], traffic: Traffic) -> int:
    """The demo customers' contact data and e-mail consent, given to the engagement service
    (as a shop's back end would), so that its journeys mail them: every message lands in
    MAIL_DIR (the local mail catcher). Idempotent; half Polish, half English."""
    url, key = env["ENGAGEMENT_URL"], env["ENGAGEMENT_ADMIN_API_KEY"]
    async with httpx.AsyncClient(timeout=15, headers={"X-Admin-Key": key}) as http:
        async def one(i: int, customer: str) -> bool:
            r = await http.put(f"{url}/v1/customers/{customer}/contact", json={
                "email": f"{customer}@example.com", "locale": "pl-PL" if i % 2 else "en-GB",
                "time_zone": "Europe/Warsaw", "consent": {"email": True}, "source": "demo"})
            return r.is_success
        done = 0
        for start in range(0, len(traffic.customers), 50):
            chunk = list(enumerate(traffic.customers))[start:start + 50]
            done += sum(await asyncio.gather(*(one(i, c) for i, c in chunk)))
    return done


async def watch(bootstrap: str, topics: list[str], tally: Tally) -> None:
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="latest")
    await consumer.start()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, records in batch.items():
                for r in records:
                    kind = tp.topic
                    if tp.topic in ("purchases.recorded", "points.events", "rewards.events"):
                        try:
                            kind = f"{tp.topic}:{json.loads(r.value)['type']}"
                        except (ValueError, KeyError, TypeError):
                            pass
                    tally.seen[kind] += 1
    finally:
        await consumer.stop()


async def produce_loop(env: dict[str, str], rate: float, tally: Tally, traffic: Traffic) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"], linger_ms=5)
    await producer.start()
    store_key = env["STORE_API_KEY"]
    http_key = f"{store_key}-{HTTP_STORE}"
    shopify_secret = env["SHOPIFY_WEBHOOK_SECRET"]
    http_batch: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=env["PURCHASES_URL"], timeout=10) as http:
        try:
            tick_s = 0.1
            while True:
                started = time.monotonic()
                n = max(1, int(rate * tick_s + traffic.rng.random()))
                for _ in range(n):
                    roll = traffic.rng.random()
                    if roll < 0.01:
                        await producer.send("purchases.raw", traffic.malformed())
                        tally.sent["kafka malformed"] += 1
                    elif roll < 0.04:
                        dup = traffic.duplicate()
                        if dup and dup["store_id"] in POS_STORES:
                            await producer.send("purchases.raw", json.dumps(dup).encode())
                            tally.sent["kafka duplicate"] += 1
                    elif roll < 0.09:
                        ret = traffic.partial_return()
                        if ret and ret["store_id"] in POS_STORES:
                            await producer.send("purchases.raw", json.dumps(ret).encode())
                            tally.sent["kafka return"] += 1
                    elif roll < 0.29:
                        http_batch.append(traffic.sale(HTTP_STORE))
                        tally.sent["http sale"] += 1
                    elif roll < 0.37:
                        body = json.dumps(traffic.shopify_order()).encode()
                        r = await http.post("/v1/webhooks/shopify", content=body, headers={
                            "X-Shopify-Hmac-Sha256": sign(shopify_secret, body), "X-Shopify-Topic": "orders/paid",
                            "Content-Type": "application/json"})
                        tally.sent[f"shopify {r.status_code}"] += 1
                    else:
                        p = traffic.sale(traffic.rng.choice(POS_STORES))
                        await producer.send("purchases.raw", json.dumps(p).encode(), key=p["store_id"].encode())
                        tally.sent["kafka sale"] += 1
                if len(http_batch) >= 20:
                    r = await http.post("/v1/purchases/batch", json={"purchases": http_batch},
                                        headers={"X-API-Key": http_key})
                    tally.sent[f"http batch {r.status_code}"] += 1
                    http_batch = []
                await asyncio.sleep(max(0.0, tick_s - (time.monotonic() - started)))
        finally:
            await producer.stop()


def service_urls(env: dict[str, str]) -> dict[str, str]:
    """Every <SERVICE>_URL of endpoints.env: the services `make up` started."""
    return {k[: -len("_URL")].lower(): v for k, v in env.items() if k.endswith("_URL")}


async def main(endpoints: Path, *, rate: float = 200.0, seconds: float | None = None) -> None:
    env = read_env(endpoints)
    tally = Tally()
    traffic = Traffic()
    topics = ["purchases.recorded", "purchases.dlq", "points.events", "rewards.events"]
    watcher = asyncio.create_task(watch(env["KAFKA_BOOTSTRAP_SERVERS"], topics, tally))
    await asyncio.sleep(1.0)  # let the watcher join at the end of the topics
    tasks = [watcher, asyncio.create_task(produce_loop(env, rate, tally, traffic)),
             *([asyncio.create_task(redemption_loop(env, rate, tally, traffic))]
               if "REWARDS_URL" in env and "LEDGER_URL" in env else [])]
    started = time.monotonic()
    last_recorded, last_t = 0, started
    display = Display()
    print(f"demo traffic at ~{rate:.0f} purchases/s, customers redeeming rewards (Ctrl-C to stop)\n", flush=True)
    if env.get("CHURN_URL"):
        print(f"customer relationship dashboard: {env['CHURN_URL']}/dashboard "
              f"(sign in with CHURN_ADMIN_API_KEY from {endpoints})", flush=True)
    if env.get("ENGAGEMENT_URL") and env.get("ENGAGEMENT_ADMIN_API_KEY"):
        registered = await register_contacts(env, traffic)
        print(f"{registered} demo customers consented to e-mail: the messages they get (thank-yous, welcomes, "
              f"surveys) are .eml files in {env.get('MAIL_DIR', '.run/mail')} (quiet hours 21:00-08:00 Warsaw "
              "time defer them)", flush=True)
    try:
        async with httpx.AsyncClient() as http:
            while seconds is None or time.monotonic() - started < seconds:
                await asyncio.sleep(1.0)
                for task in tasks:
                    if task.done() and task.exception():
                        raise task.exception()
                now = time.monotonic()
                recorded = sum(v for k, v in tally.seen.items() if k.startswith("purchases.recorded"))
                snapshot = Snapshot(elapsed_s=now - started, sent=tally.sent, seen=tally.seen,
                                    redemptions=tally.redemptions, services=await read_services(http, service_urls(env)),
                                    recorded_per_s=(recorded - last_recorded) / max(1e-9, now - last_t))
                last_recorded, last_t = recorded, now
                display.show(render(snapshot))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        print("\nsent by door:", dict(tally.sent))
        print("seen on topics:", dict(tally.seen))
        print("redemptions:", dict(tally.redemptions), flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".run/endpoints.env")))
