"""Engagement against the real broker, PostgreSQL and a real SMTP server (the aiosmtpd
catcher): journeys started by events, sent by the dispatcher with the test's clock, the
survey answered in a real headless browser."""

import re
import uuid
from datetime import timedelta

import pytest

from deploy.local.infra import free_port
from services.engagement.feedback import refresh_gauges
from shared.topics import ENGAGEMENT_EVENTS, POINTS_EVENTS, PURCHASES_RECORDED
from tests.support.engagement import (
    ADMIN_KEY,
    BACKEND_KEY,
    CHROMIUM,
    CHROMIUM_ARGS,
    NOON_UTC,
    TestClock,
    contact,
    engagement_settings,
    mail_catcher,
    mails_to,
    points_earned,
    return_of,
    rows,
    running_engagement,
    sale,
    wait_for,
)
from tests.support.kafka import consume, produce

ADMIN = {"X-Admin-Key": ADMIN_KEY}


@pytest.fixture
def catcher(tmp_path):
    with mail_catcher(tmp_path / "mail") as c:
        yield c


def body_of(message) -> str:
    return message.get_body(("plain",)).get_content()


async def start(base_env, catcher, clock, **overrides):
    settings = engagement_settings(base_env, smtp_port=catcher.port, http_port=free_port(), **overrides)
    return running_engagement(settings, clock)


async def put_contact(client, customer_id, email, **kw):
    r = await client.put(f"/v1/customers/{customer_id}/contact", json=contact(email, **kw),
                         headers={"X-Backend-Key": BACKEND_KEY})
    assert r.status_code == 200, r.text


async def test_a_sale_brings_the_thank_you_email_with_the_points_it_earned(base_env, catcher, kafka_bootstrap):
    prefix = base_env["TOPIC_PREFIX"]
    clock = TestClock(NOON_UTC)
    customer, email = f"c-{uuid.uuid4().hex[:8]}", f"{uuid.uuid4().hex[:8]}@example.com"
    async with await start(base_env, catcher, clock) as (_, client):
        await put_contact(client, customer, email)
        sold = sale(customer, at=NOON_UTC - timedelta(seconds=5))
        await produce(kafka_bootstrap, prefix + PURCHASES_RECORDED, [sold], key_field="customer_id")
        await produce(kafka_bootstrap, prefix + POINTS_EVENTS, [points_earned(sold, 42)], key_field="customer_id")
        mails = await wait_for(lambda: mails_to(catcher, email), what="the thank-you")
    assert len(mails) == 1
    mail = mails[0]
    assert mail["Subject"] == "Dziękujemy za zakupy"
    assert "42 pkt" in body_of(mail) and "w sklepie s1" in body_of(mail)
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert re.match(r"<http://127\.0\.0\.1:\d+/u/[^>]+>", mail["List-Unsubscribe"])
    timer = (await rows(base_env["DATABASE_URL"], "SELECT timer_id FROM timers WHERE journey = 'thank_you'"))[0]
    assert mail["Message-ID"] == f"<{timer['timer_id']}@loyalty.local>"
    events = await consume(kafka_bootstrap, prefix + ENGAGEMENT_EVENTS, count=2, timeout_s=20)
    assert {e["type"] for e in events} >= {"TouchpointSent"} and all("@" not in str(e) for e in events)


async def test_history_never_starts_a_journey(base_env, catcher, kafka_bootstrap):
    prefix = base_env["TOPIC_PREFIX"]
    clock = TestClock(NOON_UTC)
    customer, email = f"c-{uuid.uuid4().hex[:8]}", f"{uuid.uuid4().hex[:8]}@example.com"
    async with await start(base_env, catcher, clock) as (_, client):
        await put_contact(client, customer, email)
        old = sale(customer, at=NOON_UTC - timedelta(days=400), history=True)
        live = sale(customer, at=NOON_UTC)
        await produce(kafka_bootstrap, prefix + PURCHASES_RECORDED, [old, live], key_field="customer_id")
        await produce(kafka_bootstrap, prefix + POINTS_EVENTS, [points_earned(old, 5, history=True)],
                      key_field="customer_id")
        dsn = base_env["DATABASE_URL"]
        await wait_for(lambda: rows(dsn, "SELECT 1 FROM sales WHERE purchase_id = $1", live["payload"]["purchase_id"]),
                       what="the live sale")
        instances = await rows(dsn, "SELECT journey, trigger_event_id::text AS e FROM journey_instances")
    # the live sale is not the customer's first (history counts), so no welcome; history starts nothing
    assert sorted(i["journey"] for i in instances) == ["after_sale"]
    assert {i["e"] for i in instances} == {live["event_id"]}


