"""kill -9 of the rewards service in the middle of a stream of redemptions, then a restart:
every redemption ends fulfilled or failed-and-released, and the ledger's balances agree
with the fulfilled redemptions. (The ledger here is the test's fake one; see
test_rewards_with_ledger for the real one.)"""

import asyncio
import random
import uuid

import asyncpg
import httpx
import pytest

from services.rewards.settings import RewardsSettings
from tests.support.kafka import unique
from tests.support.processes import ServiceProcess
from tests.support.rewards import ADMIN, ADMIN_KEY, JWT_SECRET, bearer, eventually, fake_ledger

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

CUSTOMERS = 20
START_POINTS = 100
COST_POINTS = 10


async def redemption_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT * FROM rewards.redemptions")
    finally:
        await conn.close()


async def test_kill_9_mid_stream_then_restart_ends_every_redemption_and_balances_agree(base_env, kafka_bootstrap,
                                                                                        tmp_path):
    extra = {"REWARDS_JWT_SECRET": JWT_SECRET, "REWARDS_ADMIN_API_KEY": ADMIN_KEY, "REWARDS_SAGA_WAIT_MS": "300",
             "REWARDS_REQUEST_RESEND_AFTER_S": "1", "REWARDS_RECOVERY_INTERVAL_S": "0.25"}
    settings = RewardsSettings(**{k.lower(): v for k, v in base_env.items()}, jwt_secret=JWT_SECRET)
    rewards = ServiceProcess("rewards", base_env, extra, log_dir=tmp_path).start()
    attempted: dict[str, tuple[str, str]] = {}  # idempotency key -> (customer, reward)
    try:
        async with httpx.AsyncClient(base_url=rewards.url, timeout=10) as client, \
                fake_ledger(kafka_bootstrap, settings) as ledger:
            limited = (await client.post("/v1/admin/rewards", headers=ADMIN, json={
                "reward_id": "limited", "name": "Limited", "cost_points": COST_POINTS, "kind": "physical",
                "stock": 15})).json()
            unlimited = (await client.post("/v1/admin/rewards", headers=ADMIN, json={
                "reward_id": "voucher", "name": "Voucher", "cost_points": COST_POINTS, "kind": "voucher",
                "voucher_value": "5.00", "voucher_currency": "EUR"})).json()
            customers = [unique("c-") for _ in range(CUSTOMERS)]
            for c in customers:
                await ledger.credit(c, START_POINTS)

            async def fire(n: int) -> None:
                for _ in range(n):
                    customer = random.choice(customers)
                    reward = random.choice([limited["reward_id"], unlimited["reward_id"]])
                    key = str(uuid.uuid4())
                    attempted[key] = (customer, reward)
                    try:
                        await client.post("/v1/redemptions", json={"reward_id": reward},
                                          headers=bearer(customer, settings) | {"Idempotency-Key": key})
                    except httpx.TransportError:
                        pass  # the process died under this request; it is retried below
                    await asyncio.sleep(0.01)

            streams = [asyncio.create_task(fire(40)) for _ in range(4)]
            await eventually(lambda: _count(base_env["DATABASE_URL"], at_least=40), timeout_s=30)
            rewards.kill9()
            await asyncio.gather(*streams)
            at_kill = len(await redemption_rows(base_env["DATABASE_URL"]))
            assert 0 < at_kill < len(attempted), "the kill must land in the middle of the stream"

            rewards.start()
            # A client whose request died with the process retries it with the same key.
            gate = asyncio.Semaphore(8)

            async def retry(key: str, customer: str, reward: str) -> int:
                async with gate:
                    response = await client.post("/v1/redemptions", json={"reward_id": reward},
                                                 headers=bearer(customer, settings) | {"Idempotency-Key": key})
                    return response.status_code

            codes = await asyncio.gather(*(retry(k, c, r) for k, (c, r) in attempted.items()))
            assert set(codes) <= {200, 202}, codes

            async def all_settled():
                rows = await redemption_rows(base_env["DATABASE_URL"])
                done = all(r["status"] in ("fulfilled", "failed") for r in rows)
                answered = all(r["ledger_status"] in ("redeemed", "released", "rejected") for r in rows)
                return rows if done and answered and not any(ledger.held_points(c) for c in customers) else None

            rows = await eventually(all_settled, timeout_s=60, interval_s=0.2)
    finally:
        rewards.stop()
    assert len(rows) == len(attempted)  # one redemption per idempotency key, none lost, none doubled
    fulfilled = [r for r in rows if r["status"] == "fulfilled"]
    assert all(r["ledger_status"] == "redeemed" for r in fulfilled)
    assert all(r["ledger_status"] in ("released", "rejected") for r in rows if r["status"] == "failed")
    for c in customers:
        spent = sum(r["cost_points"] for r in fulfilled if r["customer_id"] == c)
        assert ledger.available[c] == START_POINTS - spent, c
    assert sum(1 for r in fulfilled if r["reward_id"] == "limited") <= 15
    codes = [r["code"] for r in fulfilled if r["reward_id"] == "voucher"]
    assert len(codes) == len(set(codes)) and all(codes)


async def _count(dsn: str, *, at_least: int) -> bool:
    try:
        return len(await redemption_rows(dsn)) >= at_least
    except asyncpg.UndefinedTableError:
        return False
