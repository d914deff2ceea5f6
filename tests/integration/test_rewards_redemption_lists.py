"""Paging of a customer's redemptions (GET /v1/redemptions and the support list GET
/v1/admin/redemptions?customer_id=) against the real PostgreSQL, with redemptions that share
a requested_at (a burst of requests, a clock with coarse resolution): the service's clock is
fixed while they are made. Every redemption comes exactly once, newest first, whether the
pages are followed with next_cursor or with the deprecated next_before."""

import asyncio
import base64
import contextlib
import uuid
from datetime import datetime, timedelta

import pytest
import pytest_asyncio

from shared.events import utcnow
from tests.support.kafka import unique
from tests.support.rewards import ADMIN, bearer, eventually, fake_ledger, outcome, rewards_settings, running_rewards

pytestmark = pytest.mark.asyncio(loop_scope="session")

LIMIT = 4
# (instant, redemptions made at it), oldest first: the pages of LIMIT cut through the group of
# 9, the first page ends exactly on its instant.
BURSTS = ((0, 3), (1, 1), (2, 9), (3, 4))


@pytest.fixture(scope="module")
def settings(module_env):
    return rewards_settings(module_env, saga_wait_ms=5000)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rewards(settings, kafka_bootstrap):
    async with running_rewards(settings) as (app, client):
        async with fake_ledger(kafka_bootstrap, settings) as ledger:
            yield app, client, ledger


@contextlib.contextmanager
def clock_at(app, at: datetime):
    """The service's clock stands still at `at`: every redemption made meanwhile gets it."""
    ctx = app.state.rewards
    original = ctx.now
    ctx.now = lambda: at
    try:
        yield
    finally:
        ctx.now = original


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def customer(rewards, settings):
    """A customer with the BURSTS' redemptions, and their (requested_at, id) newest first."""
    app, client, ledger = rewards
    response = await client.post("/v1/admin/rewards", headers=ADMIN, json={
        "reward_id": unique("r-"), "name": "Gift card", "cost_points": 10, "kind": "voucher",
        "voucher_value": "5.00", "voucher_currency": "EUR"})
    assert response.status_code == 201, response.text
    reward_id = response.json()["reward_id"]
    customer_id = unique("c-")
    headers = bearer(customer_id, settings)
    await ledger.credit(customer_id, 1000)

    async def learned():
        return (await client.get("/v1/rewards", headers=headers)).json()["available_points"] == 1000

    await eventually(learned)

    async def redeem() -> dict:
        response = await client.post("/v1/redemptions", json={"reward_id": reward_id},
                                     headers=headers | {"Idempotency-Key": unique("k-")})
        return await outcome(client, headers, response)

    base = utcnow().replace(microsecond=0) - timedelta(seconds=10)
    made = []
    for offset_ms, count in BURSTS:
        at = base + timedelta(milliseconds=offset_ms)
        with clock_at(app, at):
            burst = await asyncio.gather(*(redeem() for _ in range(count)))
        assert {datetime.fromisoformat(r["requested_at"]) for r in burst} == {at}  # the clock was fixed
        made += [(at, uuid.UUID(r["redemption_id"])) for r in burst]
    assert len(made) == sum(count for _, count in BURSTS)
    return customer_id, headers, sorted(made, reverse=True)


def lister(client, customer_id: str, headers: dict[str, str], admin: bool):
    """GET one page of the customer's list (theirs, or support's): the response."""
    async def get(**params):
        if admin:
            return await client.get("/v1/admin/redemptions", headers=ADMIN,
                                    params={"customer_id": customer_id, **params})
        return await client.get("/v1/redemptions", headers=headers, params=params)

    return get


def listing(client, customer_id: str, headers: dict[str, str], admin: bool):
    """GET one page of the customer's list, which must be a 200: the body."""
    get = lister(client, customer_id, headers, admin)

    async def page(**params) -> dict:
        response = await get(**params)
        assert response.status_code == 200, response.text
        body = response.json()
        if admin:
            assert {r["customer_id"] for r in body["redemptions"]} <= {customer_id}
        return body

    return page