async def test_the_survey_is_answered_in_a_real_browser_and_a_detractor_opens_a_follow_up(
        base_env, catcher, kafka_bootstrap):
    from playwright.async_api import async_playwright

    prefix, dsn = base_env["TOPIC_PREFIX"], base_env["DATABASE_URL"]
    clock = TestClock(NOON_UTC)
    customer, email = f"c-{uuid.uuid4().hex[:8]}", f"{uuid.uuid4().hex[:8]}@example.com"
    async with await start(base_env, catcher, clock) as (app, client):
        await put_contact(client, customer, email, locale="en-GB")
        sold = sale(customer, at=NOON_UTC, category="shoes", store="krakow-1")
        await produce(kafka_bootstrap, prefix + PURCHASES_RECORDED, [sold], key_field="customer_id")
        await wait_for(lambda: rows(dsn, "SELECT 1 FROM timers WHERE step = 'survey'"), what="the survey timer")
        clock.advance(timedelta(days=15, minutes=1))  # the return window closed; 13:01 in Warsaw
        survey_mail = (await wait_for(lambda: [m for m in mails_to(catcher, email)
                                               if m["Subject"] == "How was your purchase?"], what="the survey"))[0]
        url = re.search(r"http://\S+/s/\S+", body_of(survey_mail))[0]
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                await page.goto(url)
                await page.check("input[name=nps][value='3']")
                await page.check("input[name=csat][value='2']")
                await page.fill("textarea[name=remark]", "The sole came off <b>after a week</b>")
                await page.click("button[type=submit]")
                assert "Thank you for your answer" in await page.content()
            finally:
                await browser.close()
        events = await consume(kafka_bootstrap, prefix + ENGAGEMENT_EVENTS, count=10, timeout_s=20, idle_s=2)
        followups = (await client.get("/v1/followups?status=open", headers=ADMIN)).json()
        stats = (await client.get("/v1/stats/satisfaction", headers=ADMIN)).json()
        gap = (await client.get("/v1/stats/relationship?days=60", headers=ADMIN)).json()
        await refresh_gauges(app.state.runtime.pool, app.state.engine)
        metrics = (await client.get("/metrics")).text
    answered = [e for e in events if e["type"] == "SurveyAnswered"]
    assert len(answered) == 1
    assert {k: answered[0]["payload"][k] for k in ("nps", "csat", "has_remark", "store_id", "category", "purchase_id")} == {
        "nps": 3, "csat": 2, "has_remark": True, "store_id": "krakow-1", "category": "shoes",
        "purchase_id": sold["payload"]["purchase_id"]}
    assert [e["payload"]["source"] for e in events if e["type"] == "ComplaintOpened"] == ["survey"]
    assert len(followups) == 1 and followups[0]["remark"] == "The sole came off <b>after a week</b>"
    opened = followups[0]
    assert opened["store_id"] == "krakow-1"
    assert [(s["store_id"], s["category"], s["nps"], s["csat_average"], s["response_rate"]) for s in stats] == [
        ("krakow-1", "shoes", -100.0, 2.0, 1.0)]
    assert 'engagement_nps{category="shoes",month="2026-12",store="krakow-1"} -100.0' in metrics
    assert 'engagement_csat_average{category="shoes",month="2026-12",store="krakow-1"} 2.0' in metrics
    assert customer not in metrics
    # the sale's first touchpoint was the survey, 15 days on: not followed up within 7 days
    assert gap["sales"] == 1 and gap["followed_up_within_7d_share"] == 0.0 and gap["survey_response_rate"] == 1.0
    assert gap["median_first_touch_seconds"] == 15 * 86400 + 60
    # the usage note and the welcome were due long before: dropped as stale, counted
    skipped = {r["step"]: r["reason"] for r in await rows(dsn, "SELECT step, reason FROM timers WHERE status = 'skipped'")}
    assert skipped == {"usage_note": "stale", "welcome": "stale"}


