"""Satisfaction and service recovery: survey answers (SurveyAnswered), complaints and
detractor answers (ComplaintOpened with a follow-up task and a deadline), the staff's
follow-up work (ComplaintResolved), and the aggregates (NPS, CSAT, response rates, the
relationship gap)."""

import uuid
from datetime import datetime, timedelta

import asyncpg

from services.engagement import domain as d
from services.engagement import metrics as m
from services.engagement.service import Engagement, event_message
from shared.events import derived_event_id
from shared.events.engagement import (
    ComplaintOpened,
    ComplaintOpenedPayload,
    ComplaintResolved,
    ComplaintResolvedPayload,
    SurveyAnswered,
    SurveyAnsweredPayload,
)
from shared.outbox import OutboxMessage


class SurveyUnavailable(Exception):
    """Unknown, expired or already answered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def survey(conn: asyncpg.Connection, survey_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM surveys WHERE survey_id = $1", survey_id)


async def answer_survey(conn: asyncpg.Connection, engine: Engagement, survey_id: uuid.UUID, *, nps: int | None,
                        csat: int | None, remark: str | None) -> list[OutboxMessage]:
    now = engine.clock()
    row = await conn.fetchrow("SELECT * FROM surveys WHERE survey_id = $1 FOR UPDATE", survey_id)
    if row is None:
        raise SurveyUnavailable("unknown_survey")
    if row["answered_at"] is not None:
        raise SurveyUnavailable("already_answered")
    if now > row["expires_at"]:
        raise SurveyUnavailable("expired")
    remark = (remark or "").strip() or None
    await conn.execute("UPDATE surveys SET answered_at = $2, nps = $3, csat = $4, remark = $5 WHERE survey_id = $1",
                       survey_id, now, nps, csat, remark)
    payload = SurveyAnsweredPayload(survey_id=survey_id, nps=nps, csat=csat, has_remark=remark is not None,
                                    purchase_id=row["purchase_id"], store_id=row["store_id"],
                                    category=row["category"], answered_at=now)
    out = [event_message(engine, SurveyAnswered, event_id=derived_event_id("engagement", "answer", str(survey_id)),
                         customer_id=row["customer_id"], payload=payload, occurred_at=now,
                         correlation_id=str(survey_id))]
    m.SURVEY_ANSWERS.labels("nps" if nps is not None else "csat" if csat is not None else "remark").inc()
    s = engine.settings
    if d.is_detractor(nps=nps, csat=csat, max_nps=s.detractor_max_nps, max_csat=s.detractor_max_csat):
        out += await open_complaint(conn, engine, customer_id=row["customer_id"], source="survey", remark=remark,
                                    purchase_id=row["purchase_id"], store_id=row["store_id"],
                                    category=row["category"], survey_id=survey_id,
                                    complaint_id=derived_event_id("engagement", "detractor", str(survey_id)))
    return out


async def open_complaint(conn: asyncpg.Connection, engine: Engagement, *, customer_id: str, source: str,
                         remark: str | None, purchase_id: str | None = None, store_id: str | None = None,
                         category: str | None = None, survey_id: uuid.UUID | None = None,
                         complaint_id: uuid.UUID | None = None) -> list[OutboxMessage]:
    """A follow-up task with a deadline (followup_deadline_h, default 48 h) and ComplaintOpened."""
    now = engine.clock()
    complaint_id = complaint_id or uuid.uuid4()
    followup_id = derived_event_id("engagement", "followup", str(complaint_id))
    due = now + timedelta(hours=engine.settings.followup_deadline_h)
    status = await conn.execute(
        """INSERT INTO followups (followup_id, complaint_id, customer_id, source, survey_id, purchase_id, store_id,
             category, remark, opened_at, due_at, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'open')
           ON CONFLICT (complaint_id) DO NOTHING""",
        followup_id, complaint_id, customer_id, source, survey_id, purchase_id, store_id, category, remark, now, due)
    if not status.endswith(" 1"):
        return []
    m.COMPLAINTS.labels(source).inc()
    payload = ComplaintOpenedPayload(complaint_id=complaint_id, followup_id=followup_id, purchase_id=purchase_id,
                                     store_id=store_id, category=category, source=source, due_at=due, opened_at=now)
    return [event_message(engine, ComplaintOpened, event_id=derived_event_id("engagement", "complaint",
                                                                             str(complaint_id)),
                          customer_id=customer_id, payload=payload, occurred_at=now, correlation_id=str(complaint_id))]


class FollowupNotFound(Exception):
    pass


async def list_followups(conn: asyncpg.Connection, *, status: str | None, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT followup_id, complaint_id, customer_id, source, purchase_id, store_id, category, remark, opened_at,
                  due_at, assignee, status, resolved_at, resolution FROM followups
           WHERE ($1::text IS NULL OR status = $1) ORDER BY due_at LIMIT $2""", status, limit)


