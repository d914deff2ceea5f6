"""Engagement's admin side and the other channels, against the real broker, PostgreSQL and
SMTP catcher: journeys versioned through the API, complaints and follow-ups, the webhook
channel (signed, idempotency header), and delivery failures retried then marked failed."""

import hashlib
import hmac
import json
import threading
import uuid
from collections import Counter
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

from deploy.local.infra import free_port
from services.engagement.settings import DEFAULT_JOURNEYS_FILE
from shared.topics import ENGAGEMENT_EVENTS, POINTS_EVENTS
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

ADMIN = {"X-Admin-Key": ADMIN_KEY}


async def test_journeys_are_versioned_through_the_admin_api_and_the_file_is_not_stored_twice(base_env, tmp_path):
    clock = TestClock(NOON_UTC)
    with mail_catcher(tmp_path / "mail") as catcher:
        settings = engagement_settings(base_env, smtp_port=catcher.port, http_port=free_port())
        async with running_engagement(settings, clock) as (_, client):
            first = (await client.get("/v1/admin/journeys", headers=ADMIN)).json()
            assert first["version"] == 1
            doc = yaml.safe_load(DEFAULT_JOURNEYS_FILE.read_text())
            doc["journeys"] = [j for j in doc["journeys"] if j["name"] != "welcome"]
            r = await client.put("/v1/admin/journeys", content=yaml.safe_dump(doc), headers=ADMIN)
            assert r.status_code == 200 and r.json() == {"version": 2}
            bad = await client.put("/v1/admin/journeys", content="journeys: [{name: x}]", headers=ADMIN)
            assert bad.status_code == 422 and bad.json()["detail"]["reason"] == "invalid_journeys"
            assert (await client.put("/v1/admin/journeys", content="x", headers={})).status_code == 401
            now = (await client.get("/v1/admin/journeys", headers=ADMIN)).json()
            assert now["version"] == 2 and "welcome" not in [j["name"] for j in now["document"]["journeys"]]
        async with running_engagement(settings, clock) as (_, client):  # same file: no new version
            assert (await client.get("/v1/admin/journeys", headers=ADMIN)).json()["version"] == 2
    assert [r["source"] for r in await rows(base_env["DATABASE_URL"],
                                            "SELECT source FROM journey_versions ORDER BY version")] == ["file", "admin"]


async def test_a_complaint_opens_a_follow_up_that_staff_assign_and_resolve_within_the_deadline(
        base_env, tmp_path, kafka_bootstrap):
    clock = TestClock(NOON_UTC)
    customer = f"c-{uuid.uuid4().hex[:8]}"
    with mail_catcher(tmp_path / "mail") as catcher:
        settings = engagement_settings(base_env, smtp_port=catcher.port, http_port=free_port())
        async with running_engagement(settings, clock) as (_, client):
            r = await client.post(f"/v1/customers/{customer}/complaints", headers={"X-Backend-Key": BACKEND_KEY},
                                  json={"remark": "Wrong size delivered", "store_id": "s9", "category": "shoes"})
            assert r.status_code == 201, r.text
            assert (await client.post(f"/v1/customers/{customer}/complaints", json={"remark": "x"})).status_code == 401
            [task] = (await client.get("/v1/followups?status=open", headers=ADMIN)).json()
            assert task["due_at"].startswith("2026-12-09T12:00")  # 48 h
            assigned = await client.post(f"/v1/followups/{task['followup_id']}/assign", json={"assignee": "anna"},
                                         headers=ADMIN)
            assert assigned.json()["assignee"] == "anna"
            clock.advance(timedelta(hours=20))
            done = await client.post(f"/v1/followups/{task['followup_id']}/resolve",
                                     json={"resolution": "exchanged"}, headers=ADMIN)
            assert done.status_code == 200 and done.json()["status"] == "resolved"
            missing = await client.post(f"/v1/followups/{uuid.uuid4()}/resolve", json={}, headers=ADMIN)
            assert missing.status_code == 404
            gap = (await client.get("/v1/stats/relationship", headers=ADMIN)).json()
            events = await consume(kafka_bootstrap, base_env["TOPIC_PREFIX"] + ENGAGEMENT_EVENTS, count=2,
                                   timeout_s=20)
    assert gap["followups_resolved"] == 1 and gap["followups_resolved_within_deadline_share"] == 1.0
    assert [e["type"] for e in events] == ["ComplaintOpened", "ComplaintResolved"]
    assert events[1]["payload"]["within_deadline"] is True and events[0]["payload"]["source"] == "api"


class _Gateway(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args):
        pass


