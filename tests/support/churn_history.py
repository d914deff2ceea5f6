"""A generated customer history for the churn reports' tests: several hundred customers over
two years, each with a buying rhythm, some leaving for good; survey answers, contacts, tiers
lost and failed redemptions as engagement/points/rewards events. Deterministic (seeded).

`seed_state` writes what the churn consumer derives from purchases (customer_state,
purchase_days, category_spend) and what its scheduled evaluation derives (scores,
risk_states), so the reports can be checked against the raw history here."""

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import asyncpg

CATEGORIES = {"grocery": Decimal("0.20"), "electronics": Decimal("0.10"), "beauty": Decimal("0.45")}
SEGMENTS = ("Champions", "Loyal", "Potential loyalist", "At risk", "Hibernating")


@dataclass
class Customer:
    customer_id: str
    days: list[date] = field(default_factory=list)
    lines: list[tuple[date, str, Decimal]] = field(default_factory=list)  # sales
    returned: Decimal = Decimal(0)
    left: bool = False

    @property
    def gross(self) -> Decimal:
        return sum((amount for _, _, amount in self.lines), Decimal(0))

    def margin(self) -> Decimal:
        by_category: dict[str, Decimal] = {}
        for _, category, amount in self.lines:
            by_category[category] = by_category.get(category, Decimal(0)) + amount
        # returns come off the first category bought, at its rate
        first = self.lines[0][1]
        by_category[first] -= self.returned
        return sum((net * CATEGORIES[c] for c, net in by_category.items()), Decimal(0))


@dataclass
class History:
    now: datetime
    customers: dict[str, Customer]
    answers: list[dict]  # SurveyAnswered envelopes (JSON-ready)
    events: list[dict]  # TouchpointSent, TierChanged, RedemptionFailed envelopes


def _envelope(kind: str, customer_id: str, at: datetime, payload: dict, producer: str) -> dict:
    return {"event_id": str(uuid.uuid4()), "type": kind, "schema_version": 1, "occurred_at": at.isoformat(),
            "recorded_at": at.isoformat(), "producer": producer, "correlation_id": str(uuid.uuid4()),
            "causation_id": None, "customer_id": customer_id, "payload": payload}


def _at(day: date, hour: int = 12) -> datetime:
    return datetime.combine(day, time(hour), tzinfo=UTC)


def generate(*, customers: int = 400, now: datetime = datetime(2026, 12, 1, 9, tzinfo=UTC),
             seed: int = 13) -> History:
    rng = random.Random(seed)
    start = now.date() - timedelta(days=730)
    people: dict[str, Customer] = {}
    answers, events = [], []
    for n in range(customers):
        c = Customer(f"hist-{n:04d}")
        rhythm = rng.choice((7, 14, 21, 30, 45, 75))
        day = start + timedelta(days=rng.randrange(0, 700))
        leaves_on = day + timedelta(days=rng.randrange(30, 500)) if rng.random() < 0.35 else None
        c.left = leaves_on is not None
        while day < now.date() and (leaves_on is None or day < leaves_on):
            if not c.days or c.days[-1] != day:
                c.days.append(day)
            c.lines.append((day, rng.choice(tuple(CATEGORIES)), Decimal(rng.randrange(500, 40000)) / 100))
            day += timedelta(days=max(1, int(rng.gauss(rhythm, rhythm / 3))))
        if not c.days:
            continue
        if rng.random() < 0.15:
            c.returned = (c.gross * Decimal(rng.choice(("0.05", "0.25", "0.4")))).quantize(Decimal("0.01"))
        people[c.customer_id] = c
        for d in rng.sample(c.days, k=min(len(c.days), rng.randrange(0, 3))):
            answered = _at(d + timedelta(days=2), 18)
            if answered >= now:
                continue
            payload = {"survey_id": str(uuid.uuid4()), "nps": rng.choice((None, *range(11))),
                       "csat": rng.choice((None, 1, 2, 3, 4, 5, 5, 4)), "has_remark": False,
                       "answered_at": answered.isoformat()}
            if payload["nps"] is None and payload["csat"] is None:
                payload["csat"] = 4
            answers.append(_envelope("SurveyAnswered", c.customer_id, answered, payload, "engagement"))
        if rng.random() < 0.6:
            sent = _at(c.days[-1] + timedelta(days=rng.randrange(1, 60)), 10)
            if sent < now:
                events.append(_envelope("TouchpointSent", c.customer_id, sent, {
                    "touchpoint_id": str(uuid.uuid4()), "journey": "after-sale", "journey_version": 1,
                    "step": "thanks", "channel": "email", "trigger_event_id": str(uuid.uuid4()),
                    "sent_at": sent.isoformat()}, "engagement"))
        if rng.random() < 0.1:
            events.append(_envelope("TierChanged", c.customer_id, _at(c.days[-1]), {
                "from_tier": "Silver", "to_tier": "Bronze", "qualifying_points": 400,
                "balance": {"available_points": 0, "pending_points": 0, "held_points": 0, "debt_points": 0,
                            "tier": "Bronze", "qualifying_points": 400}, "history": False}, "ledger"))
        if rng.random() < 0.08:
            events.append(_envelope("RedemptionFailed", c.customer_id, _at(c.days[-1]), {
                "redemption_id": str(uuid.uuid4()), "reward_id": "coffee", "cost_points": 300,
                "reason": "out_of_stock"}, "rewards"))
    return History(now, people, answers, events)


