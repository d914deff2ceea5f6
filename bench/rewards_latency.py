"""Benchmark: redemption latency through the whole saga at a steady request rate.

    .venv/bin/python -m bench.rewards_latency [--rate 200] [--seconds 20] [--customers 200]

Starts its own broker and PostgreSQL, the ledger and the rewards service as real processes
(`python -m services.ledger`, `python -m services.rewards`), credits customers through the
ledger's admin API, then fires POST /v1/redemptions open-loop at --rate per second (each
request starts at its scheduled time, whatever the previous ones do, so a slow saga cannot
hide by slowing the load down). The HTTP call waits for the outcome (REWARDS_SAGA_WAIT_MS), so
each latency is the whole saga: request committed, RedemptionRequested through the outbox,
the ledger's hold, the reservation, the answer back to the waiting request. Latencies are
measured from each request's scheduled start. Prints p50/p90/p99/max and a JSON line.
Goal: p99 under 100 ms at 200 redemptions/s on this machine.
"""

import argparse
import asyncio
import json
import signal
import time
import uuid
from collections import Counter

import httpx

from bench.harness import Service, infra, percentile, progress, progress_done
from services.rewards.token import mint_token

JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123"
REWARDS_ADMIN = "bench-rewards-admin"
LEDGER_ADMIN = "bench-ledger-admin"


async def fire(client: httpx.AsyncClient, tokens: list[str], *, rate: float, seconds: float, label: str,
               results: list[tuple[float, int, str]]) -> float:
    """Open-loop: request i starts at t0 + i/rate. Returns the achieved request rate."""
    total = int(rate * seconds)
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    tasks = []

    async def one(i: int, scheduled: float) -> None:
        headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}", "Idempotency-Key": str(uuid.uuid4())}
        try:
            response = await client.post("/v1/redemptions", json={"reward_id": "bench-voucher"}, headers=headers)
            status = response.json().get("status", str(response.status_code))
            code = response.status_code
        except httpx.HTTPError as exc:
            status, code = type(exc).__name__, 0
        results.append((loop.time() - scheduled, code, status))

    for i in range(total):
        scheduled = t0 + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
        if i % 50 == 0:
            progress(f"{label}: {i}/{total} sent, {len(results)} answered")
    await asyncio.gather(*tasks)
    progress_done()
    return total / (loop.time() - t0)


async def run(args: argparse.Namespace) -> dict:
    with infra(durable=not args.no_fsync) as env:
        common = {"TOPIC_PARTITIONS": str(args.partitions), "LOG_JSON": "true"}
        ledger = Service(env, "ledger", {**common, "ADMIN_API_KEY": LEDGER_ADMIN, "SCHEDULER_INTERVAL_S": "3600"})
        rewards = Service(env, "rewards", {
            **common, "JWT_SECRET": JWT_SECRET, "ADMIN_API_KEY": REWARDS_ADMIN, "SAGA_WAIT_MS": "10000",
            "DATABASE_POOL_MAX": "20",
        })
        ledger.start()
        await ledger.wait_ready()
        rewards.start()
        await rewards.wait_ready()
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(base_url=rewards.url, timeout=30, limits=limits) as client, \
                httpx.AsyncClient(base_url=ledger.url, timeout=30) as ledger_client:
            response = await client.post("/v1/admin/rewards", headers={"X-Admin-Key": REWARDS_ADMIN}, json={
                "reward_id": "bench-voucher", "name": "Bench voucher", "cost_points": 1, "kind": "voucher",
                "voucher_value": "1.00", "voucher_currency": "EUR"})
            response.raise_for_status()
            customers = [f"bench-c{i}" for i in range(args.customers)]
            need = int(args.rate * (args.seconds + args.warmup_seconds)) // args.customers + 10
            for c in customers:
                (await ledger_client.post("/v1/admin/adjustments", headers={"X-Admin-Key": LEDGER_ADMIN}, json={
                    "customer_id": c, "amount_points": need, "reason_code": "goodwill", "actor": "bench"}
                )).raise_for_status()
            tokens = [mint_token(c, key=JWT_SECRET, issuer="loyalty-local", audience="loyalty-rewards",
                                 ttl_s=3600) for c in customers]
            warm: list[tuple[float, int, str]] = []
            await fire(client, tokens, rate=args.rate, seconds=args.warmup_seconds, label="warm-up", results=warm)
            results: list[tuple[float, int, str]] = []
            achieved = await fire(client, tokens, rate=args.rate, seconds=args.seconds, label="measured",
                                  results=results)
    latencies_ms = sorted(r[0] * 1000 for r in results)
    outcomes = Counter(r[2] for r in results)
    return {
        "benchmark": "rewards_latency", "rate_per_s": args.rate, "achieved_rate_per_s": round(achieved, 1),
        "seconds": args.seconds, "requests": len(results), "outcomes": dict(outcomes),
        "http_202": sum(1 for r in results if r[1] == 202),
        "p50_ms": round(percentile(latencies_ms, 50), 1), "p90_ms": round(percentile(latencies_ms, 90), 1),
        "p99_ms": round(percentile(latencies_ms, 99), 1), "max_ms": round(latencies_ms[-1], 1),
        "partitions": args.partitions, "fsync": not args.no_fsync,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="redemptions per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured duration")
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--no-fsync", action="store_true", help="PostgreSQL without fsync (not the real figure)")
    args = parser.parse_args()

    def terminate(*_: object) -> None:
        raise SystemExit(143)  # unwinds through the harness: every process it started is stopped

    signal.signal(signal.SIGTERM, terminate)
    started = time.perf_counter()
    report = asyncio.run(run(args))
    print(f"rewards redemption latency at {report['rate_per_s']:.0f}/s (achieved {report['achieved_rate_per_s']}/s), "
          f"{report['requests']} requests over {report['seconds']:.0f} s, outcomes {report['outcomes']}, "
          f"{report['http_202']} answered 202")
    print(f"  p50 {report['p50_ms']} ms   p90 {report['p90_ms']} ms   p99 {report['p99_ms']} ms   "
          f"max {report['max_ms']} ms   (goal: p99 < 100 ms)")
    print(json.dumps(report | {"wall_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