async def test_the_webhook_channel_posts_a_signed_message_with_the_idempotency_key(base_env, tmp_path,
                                                                                   kafka_bootstrap):
    clock = TestClock(NOON_UTC)
    customer = f"c-{uuid.uuid4().hex[:8]}"
    gateway = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    _Gateway.received = []
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    try:
        with mail_catcher(tmp_path / "mail") as catcher:
            settings = engagement_settings(
                base_env, smtp_port=catcher.port, http_port=free_port(),
                webhook_url=f"http://127.0.0.1:{gateway.server_port}/send", webhook_secret="hook-secret")
            async with running_engagement(settings, clock) as (_, client):
                doc = yaml.safe_load(DEFAULT_JOURNEYS_FILE.read_text())
                doc["journeys"][0]["steps"][0]["channel"] = "webhook"  # the thank-you by SMS gateway
                assert (await client.put("/v1/admin/journeys", content=yaml.safe_dump(doc), headers=ADMIN)).is_success
                body = {**contact("x@example.com", consent_email=False), "phone": "+48 600 100 200",
                        "consent": {"email": False, "sms": True}}
                assert (await client.put(f"/v1/customers/{customer}/contact", json=body,
                                         headers={"X-Backend-Key": BACKEND_KEY})).status_code == 200
                sold = sale(customer, at=NOON_UTC)
                await produce(kafka_bootstrap, base_env["TOPIC_PREFIX"] + POINTS_EVENTS, [points_earned(sold, 33)],
                              key_field="customer_id")
                await wait_for(lambda: _Gateway.received, what="the webhook call")
    finally:
        gateway.shutdown()
    headers, raw = _Gateway.received[0]
    timer = (await rows(base_env["DATABASE_URL"], "SELECT timer_id::text AS id FROM timers"))[0]
    assert headers["Idempotency-Key"] == timer["id"]
    assert headers["X-Signature"] == "sha256=" + hmac.new(b"hook-secret", raw, hashlib.sha256).hexdigest()
    message = json.loads(raw)
    assert message["phone"] == "+48 600 100 200" and "33 pkt" in message["body"]
    assert not catcher.messages()


async def test_a_refused_delivery_is_retried_then_marked_failed(base_env, tmp_path, kafka_bootstrap):
    clock = TestClock(NOON_UTC)
    customer = f"c-{uuid.uuid4().hex[:8]}"
    dead_port = free_port()  # nothing listens: every SMTP connection is refused
    settings = engagement_settings(base_env, smtp_port=dead_port, http_port=free_port(), delivery_max_attempts=3,
                                   delivery_backoff_s=60)
    async with running_engagement(settings, clock) as (_, client):
        assert (await client.put(f"/v1/customers/{customer}/contact", json=contact("y@example.com"),
                                 headers={"X-Backend-Key": BACKEND_KEY})).status_code == 200
        await produce(kafka_bootstrap, base_env["TOPIC_PREFIX"] + POINTS_EVENTS,
                      [points_earned(sale(customer, at=NOON_UTC), 5)], key_field="customer_id")
        dsn = base_env["DATABASE_URL"]
        await wait_for(lambda: rows(dsn, "SELECT 1 FROM timers WHERE attempts = 1"), what="the first failure")
        clock.advance(timedelta(seconds=61))
        await wait_for(lambda: rows(dsn, "SELECT 1 FROM timers WHERE attempts = 2"), what="the second failure")
        clock.advance(timedelta(seconds=121))
        await wait_for(lambda: rows(dsn, "SELECT 1 FROM timers WHERE status = 'failed'"), what="marked failed")
    decisions = Counter(r["decision"] for r in await rows(dsn, "SELECT decision FROM decisions"))
    assert decisions == {"send": 3, "retry": 2, "failed": 1}  # each attempt decided "send", then its outcome
    [timer] = await rows(dsn, "SELECT status, attempts, reason FROM timers")
    assert timer["status"] == "failed" and timer["reason"]  # the channel's error, kept


async def test_win_back_credits_its_points_through_the_ledger_once_then_sends(base_env, tmp_path, kafka_bootstrap):
    from services.ledger.main import create_app as create_ledger
    from shared.topics import CHURN_ALERTS
    from tests.support.engagement import alert, served
    from tests.support.ledger import ADMIN_KEY as LEDGER_KEY
    from tests.support.ledger import ledger_settings

    clock = TestClock(NOON_UTC)
    customer = f"c-{uuid.uuid4().hex[:8]}"
    ledger_port = free_port()
    async with served(create_ledger(ledger_settings(base_env, http_port=ledger_port)), ledger_port) as ledger:
        with mail_catcher(tmp_path / "mail") as catcher:
            settings = engagement_settings(base_env, smtp_port=catcher.port, http_port=free_port(),
                                           ledger_url=f"http://127.0.0.1:{ledger_port}",
                                           ledger_admin_api_key=LEDGER_KEY)
            async with running_engagement(settings, clock) as (_, client):
                assert (await client.put(f"/v1/customers/{customer}/contact", json=contact("w@example.com"),
                                         headers={"X-Backend-Key": BACKEND_KEY})).status_code == 200
                await produce(kafka_bootstrap, base_env["TOPIC_PREFIX"] + CHURN_ALERTS, [
                    alert("CustomerAtRisk", customer, at=NOON_UTC, quadrant="true_friend", ltv="640.00"),
                    alert("CustomerAtRisk", f"{customer}-x", at=NOON_UTC, quadrant="butterfly", ltv="900.00"),
                ], key_field="customer_id")
                mail = (await wait_for(lambda: [m for m in catcher.messages() if m["To"] == "w@example.com"],
                                       what="the win-back"))[0]
        balance = (await ledger.get(f"/v1/customers/{customer}/balance", headers={"X-Admin-Key": LEDGER_KEY})).json()
    assert "200 pkt" in mail.get_body(("plain",)).get_content()
    assert balance["available_points"] == 200
    assert [r["journey"] for r in await rows(base_env["DATABASE_URL"], "SELECT journey FROM journey_instances")] == [
        "win_back"]
