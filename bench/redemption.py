"""Redemption latency through the whole saga, measured inside `make bench` with the services
of that run (standalone: `python -m bench.rewards_latency`, whose open-loop keep-alive client
this reuses: httpx would measure its own CPU on two cores, not the saga)."""

import secrets
from collections import Counter

import httpx

from bench.harness import Service, percentile
from bench.rewards_latency import HttpPool, fire
from services.rewards.token import mint_token

ADMIN_KEY = "bench-admin-key-" + secrets.token_hex(8)
JWT_SECRET = secrets.token_hex(32)
ISSUER, AUDIENCE = "loyalty-local", "loyalty-rewards"
# The rewards service as `measure` starts it (bench.e2e starts it so, with the others).
REWARDS_SETTINGS = {"ADMIN_API_KEY": ADMIN_KEY, "JWT_SECRET": JWT_SECRET, "JWT_ISSUER": ISSUER,
                    "JWT_AUDIENCE": AUDIENCE, "SAGA_WAIT_MS": "10000", "DATABASE_POOL_MAX": "20"}


async def measure(env, services: list[Service], *, rate: int = 200, seconds: float = 20.0,
                  customers: int = 200, connections: int = 256) -> dict:
    by_name = {s.name: s for s in services}
    ledger = by_name["ledger"]
    if ledger.env.get("LEDGER_ADMIN_API_KEY") != ADMIN_KEY:  # restart the ledger with our admin key
        ledger.stop()
        ledger.env["LEDGER_ADMIN_API_KEY"] = ADMIN_KEY
        ledger.start()
    rewards = by_name.get("rewards")
    if rewards is None:
        rewards = Service(env, "rewards", REWARDS_SETTINGS)
        services.append(rewards)
    if not rewards.alive():
        rewards.start()
    await ledger.wait_ready()
    await rewards.wait_ready()
    tag = f"r{rate}"  # each call its own redeemers: a second rate starts from full balances
    ids = [f"redeemer-{tag}-{i}" for i in range(customers)]
    async with httpx.AsyncClient(timeout=30) as http:
        (await http.post(f"{rewards.url}/v1/admin/rewards", headers={"X-Admin-Key": ADMIN_KEY}, json={
            "reward_id": f"bench-voucher-{tag}", "name": "Bench voucher", "cost_points": 1, "kind": "voucher",
            "voucher_value": "1.00", "voucher_currency": "PLN"})).raise_for_status()
        need = int(rate * (seconds + 2)) // customers + 10
        for customer in ids:
            (await http.post(f"{ledger.url}/v1/admin/adjustments", headers={"X-Admin-Key": ADMIN_KEY}, json={
                "customer_id": customer, "amount_points": need, "reason_code": "goodwill", "actor": "bench"})
             ).raise_for_status()
    tokens = [mint_token(c, key=JWT_SECRET, issuer=ISSUER, audience=AUDIENCE) for c in ids]
    pool = HttpPool("127.0.0.1", rewards.port, connections)
    await pool.open()
    try:
        reward_id = f"bench-voucher-{tag}"
        await fire(pool, tokens, rate=rate, seconds=2, label="redemption warm-up", results=[], reward_id=reward_id)
        results: list[tuple[float, int, str]] = []
        achieved = await fire(pool, tokens, rate=rate, seconds=seconds, label=f"redemption at {rate}/s",
                              results=results, reward_id=reward_id)
    finally:
        await pool.close()
    latencies = sorted(r[0] * 1000 for r in results)
    return {"offered_per_s": rate, "achieved_per_s": round(achieved), "count": len(results),
            "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99), "outcomes": dict(Counter(r[2] for r in results))}
