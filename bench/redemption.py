"""Redemption latency through the whole saga (rewards -> ledger hold -> rewards fulfils ->
ledger posts) at a steady request rate, over the rewards service's public HTTP API.

    .venv/bin/python -m bench.redemption [--rate 200] [--seconds 20]

Standalone it starts its own broker, PostgreSQL, ledger and rewards; `bench.e2e` calls
`measure()` with the services of its run.
"""

import argparse
import asyncio
import json
import os
import secrets
import time
import uuid

import httpx

from bench.harness import Service, create_topics, infra, percentile, progress, progress_done
from services.rewards.token import mint_token
from shared.topics import ALL_TOPICS

ADMIN_KEY = "bench-admin-key-" + secrets.token_hex(8)
JWT_SECRET = secrets.token_hex(32)
ISSUER, AUDIENCE = "loyalty-local", "loyalty-rewards"


async def measure(env, services: list[Service], *, rate: int = 200, seconds: float = 20.0,
                  customers: int = 400) -> dict:
    by_name = {s.name: s for s in services}
    ledger = by_name["ledger"]
    if ledger.env.get("LEDGER_ADMIN_API_KEY") != ADMIN_KEY:  # restart the ledger with our admin key
        ledger.stop()
        ledger.env["LEDGER_ADMIN_API_KEY"] = ADMIN_KEY
        ledger.start()
    rewards = by_name.get("rewards") or Service(env, "rewards", {
        "ADMIN_API_KEY": ADMIN_KEY, "JWT_SECRET": JWT_SECRET, "JWT_ISSUER": ISSUER, "JWT_AUDIENCE": AUDIENCE,
    })
    if not rewards.alive():
        rewards.start()
    await ledger.wait_ready()
    await rewards.wait_ready()
    cost = 10
    total = int(rate * seconds)
    per_customer = total // customers + 2
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=400)) as http:
        reward_id = f"bench-voucher-{uuid.uuid4().hex[:6]}"
        r = await http.post(f"{rewards.url}/v1/admin/rewards", headers={"X-Admin-Key": ADMIN_KEY}, json={
            "reward_id": reward_id, "name": "Bench voucher", "cost_points": cost, "kind": "voucher",
            "voucher_value": "5.00", "voucher_currency": "PLN"})
        r.raise_for_status()
        ids = [f"redeemer-{uuid.uuid4().hex[:6]}-{i}" for i in range(customers)]
        for i, customer in enumerate(ids):
            r = await http.post(f"{ledger.url}/v1/admin/adjustments", headers={"X-Admin-Key": ADMIN_KEY}, json={
                "customer_id": customer, "amount_points": cost * per_customer, "reason_code": "goodwill",
                "actor": "bench"})
            r.raise_for_status()
            progress(f"redemption: funding customers {i + 1}/{customers}")
        progress_done()
        tokens = {c: mint_token(c, key=JWT_SECRET, issuer=ISSUER, audience=AUDIENCE) for c in ids}
        # The rewards service learns balances from points.events; give it a moment to see the grants.
        await wait_for_affordable(http, rewards.url, tokens[ids[-1]], reward_id)

        latencies: list[float] = []
        outcomes: dict[str, int] = {}

        async def one(i: int) -> None:
            customer = ids[i % customers]
            started = time.monotonic()
            try:
                resp = await http.post(f"{rewards.url}/v1/redemptions", json={"reward_id": reward_id}, headers={
                    "Authorization": f"Bearer {tokens[customer]}", "Idempotency-Key": str(uuid.uuid4())})
                status = resp.json().get("status", str(resp.status_code)) if resp.status_code < 500 else "5xx"
                if resp.status_code == 202:
                    status = "pending_after_wait"
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            latencies.append((time.monotonic() - started) * 1000)
            outcomes[status] = outcomes.get(status, 0) + 1

        tasks = []
        started = time.monotonic()
        sent = 0
        while sent < total:
            due = min(total, int((time.monotonic() - started) * rate))
            while sent < due:
                tasks.append(asyncio.create_task(one(sent)))
                sent += 1
            progress(f"redemption at {rate}/s: sent {sent:,}/{total:,}, answered {len(latencies):,}")
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        progress_done()
    latencies.sort()
    return {"offered_per_s": rate, "achieved_per_s": round(total / (time.monotonic() - started)), "count": total,
            "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99), "outcomes": outcomes}


async def wait_for_affordable(http: httpx.AsyncClient, url: str, token: str, reward_id: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = await http.get(f"{url}/v1/rewards", headers={"Authorization": f"Bearer {token}"})
        if r.status_code == 200 and any(x.get("reward_id") == reward_id and x.get("affordable")
                                        for x in r.json().get("rewards", [])):
            return
        await asyncio.sleep(0.2)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()
    with infra(durable=not args.no_fsync) as env:
        await create_topics(env.bootstrap, list(ALL_TOPICS), 4)
        ledger = Service(env, "ledger", {"ADMIN_API_KEY": ADMIN_KEY, "SCHEDULER_INTERVAL_S": "5"}).start()
        figures = await measure(env, [ledger], rate=args.rate, seconds=args.seconds)
    print(f"redemption saga at {figures['offered_per_s']}/s: p50 {figures['p50_ms']:.0f} ms, "
          f"p95 {figures['p95_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms; outcomes {figures['outcomes']}")
    print(json.dumps({"benchmark": "redemption", **figures, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    asyncio.run(main())