def keys(body: dict) -> list[tuple[datetime, uuid.UUID]]:
    return [(datetime.fromisoformat(r["requested_at"]), uuid.UUID(r["redemption_id"])) for r in body["redemptions"]]


@pytest.mark.parametrize("admin", [False, True], ids=["customer", "admin"])
async def test_paging_with_next_before_skips_no_redemption_sharing_a_requested_at(rewards, customer, admin):
    """An existing client: the first page, then ?before=next_before until it is null. A page
    ends on a whole requested_at (the group of 9 comes on one page of 9), so the next one,
    requested_at < next_before, misses none of it."""
    _, client, _ = rewards
    customer_id, headers, expected = customer
    page = listing(client, customer_id, headers, admin)

    pages = [await page(limit=LIMIT)]
    while pages[-1]["next_before"] is not None and len(pages) < 10:
        pages.append(await page(limit=LIMIT, before=pages[-1]["next_before"]))
    seen = [key for body in pages for key in keys(body)]
    assert seen == expected  # each exactly once, newest first (requested_at, then id)
    assert [len(body["redemptions"]) for body in pages] == [4, 9, 4]
    for body in pages[:-1]:  # next_before is the last requested_at, next_cursor goes on from the same place
        assert datetime.fromisoformat(body["next_before"]) == keys(body)[-1][0] and body["next_cursor"] is not None
    assert pages[-1]["next_before"] is None and pages[-1]["next_cursor"] is None


@pytest.mark.parametrize("admin", [False, True], ids=["customer", "admin"])
async def test_paging_with_next_cursor_returns_every_redemption_once_in_pages_of_the_limit(rewards, customer, admin):
    _, client, _ = rewards
    customer_id, headers, expected = customer
    page = listing(client, customer_id, headers, admin)

    seen, sizes, body = [], [], await page(limit=LIMIT)
    while True:
        seen += keys(body)
        sizes.append(len(body["redemptions"]))
        if body["next_cursor"] is None:
            break
        body = await page(limit=LIMIT, cursor=body["next_cursor"])
        assert body["next_before"] is None  # only on pages asked for without a cursor
    assert seen == expected
    assert sizes == [4, 4, 4, 4, 1]  # the cursor cuts the group of 9 anywhere, and never skips

    # One page as large as everything is the same list, with nothing after it.
    everything = await page(limit=200)
    assert keys(everything) == expected and everything["next_cursor"] is None and everything["next_before"] is None


@pytest.mark.parametrize("admin", [False, True], ids=["customer", "admin"])
async def test_a_malformed_cursor_or_before_is_a_422_that_says_why(rewards, customer, admin):
    _, client, _ = rewards
    customer_id, headers, _ = customer
    first = await listing(client, customer_id, headers, admin)(limit=LIMIT)

    get = lister(client, customer_id, headers, admin)

    def b64(raw: str) -> str:
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    rid = str(uuid.uuid4())
    for bad in ("not-a-cursor", "%%%",
                b64("2024-01-01T00:00:00+00:00"),  # no id
                b64(f"2024-01-01T00:00:00|{rid}"),  # no time zone
                b64("2024-01-01T00:00:00+00:00|not-a-uuid"),
                b64(f"0001-01-01T00:00:00+01:00|{rid}"),  # out of range in UTC
                first["next_cursor"][:-3]):  # a real one, cut short
        response = await get(cursor=bad)
        assert response.status_code == 422, (bad, response.text)
        body = response.json()
        assert body["error"] == "invalid_cursor" and "next_cursor" in body["detail"], (bad, body)

    too_long = await get(cursor="a" * 201)
    assert too_long.status_code == 422 and too_long.json()["error"] == "invalid_request"
    assert too_long.json()["errors"][0]["loc"] == ["query", "cursor"]

    both = await get(cursor=first["next_cursor"], before=first["next_before"])
    assert both.status_code == 422 and both.json()["error"] == "invalid_request", both.text
    assert "cursor" in both.json()["detail"] and "before" in both.json()["detail"]

    for bad_before in ("yesterday", "2024-01-01T00:00:00", "0001-01-01T00:00:00+01:00"):
        response = await get(before=bad_before)
        assert response.status_code == 422 and response.json()["error"] == "invalid_request", (bad_before,
                                                                                              response.text)