async def assign_followup(conn: asyncpg.Connection, followup_id: uuid.UUID, assignee: str) -> asyncpg.Record:
    row = await conn.fetchrow("UPDATE followups SET assignee = $2 WHERE followup_id = $1 RETURNING *",
                              followup_id, assignee)
    if row is None:
        raise FollowupNotFound(str(followup_id))
    return row


async def resolve_followup(conn: asyncpg.Connection, engine: Engagement, followup_id: uuid.UUID,
                           resolution: str | None) -> tuple[asyncpg.Record, list[OutboxMessage]]:
    now = engine.clock()
    row = await conn.fetchrow("SELECT * FROM followups WHERE followup_id = $1 FOR UPDATE", followup_id)
    if row is None:
        raise FollowupNotFound(str(followup_id))
    if row["status"] == "resolved":
        return row, []
    row = await conn.fetchrow("""UPDATE followups SET status = 'resolved', resolved_at = $2, resolution = $3
                                 WHERE followup_id = $1 RETURNING *""", followup_id, now, resolution)
    within = now <= row["due_at"]
    m.FOLLOWUPS_RESOLVED.labels(str(within).lower()).inc()
    payload = ComplaintResolvedPayload(complaint_id=row["complaint_id"], followup_id=followup_id, resolved_at=now,
                                       within_deadline=within)
    return row, [event_message(engine, ComplaintResolved,
                               event_id=derived_event_id("engagement", "resolved", str(row["complaint_id"])),
                               customer_id=row["customer_id"], payload=payload, occurred_at=now,
                               correlation_id=str(row["complaint_id"]))]


# ---- aggregates --------------------------------------------------------------------------

SATISFACTION = """
SELECT coalesce(store_id, '') AS store, coalesce(category, '') AS category,
       to_char(date_trunc('month', sent_at AT TIME ZONE 'UTC'), 'YYYY-MM') AS month,
       count(*) AS sent, count(answered_at) AS answered,
       count(nps) AS nps_answers, count(*) FILTER (WHERE nps >= 9) AS promoters,
       count(*) FILTER (WHERE nps <= 6) AS detractors, avg(csat)::numeric(4,2) AS csat_average
FROM surveys WHERE sent_at >= $1 GROUP BY 1, 2, 3 ORDER BY 3, 1, 2
"""


def satisfaction_row(r: asyncpg.Record) -> dict:
    nps = None
    if r["nps_answers"]:
        nps = round(100 * (r["promoters"] - r["detractors"]) / r["nps_answers"], 1)
    return {"store_id": r["store"] or None, "category": r["category"] or None, "month": r["month"],
            "surveys_sent": r["sent"], "answers": r["answered"], "response_rate": round(r["answered"] / r["sent"], 4),
            "nps": nps, "nps_answers": r["nps_answers"],
            "csat_average": float(r["csat_average"]) if r["csat_average"] is not None else None}


