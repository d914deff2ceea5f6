"""kill -9 of the rewards service, and separately of the ledger, in the middle of a stream of
redemptions, then a restart: every redemption ends fulfilled or failed with its hold released,
and the ledger's balances agree with the rewards service's record of fulfilled redemptions."""

import asyncio
import random
import uuid

import asyncpg
import httpx
import pytest

from services.rewards.settings import RewardsSettings
from tests.support import ledger as ledger_support
from tests.support.kafka import unique
from tests.support.processes import ServiceProcess
from tests.support.rewards import ADMIN, ADMIN_KEY, JWT_SECRET, bearer, eventually

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

CUSTOMERS = 20
START_POINTS = 100
COST_POINTS = 10
LIMITED_STOCK = 15


async def fetch(dsn: str, sql: str, *args) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()


@pytest.mark.parametrize("victim", ["rewards", "ledger"])
async def test_kill_9_mid_stream_then_restart_ends_every_redemption_and_balances_agree(victim, base_env, tmp_path):
    dsn = base_env["DATABASE_URL"]
    settings = RewardsSettings(**{k.lower(): v for k, v in base_env.items()}, jwt_secret=JWT_SECRET)
    ledger = ServiceProcess("ledger", base_env, {"LEDGER_ADMIN_API_KEY": ledger_support.ADMIN_KEY},
                            log_dir=tmp_path).start()
    rewards = ServiceProcess("rewards", base_env, {
        "REWARDS_JWT_SECRET": JWT_SECRET, "REWARDS_ADMIN_API_KEY": ADMIN_KEY, "REWARDS_SAGA_WAIT_MS": "300",
        "REWARDS_REQUEST_RESEND_AFTER_S": "2", "REWARDS_RECOVERY_INTERVAL_S": "0.25"}, log_dir=tmp_path).start()
    processes = {"rewards": rewards, "ledger": ledger}
    attempted: dict[str, tuple[str, str]] = {}  # idempotency key -> (customer, reward)
    try:
        async with httpx.AsyncClient(base_url=rewards.url, timeout=10) as client, \
                httpx.AsyncClient(base_url=ledger.url, timeout=10) as ledger_client:
            for body in ({"reward_id": "limited", "name": "Limited", "cost_points": COST_POINTS, "kind": "physical",
                          "stock": LIMITED_STOCK},
                         {"reward_id": "voucher", "name": "Voucher", "cost_points": COST_POINTS, "kind": "voucher",
                          "voucher_value": "5.00", "voucher_currency": "EUR"}):
                assert (await client.post("/v1/admin/rewards", headers=ADMIN, json=body)).status_code == 201
            customers = [unique("c-") for _ in range(CUSTOMERS)]
            for c in customers:
                response = await ledger_client.post("/v1/admin/adjustments", headers=ledger_support.ADMIN, json={
                    "customer_id": c, "amount_points": START_POINTS, "reason_code": "goodwill", "actor": "test"})
                assert response.status_code == 201, response.text

            async def fire(n: int) -> None:
                for _ in range(n):
                    customer, reward = random.choice(customers), random.choice(["limited", "voucher"])
                    key = str(uuid.uuid4())
                    attempted[key] = (customer, reward)
                    try:
                        await client.post("/v1/redemptions", json={"reward_id": reward},
                                          headers=bearer(customer, settings) | {"Idempotency-Key": key})
                    except httpx.TransportError:
                        pass  # the rewards process died under this request; retried below
                    await asyncio.sleep(0.01)

            async def some_recorded():
                return len(await fetch(dsn, "SELECT 1 FROM rewards.redemptions")) >= 40

            streams = [asyncio.create_task(fire(40)) for _ in range(4)]
            await eventually(some_recorded, timeout_s=30)
            processes[victim].kill9()
            assert len(attempted) < 4 * 40, "the kill must land in the middle of the stream"
            await asyncio.sleep(0.5)  # the stream goes on against the dead (or the living) service
            processes[victim].start()
            await asyncio.gather(*streams)

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
                rows = await fetch(dsn, "SELECT * FROM rewards.redemptions")
                done = all(r["status"] in ("fulfilled", "failed") for r in rows)
                answered = all(r["ledger_status"] in ("redeemed", "released", "rejected") for r in rows)
                if not (done and answered):
                    return None
                balances = {c: (await ledger_client.get(f"/v1/customers/{c}/balance", headers=ledger_support.ADMIN)).json()
                            for c in customers}
                return (rows, balances) if all(b["held_points"] == 0 for b in balances.values()) else None

            rows, balances = await eventually(all_settled, timeout_s=90, interval_s=0.3)
    finally:
        rewards.stop()
        ledger.stop()
    assert len(rows) == len(attempted)  # one redemption per idempotency key: none lost, none doubled
    fulfilled = [r for r in rows if r["status"] == "fulfilled"]
    assert fulfilled and all(r["ledger_status"] == "redeemed" for r in fulfilled)
    assert all(r["ledger_status"] in ("released", "rejected") for r in rows if r["status"] == "failed")
    for c in customers:
        spent = sum(r["cost_points"] for r in fulfilled if r["customer_id"] == c)
        assert balances[c]["available_points"] == START_POINTS - spent, c
    assert sum(1 for r in fulfilled if r["reward_id"] == "limited") <= LIMITED_STOCK
    codes = [r["code"] for r in fulfilled if r["reward_id"] == "voucher"]
    assert len(codes) == len(set(codes)) and all(codes)