async def seed_state(conn: asyncpg.Connection, history: History, *, lost_after_days: int = 180) -> None:
    """The churn consumer's per-customer state and the evaluation's scores and risk states.
    Risk: lost past `lost_after_days` since the last purchase, at risk past a third of it."""
    rng = random.Random(7)
    today = history.now.date()
    for c in history.customers.values():
        last_answer = max((a for a in history.answers if a["customer_id"] == c.customer_id),
                          key=lambda a: a["payload"]["answered_at"], default=None)
        points = rng.choice((0, 120, 650, 1500))
        await conn.execute("""
            INSERT INTO customer_state (customer_id, currency, first_purchase_day, last_purchase_day,
                first_purchase_at, last_purchase_at, purchase_days, purchases, gross_spend, returned_spend, margin,
                points_available, points_pending, last_nps, last_csat, complaints_open)
            VALUES ($1, 'PLN', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, $12, $13, $14)""",
            c.customer_id, c.days[0], c.days[-1], _at(c.days[0]), _at(c.days[-1]), len(c.days), len(c.lines),
            c.gross, c.returned, c.margin(), points,
            last_answer["payload"]["nps"] if last_answer else None,
            last_answer["payload"]["csat"] if last_answer else None, 1 if rng.random() < 0.1 else 0)
        per_day: dict[date, tuple[int, Decimal]] = {}
        for day, _, amount in c.lines:
            n, spend = per_day.get(day, (0, Decimal(0)))
            per_day[day] = (n + 1, spend + amount)
        await conn.executemany("INSERT INTO purchase_days (customer_id, day, purchases, spend) VALUES ($1, $2, $3, $4)",
                               [(c.customer_id, d, n, s) for d, (n, s) in per_day.items()])
        per_category: dict[str, Decimal] = {}
        for _, category, amount in c.lines:
            per_category[category] = per_category.get(category, Decimal(0)) + amount
        per_category[c.lines[0][1]] -= c.returned
        await conn.executemany(
            "INSERT INTO category_spend (customer_id, category, net_spend, margin) VALUES ($1, $2, $3, $4)",
            [(c.customer_id, k, v, v * CATEGORIES[k]) for k, v in per_category.items()])
        idle = (today - c.days[-1]).days
        await conn.execute("""
            INSERT INTO scores (customer_id, recency_days, recency_score, frequency_score, monetary_score, segment,
                rank_value, scored_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            c.customer_id, idle, max(1, 5 - idle // 60), min(5, 1 + len(c.days) // 8), rng.randrange(1, 6),
            SEGMENTS[min(4, idle // 60)], c.margin(), history.now)
        state = "lost" if idle >= lost_after_days else "at_risk" if idle >= lost_after_days // 3 else "active"
        entered = _at(c.days[-1] + timedelta(days=lost_after_days if state == "lost" else lost_after_days // 3))
        reasons = json.dumps([{"signal": "overdue", "detail": f"{idle} days since the last purchase", "value": idle,
                               "threshold": lost_after_days // 3}] if state != "active" else [])
        await conn.execute("""
            INSERT INTO risk_states (customer_id, state, episode, entered_at, reasons, updated_at)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6)""", c.customer_id, state, 0 if state == "active" else 1,
            entered if state != "active" else None, reasons, history.now)


# ---- the independent computation, from the raw history only ----

def active(days: list[date], at: date, window: int) -> bool:
    return any(0 <= (at - d).days < window for d in days)


def expected_month(history: History, window: int, first: date, last: date) -> dict:
    """The indicators of [first, last] by their definitions, from the raw history only."""
    before = first - timedelta(days=1)
    start = {c.customer_id for c in history.customers.values() if active(c.days, before, window)}
    end = {c.customer_id for c in history.customers.values() if active(c.days, last, window)}
    repeat = {cid for cid in end
              if sum(1 for d in history.customers[cid].days if 0 <= (last - d).days < window) >= 2}
    answers = [a["payload"] for a in history.answers
               if first <= datetime.fromisoformat(a["payload"]["answered_at"]).date() <= last]
    csat = [a["csat"] for a in answers if a["csat"] is not None]
    nps = [a["nps"] for a in answers if a["nps"] is not None]
    return {
        "customers_at_start": len(start), "customers_at_end": len(end), "new_customers": len(end - start),
        "lost_customers": len(start - end),
        "retention_rate": round(len(start & end) / len(start), 6) if start else None,
        "churn_rate": round(len(start - end) / len(start), 6) if start else None,
        "loyalty_index": round(len(repeat) / len(end), 6) if end else None,
        "csat": round(sum(1 for v in csat if v >= 4) / len(csat), 6) if csat else None, "csat_answers": len(csat),
        "nps": round(100 * (sum(1 for v in nps if v >= 9) - sum(1 for v in nps if v <= 6)) / len(nps), 6)
        if nps else None, "nps_answers": len(nps),
    }


def month_bounds(year: int, month: int) -> tuple[date, date]:
    first = date(year, month, 1)
    nxt = date(year + month // 12, month % 12 + 1, 1)
    return first, nxt - timedelta(days=1)