async def test_a_return_before_the_survey_cancels_it(base_env, catcher, kafka_bootstrap):
    prefix, dsn = base_env["TOPIC_PREFIX"], base_env["DATABASE_URL"]
    clock = TestClock(NOON_UTC)
    customer, email = f"c-{uuid.uuid4().hex[:8]}", f"{uuid.uuid4().hex[:8]}@example.com"
    async with await start(base_env, catcher, clock) as (_, client):
        await put_contact(client, customer, email)
        sold = sale(customer, at=NOON_UTC)
        await produce(kafka_bootstrap, prefix + PURCHASES_RECORDED, [sold, return_of(sold, at=NOON_UTC + timedelta(
            days=3))], key_field="customer_id")
        await wait_for(lambda: rows(dsn, "SELECT 1 FROM timers WHERE step = 'survey' AND status = 'skipped'"),
                       what="the survey cancelled")
        clock.advance(timedelta(days=16))
        await wait_for(lambda: rows(dsn, "SELECT 1 FROM timers WHERE step = 'welcome' AND status <> 'scheduled'"),
                       what="the dispatcher's round")
        timers = {r["step"]: (r["status"], r["reason"]) for r in await rows(dsn, "SELECT step, status, reason FROM timers")}
        events = await consume(kafka_bootstrap, prefix + ENGAGEMENT_EVENTS, count=10, timeout_s=10, idle_s=2)
    assert timers["survey"] == ("skipped", "exited:return")
    assert timers["usage_note"] == ("skipped", "exited:return")
    assert not [m for m in mails_to(catcher, email) if "ankiet" in m["Subject"].lower() or "ocen" in m["Subject"]]
    assert {e["payload"]["reason"] for e in events if e["type"] == "TouchpointSkipped"} >= {"exited:return"}


async def test_revoked_consent_stops_messages(base_env, catcher, kafka_bootstrap):
    prefix, dsn = base_env["TOPIC_PREFIX"], base_env["DATABASE_URL"]
    clock = TestClock(NOON_UTC)
    customer, email = f"c-{uuid.uuid4().hex[:8]}", f"{uuid.uuid4().hex[:8]}@example.com"
    async with await start(base_env, catcher, clock) as (_, client):
        await put_contact(client, customer, email)
        first = sale(customer, at=NOON_UTC)
        await produce(kafka_bootstrap, prefix + POINTS_EVENTS, [points_earned(first, 10)], key_field="customer_id")
        mail = (await wait_for(lambda: mails_to(catcher, email), what="the first thank-you"))[0]
        one_click = mail["List-Unsubscribe"].strip("<>")
        page = await client.get(one_click)
        assert page.status_code == 200 and "<form method=\"post\">" in page.text
        r = await client.post(one_click, data={"List-Unsubscribe": "One-Click"})  # RFC 8058
        assert r.status_code == 200
        second = sale(customer, at=NOON_UTC + timedelta(minutes=1))
        await produce(kafka_bootstrap, prefix + POINTS_EVENTS, [points_earned(second, 20)], key_field="customer_id")
        clock.advance(timedelta(minutes=2))
        await wait_for(lambda: rows(dsn, "SELECT 1 FROM timers WHERE status = 'skipped' AND reason = 'no_consent'"),
                       what="the second thank-you skipped")
        contact_now = (await client.get(f"/v1/customers/{customer}/contact", headers=ADMIN)).json()
        events = await consume(kafka_bootstrap, prefix + ENGAGEMENT_EVENTS, count=10, timeout_s=10, idle_s=2)
    assert len(mails_to(catcher, email)) == 1
    assert contact_now["consent"]["email"]["granted"] is False
    assert contact_now["consent"]["email"]["source"] == "unsubscribe_link"
    changed = [e for e in events if e["type"] == "ConsentChanged"]
    assert [(e["payload"]["channel"], e["payload"]["granted"]) for e in changed] == [
        ("email", True), ("sms", False), ("email", False)]
    assert all(email not in str(e) for e in events)


