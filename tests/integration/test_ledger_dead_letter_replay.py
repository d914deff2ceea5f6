"""A purchase in a currency the program has no rate for waits in points.dlq, visible to the
operator, and earns once a program version adds the rate and the dead letter is replayed:
real broker and PostgreSQL."""


import pytest

from shared.topics import POINTS_EVENTS, PURCHASES_RECORDED
from tests.support.hostile import eventually
from tests.support.kafka import consume, produce, unique
from tests.support.ledger import ADMIN, ledger_settings, purchase_recorded, running_ledger

pytestmark = pytest.mark.asyncio(loop_scope="session")




async def test_a_usd_purchase_waits_in_the_dead_letters_and_earns_once_a_rate_is_added(base_env, kafka_bootstrap):
    settings = ledger_settings(base_env)
    customer = unique("c-")
    usd = purchase_recorded(customer, amounts=("40.00",), currency="USD")
    async with running_ledger(settings) as (_, client):
        await produce(kafka_bootstrap, settings.topic(PURCHASES_RECORDED), [usd], key=customer)

        async def waiting():
            page = (await client.get("/v1/admin/dead-letters", headers=ADMIN,
                                     params={"reason": "unknown_currency"})).json()
            return page["items"]
        [letter] = await eventually(waiting)
        assert (await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)).status_code in (200, 404)

        program = (await client.get("/v1/admin/program", headers=ADMIN)).json()["program"]
        saved = await client.put("/v1/admin/program", headers={**ADMIN, "X-Actor": "anna@ops"},
                                 json={**program, "currency_rates": {**program["currency_rates"], "USD": "4.00"}})
        assert saved.status_code == 200, saved.text
        replay = (await client.post("/v1/admin/dead-letters/replay", headers=ADMIN,
                                    json={"reason": "unknown_currency", "actor": "anna@ops"})).json()
        again = (await client.post("/v1/admin/dead-letters/replay", headers=ADMIN,
                                   json={"ids": [letter["dead_letter_id"]], "actor": "anna@ops"})).json()
        events = await consume(kafka_bootstrap, settings.topic(POINTS_EVENTS), at_least=1, idle_s=2)

        async def balance():
            r = await client.get(f"/v1/customers/{customer}/balance", headers=ADMIN)
            return r.json() if r.status_code == 200 and r.json()["pending_points"] else None
        after = await eventually(balance)
    assert [o["outcome"] for o in replay["outcomes"]] == ["replayed"]
    assert [o["outcome"] for o in again["outcomes"]] == ["already_replayed"]
    earned = [e for e in events if e["type"] == "PointsEarned" and e["customer_id"] == customer]
    assert len(earned) == 1 and earned[0]["payload"]["purchase_id"] == usd["payload"]["purchase_id"]
    assert after["pending_points"] == 160  # 40 USD x 4.00 = 160 PLN, 1 point per PLN at the first tier
