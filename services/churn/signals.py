"""What the reports need from the churn service's input streams beyond customer_state:
every survey answer, the last contact from engagement, tiers lost, failed or cancelled
redemptions. `record_signals` is called by the consumer's apply function with a batch's
events, inside its transaction (idempotent: the pipeline's inbox drops duplicates first,
and survey answers are keyed by survey_id)."""

from collections.abc import Iterable, Sequence
from datetime import datetime

import asyncpg

_ANSWERS = """
INSERT INTO survey_answers (survey_id, customer_id, answered_at, nps, csat)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::smallint[], $5::smallint[])
ON CONFLICT (survey_id) DO NOTHING
"""

_SIGNALS = """
INSERT INTO relationship_signals AS s (customer_id, last_contact_at, tier_lost_at, failed_redemptions)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::int[])
ON CONFLICT (customer_id) DO UPDATE SET
    last_contact_at = GREATEST(s.last_contact_at, EXCLUDED.last_contact_at),
    tier_lost_at = GREATEST(s.tier_lost_at, EXCLUDED.tier_lost_at),
    failed_redemptions = s.failed_redemptions + EXCLUDED.failed_redemptions
"""


def tier_went_down(from_tier: str, to_tier: str, tier_order: Sequence[str]) -> bool:
    """Tier names in program order (lowest first); an unknown name is never a loss."""
    order = {name.casefold(): i for i, name in enumerate(tier_order)}
    low, high = order.get(to_tier.casefold()), order.get(from_tier.casefold())
    return low is not None and high is not None and low < high


async def record_signals(conn: asyncpg.Connection, events: Iterable[object], *, tier_order: Sequence[str]) -> None:
    answers: list[tuple] = []
    signals: dict[str, list] = {}

    def row(customer_id: str) -> list:
        return signals.setdefault(customer_id, [None, None, 0])

    def later(a: datetime | None, b: datetime) -> datetime:
        return b if a is None or b > a else a

    for event in events:
        kind, cid, payload = getattr(event, "type", None), getattr(event, "customer_id", None), event.payload
        if cid is None:
            continue
        if kind == "SurveyAnswered":
            answers.append((payload.survey_id, cid, payload.answered_at, payload.nps, payload.csat))
        elif kind == "TouchpointSent":
            r = row(cid)
            r[0] = later(r[0], payload.sent_at)
        elif kind == "TierChanged" and tier_went_down(payload.from_tier, payload.to_tier, tier_order):
            r = row(cid)
            r[1] = later(r[1], event.occurred_at)
        elif kind in ("RedemptionFailed", "RedemptionCancelled"):
            row(cid)[2] += 1
    if answers:
        await conn.execute(_ANSWERS, *map(list, zip(*answers)))
    if signals:
        ids = sorted(signals)  # one lock order for every batch: no deadlock between batches
        await conn.execute(_SIGNALS, ids, [signals[c][0] for c in ids], [signals[c][1] for c in ids],
                           [signals[c][2] for c in ids])