async def test_erasing_a_customer_removes_contact_consent_and_message_content(base_env, catcher, kafka_bootstrap):
    prefix, dsn = base_env["TOPIC_PREFIX"], base_env["DATABASE_URL"]
    clock = TestClock(NOON_UTC)
    customer, email = f"c-{uuid.uuid4().hex[:8]}", f"{uuid.uuid4().hex[:8]}@example.com"
    async with await start(base_env, catcher, clock) as (_, client):
        await put_contact(client, customer, email)
        sold = sale(customer, at=NOON_UTC)
        await produce(kafka_bootstrap, prefix + PURCHASES_RECORDED, [sold], key_field="customer_id")
        await produce(kafka_bootstrap, prefix + POINTS_EVENTS, [points_earned(sold, 7)], key_field="customer_id")
        mail = (await wait_for(lambda: mails_to(catcher, email), what="the thank-you"))[0]
        await wait_for(lambda: rows(dsn, "SELECT 1 FROM timers WHERE step = 'survey'"), what="the survey timer")
        # the remark or complaint link in the footer: a page, a form, a follow-up
        complaint_url = re.search(r"http://\S+/c/\S+", body_of(mail))[0]
        page = await client.get(complaint_url)
        assert page.status_code == 200 and '<textarea name="remark"' in page.text
        sent = await client.post(complaint_url, data={"remark": "Nobody answered the phone"})
        assert sent.status_code == 200
        [task] = (await client.get("/v1/followups", headers=ADMIN)).json()
        assert task["source"] == "complaint_form" and task["remark"] == "Nobody answered the phone"
        r = await client.delete(f"/v1/customers/{customer}", headers=ADMIN)
        assert r.status_code == 200, r.text
        after = (await client.get(f"/v1/customers/{customer}/contact", headers=ADMIN)).json()
    assert after["email"] is None and after["consent"] == {} and after["erased"] is True
    assert [tuple(r) for r in await rows(dsn, "SELECT subject, body FROM messages")] == [(None, None)]
    assert {r["status"] for r in await rows(dsn, "SELECT status FROM timers WHERE step <> 'thank_you'")} == {"skipped"}
    assert not await rows(dsn, "SELECT 1 FROM customers WHERE email IS NOT NULL OR phone IS NOT NULL")
    assert [r["remark"] for r in await rows(dsn, "SELECT remark FROM followups")] == [None]


async def test_a_thank_you_in_quiet_hours_waits_for_the_morning_in_the_customers_time_zone(
        base_env, catcher, kafka_bootstrap):
    prefix, dsn = base_env["TOPIC_PREFIX"], base_env["DATABASE_URL"]
    evening = NOON_UTC + timedelta(hours=9, minutes=30)  # 22:30 in Warsaw
    clock = TestClock(evening)
    customer, email = f"c-{uuid.uuid4().hex[:8]}", f"{uuid.uuid4().hex[:8]}@example.com"
    async with await start(base_env, catcher, clock) as (_, client):
        await put_contact(client, customer, email)
        await produce(kafka_bootstrap, prefix + POINTS_EVENTS, [points_earned(sale(customer, at=evening), 9)],
                      key_field="customer_id")
        deferred = await wait_for(lambda: rows(dsn, "SELECT until_at FROM decisions WHERE decision = 'defer' "
                                                    "AND reason = 'quiet_hours'"), what="the deferral")
        assert deferred[0]["until_at"] == NOON_UTC + timedelta(hours=19)  # 08:00 in Warsaw, 07:00 UTC
        assert not mails_to(catcher, email)
        clock.advance(timedelta(hours=9, minutes=31))
        mail = (await wait_for(lambda: mails_to(catcher, email), what="the morning's thank-you"))[0]
    assert "9 pkt" in body_of(mail)
