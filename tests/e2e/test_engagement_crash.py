"""kill -9 of the engagement service while it dispatches, then a restart: the mail catcher
(a real SMTP server) holds each due message exactly once. A message sent but not yet
recorded when the process died is sent once more with the same Message-ID (the catcher
keeps one file per Message-ID; its delivery log shows the resends, at most one each)."""

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from shared.topics import POINTS_EVENTS
from tests.support.engagement import ADMIN_KEY, BACKEND_KEY, contact, mail_catcher, points_earned, rows, sale, wait_for
from tests.support.kafka import produce
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

CUSTOMERS = 1500


async def test_kill_9_during_dispatch_then_restart_sends_each_due_message_once(base_env, kafka_bootstrap, tmp_path):
    now = datetime.now(UTC)
    noon = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
    dsn = base_env["DATABASE_URL"]
    with mail_catcher(tmp_path / "mail") as catcher:
        extra = {"ENGAGEMENT_SMTP_PORT": str(catcher.port), "ENGAGEMENT_ADMIN_API_KEY": ADMIN_KEY,
                 "ENGAGEMENT_BACKEND_API_KEY": BACKEND_KEY, "ENGAGEMENT_DISPATCH_BATCH": "50",
                 "ENGAGEMENT_DISPATCH_INTERVAL_S": "0.2", "ENGAGEMENT_DISPATCH_CONCURRENCY": "2",
                 # tomorrow's noon in UTC, so the quiet hours never get in the way whenever this runs
                 "ENGAGEMENT_CLOCK_OFFSET_S": str((noon - now).total_seconds())}
        service = ServiceProcess("engagement", base_env, extra, log_dir=tmp_path).start()
        try:
            customers = [f"c{i}-{uuid.uuid4().hex[:6]}" for i in range(CUSTOMERS)]
            async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
                gate = asyncio.Semaphore(16)

                async def put(c):
                    async with gate:
                        r = await client.put(f"/v1/customers/{c}/contact", headers={"X-Backend-Key": BACKEND_KEY},
                                             json=contact(f"{c}@example.com", time_zone="UTC"))
                        assert r.status_code == 200, r.text
                await asyncio.gather(*(put(c) for c in customers))
            events = [points_earned(sale(c, at=noon - timedelta(minutes=1)), 10 + i % 90)
                      for i, c in enumerate(customers)]
            await produce(kafka_bootstrap, base_env["TOPIC_PREFIX"] + POINTS_EVENTS, events, key_field="customer_id")
            await wait_for(lambda: len(catcher.deliveries()) >= CUSTOMERS // 5, timeout_s=120, what="some sent")
            service.kill9()
            at_kill = len(catcher.deliveries())
            assert at_kill < CUSTOMERS, "the kill must land in the middle of the dispatch"
            service.start()

            async def all_settled():
                return (await rows(dsn, "SELECT count(*) AS n FROM timers WHERE status = 'sent'"))[0]["n"] == CUSTOMERS
            await wait_for(all_settled, timeout_s=240, what="every thank-you sent")
        finally:
            service.stop()
        messages = catcher.messages()
        deliveries = Counter(catcher.deliveries())
    assert sorted(m["To"] for m in messages) == sorted(f"{c}@example.com" for c in customers)
    assert len({m["Message-ID"] for m in messages}) == CUSTOMERS
    assert max(deliveries.values()) <= 2  # at worst one resend each, with the same Message-ID
    points = {m["To"]: m.get_body(("plain",)).get_content() for m in messages}
    for i, c in enumerate(customers):
        assert f"{10 + i % 90} pkt" in points[f"{c}@example.com"]
    print(f"\nkilled after {at_kill} deliveries; resent after the restart: "
          f"{sum(n - 1 for n in deliveries.values())}")