async def satisfaction(conn: asyncpg.Connection, *, since: datetime) -> list[dict]:
    return [satisfaction_row(r) for r in await conn.fetch(SATISFACTION, since)]


RELATIONSHIP = """
SELECT count(*) AS sales,
       count(*) FILTER (WHERE first_touch_at <= occurred_at + interval '24 hours') AS within_24h,
       count(*) FILTER (WHERE first_touch_at <= occurred_at + interval '7 days') AS within_7d,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM first_touch_at - occurred_at))
         AS median_first_touch_s
FROM sales WHERE occurred_at >= $1 AND occurred_at < $2
"""


async def relationship_gap(conn: asyncpg.Connection, *, since: datetime, now: datetime) -> dict:
    r = await conn.fetchrow(RELATIONSHIP, since, now)
    surveys = await conn.fetchrow("SELECT count(*) AS sent, count(answered_at) AS answered FROM surveys "
                                  "WHERE sent_at >= $1", since)
    f = await conn.fetchrow(
        """SELECT count(*) FILTER (WHERE status = 'resolved') AS resolved,
                  count(*) FILTER (WHERE status = 'resolved' AND resolved_at <= due_at) AS in_deadline,
                  count(*) FILTER (WHERE status = 'open') AS open,
                  count(*) FILTER (WHERE status = 'open' AND due_at < $2) AS overdue
           FROM followups WHERE opened_at >= $1 OR status = 'open'""", since, now)
    sales = r["sales"]
    return {
        "since": since.isoformat(), "sales": sales,
        "median_first_touch_seconds": float(r["median_first_touch_s"]) if r["median_first_touch_s"] is not None
        else None,
        "followed_up_within_24h_share": round(r["within_24h"] / sales, 4) if sales else None,
        "followed_up_within_7d_share": round(r["within_7d"] / sales, 4) if sales else None,
        "survey_response_rate": round(surveys["answered"] / surveys["sent"], 4) if surveys["sent"] else None,
        "followups_resolved": f["resolved"], "followups_resolved_within_deadline": f["in_deadline"],
        "followups_resolved_within_deadline_share": round(f["in_deadline"] / f["resolved"], 4) if f["resolved"]
        else None,
        "followups_open": f["open"], "followups_overdue": f["overdue"],
    }


async def refresh_gauges(pool: asyncpg.Pool, engine: Engagement) -> None:
    now = engine.clock()
    async with pool.acquire() as conn:
        gap = await relationship_gap(conn, since=now - timedelta(days=30), now=now)
        rows = await satisfaction(conn, since=now - timedelta(days=92))
        oldest = await conn.fetchval("SELECT min(due_at) FROM timers WHERE status = 'scheduled' AND due_at <= $1", now)
        scheduled = await conn.fetchval("SELECT count(*) FROM timers WHERE status = 'scheduled'")
    m.FIRST_TOUCH_SECONDS.set(gap["median_first_touch_seconds"] or 0)
    m.FOLLOWED_UP_SHARE.labels("24h").set(gap["followed_up_within_24h_share"] or 0)
    m.FOLLOWED_UP_SHARE.labels("7d").set(gap["followed_up_within_7d_share"] or 0)
    m.FOLLOWUPS_IN_DEADLINE_SHARE.set(gap["followups_resolved_within_deadline_share"] or 0)
    m.FOLLOWUPS_OPEN.set(gap["followups_open"])
    m.FOLLOWUPS_OVERDUE.set(gap["followups_overdue"])
    m.DISPATCH_LAG_NOW.set((now - oldest).total_seconds() if oldest else 0)
    m.SCHEDULED.set(scheduled)
    for r in rows:
        labels = (r["store_id"] or "", r["category"] or "", r["month"])
        m.RESPONSE_RATE.labels(*labels).set(r["response_rate"])
        if r["nps"] is not None:
            m.NPS.labels(*labels).set(r["nps"])
        if r["csat_average"] is not None:
            m.CSAT.labels(*labels).set(r["csat_average"])
