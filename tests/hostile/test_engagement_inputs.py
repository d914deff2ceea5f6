"""Bad input to engagement: a record it can never apply goes to engagement.dlq with the
reason (the partition goes on); bad HTTP requests get a 4xx with a useful body; signed links
refuse tampering; nothing personal leaks into a page."""

import uuid

from deploy.local.infra import free_port
from shared.topics import ENGAGEMENT_DLQ, POINTS_EVENTS, PURCHASES_RECORDED
from tests.support.engagement import (
    ADMIN_KEY,
    BACKEND_KEY,
    NOON_UTC,
    TestClock,
    contact,
    engagement_settings,
    mail_catcher,
    points_earned,
    rows,
    running_engagement,
    sale,
    wait_for,
)
from tests.support.kafka import consume, produce


async def test_records_it_cannot_apply_are_dead_lettered_with_the_reason_and_the_rest_applied(
        base_env, tmp_path, kafka_bootstrap):
    prefix, dsn = base_env["TOPIC_PREFIX"], base_env["DATABASE_URL"]
    customer = f"c-{uuid.uuid4().hex[:8]}"
    broken_sale = sale(customer, at=NOON_UTC)
    broken_sale["payload"]["total"] = [1, 2]  # an amount must be a decimal string
    good = sale(customer, at=NOON_UTC)
    with mail_catcher(tmp_path / "mail") as catcher:
        settings = engagement_settings(base_env, smtp_port=catcher.port, http_port=free_port())
        async with running_engagement(settings, TestClock(NOON_UTC)):
            await produce(kafka_bootstrap, prefix + PURCHASES_RECORDED, [b"{not json", broken_sale, good],
                          key=customer)
            await produce(kafka_bootstrap, prefix + POINTS_EVENTS,
                          [{**points_earned(good, 1), "type": "PointsFromTheFuture"}], key=customer)
            await wait_for(lambda: rows(dsn, "SELECT 1 FROM sales WHERE purchase_id = $1",
                                        good["payload"]["purchase_id"]), what="the good sale")
            letters = await consume(kafka_bootstrap, prefix + ENGAGEMENT_DLQ, count=2, timeout_s=20, idle_s=2)
    assert sorted(letter["reason"] for letter in letters) == ["malformed_json", "schema"]
    assert {letter["door"] for letter in letters} == {"purchases.recorded consumer"}


async def test_bad_contact_requests_are_refused_with_the_reason(base_env, tmp_path):
    customer = f"c-{uuid.uuid4().hex[:8]}"
    with mail_catcher(tmp_path / "mail") as catcher:
        settings = engagement_settings(base_env, smtp_port=catcher.port, http_port=free_port())
        async with running_engagement(settings, TestClock(NOON_UTC)) as (_, client):
            url, key = f"/v1/customers/{customer}/contact", {"X-Backend-Key": BACKEND_KEY}
            assert (await client.put(url, json=contact("a@example.com"))).status_code == 401
            assert (await client.put(url, json=contact("a@example.com"),
                                     headers={"X-Backend-Key": "wrong"})).status_code == 401
            zone = await client.put(url, json=contact("a@example.com", time_zone="Mars/Olympus"), headers=key)
            assert zone.status_code == 422 and zone.json()["detail"]["reason"] == "unknown_time_zone"
            for body in ({**contact("not-an-address")}, {**contact("a@example.com"), "extra": 1},
                         {**contact("a@example.com\r\nBcc: x@evil.test")},
                         {**contact("a@example.com"), "consent": {"email": "maybe"}}):
                r = await client.put(url, json=body, headers=key)
                assert r.status_code == 422, (body, r.text)
            # the back-end key sets data but never reads it back
            assert (await client.get(url, headers=key)).status_code == 401
            for path in ("/s/", "/u/", "/c/"):
                page = await client.get(path + "eyJwIjoic3VydmV5In0.AAAA")
                assert page.status_code == 404 and "invalid" in page.text.lower()
            answer = await client.post("/s/forged.token", data={"nps": "10"})
            assert answer.status_code == 404


async def test_bodies_it_cannot_read_and_odd_times_are_refused_in_its_own_error_shape(base_env, tmp_path):
    customer = f"c-{uuid.uuid4().hex[:8]}"
    with mail_catcher(tmp_path / "mail") as catcher:
        settings = engagement_settings(base_env, smtp_port=catcher.port, http_port=free_port(), max_body_bytes=2000)
        async with running_engagement(settings, TestClock(NOON_UTC)) as (_, client):
            url, key = f"/v1/customers/{customer}/complaints", {"X-Backend-Key": BACKEND_KEY}
            # not UTF-8: a 422 with FastAPI's list of errors, not a bare 400
            latin = await client.post(url, content="{\"remark\": \"zażółć\"}".encode("latin-1", "replace")
                                      .replace(b"?", b"\xb3"), headers={**key, "Content-Type": "application/json"})
            assert latin.status_code == 422, latin.text
            assert latin.json()["detail"][0]["type"] == "json_invalid_utf8"
            # over ENGAGEMENT_MAX_BODY_BYTES: 413 in the shape of every other refusal
            large = await client.post(url, json={"remark": "x" * 3000}, headers=key)
            assert large.status_code == 413, large.text
            assert large.json()["detail"]["reason"] == "body_too_large"
            admin = {"X-Admin-Key": ADMIN_KEY}
            for since in ("1700000000", "2026-12-07T08:00:00", "yesterday"):  # a number is not read as a timestamp
                r = await client.get("/v1/stats/satisfaction", params={"since": since}, headers=admin)
                assert r.status_code == 422 and r.json()["detail"]["reason"] == "invalid_time", (since, r.text)
            ok = await client.get("/v1/stats/satisfaction", params={"since": "2026-01-01T00:00:00+01:00"}, headers=admin)
            assert ok.status_code == 200 and ok.json() == [], ok.text
