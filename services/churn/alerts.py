"""What the churn service says on churn.alerts: the events of the risk transitions and segment
changes, built with ids derived from what they report (customer, episode, kind), so that the
same transition can never yield two different alerts (a replay or a retry yields the same id)."""

import json
from collections import Counter
from datetime import datetime
from typing import Any

from services.churn import domain, metrics, repository
from services.churn.scoring import Scores
from services.churn.settings import ChurnSettings
from shared.events import derived_event_id, envelope
from shared.events.churn import (
    AlertReason,
    CustomerAtRisk,
    CustomerAtRiskPayload,
    CustomerLost,
    CustomerLostPayload,
    CustomerRecovered,
    CustomerRecoveredPayload,
    SegmentChanged,
    SegmentChangedPayload,
)
from shared.outbox import OutboxMessage
from shared.topics import CHURN_ALERTS

PRODUCER = "churn"
_ALERTS = {
    "CustomerAtRisk": (CustomerAtRisk, CustomerAtRiskPayload),
    "CustomerRecovered": (CustomerRecovered, CustomerRecoveredPayload),
    "CustomerLost": (CustomerLost, CustomerLostPayload),
}


def alert_event_id(customer_id: str, episode: int, kind: str):
    return derived_event_id(PRODUCER, customer_id, str(episode), kind)


def risk_from_row(row: Any) -> domain.Risk:
    if row["state"] is None:
        return domain.Risk()
    reasons = row["reasons"]
    if isinstance(reasons, str):
        reasons = json.loads(reasons)
    return domain.Risk(row["state"], row["episode"], row["entered_at"], row["entry_last_purchase_at"], row["left_at"],
                       tuple(domain.Reason(**r) for r in reasons or ()))


class AlertSink:
    """Collects the events and alert rows of one transaction; counted after the commit."""

    def __init__(self, settings: ChurnSettings) -> None:
        self.settings = settings
        self.topic = settings.topic(CHURN_ALERTS)
        self.messages: list[OutboxMessage] = []
        self.rows: list[tuple] = []
        self.kinds: Counter[str] = Counter()
        self.silenced = 0

    def alert(self, customer_id: str, transition: domain.Transition, scores: Scores, row: Any, *,
              now: datetime, correlation_id: str) -> None:
        risk = transition.risk
        cls, payload_cls = _ALERTS[transition.kind]
        event_id = alert_event_id(customer_id, risk.episode, transition.kind)
        priority = domain.priority(scores.value_score)
        days_since = None
        if row["last_purchase_at"] is not None:
            days_since = int(domain.days_between(row["last_purchase_at"], now))
        payload = payload_cls(
            episode=risk.episode,
            reasons=[AlertReason(signal=r.signal, detail=r.detail, value=r.value, threshold=r.threshold)
                     for r in transition.reasons],
            segment=scores.segment, quadrant=row.get("quadrant"), ltv=scores.ltv, currency=row["currency"], priority=priority,
            p_alive=scores.p_alive, days_since_last_purchase=days_since, fit_version=scores.fit_version)
        event = envelope(cls, event_id=event_id, occurred_at=now, recorded_at=now, producer=PRODUCER,
                         correlation_id=correlation_id or str(event_id), customer_id=customer_id, payload=payload)
        self.messages.append(OutboxMessage.event(self.topic, event, key=customer_id))
        self.rows.append((event_id, customer_id, risk.episode, transition.kind, priority, scores.ltv, scores.segment,
                          repository.reasons_json(transition.reasons), now))
        self.kinds[transition.kind] += 1

    def silent(self, transition: domain.Transition) -> None:
        """A transition caused by an old event (a replay, an import): state only, no news."""
        self.silenced += 1

    def segment_changed(self, customer_id: str, scores: Scores, *, now: datetime, correlation_id: str) -> None:
        event_id = derived_event_id(PRODUCER, customer_id, "SegmentChanged", str(scores.segment_changes))
        payload = SegmentChangedPayload(
            from_segment=scores.previous_segment, to_segment=scores.segment, recency_score=scores.recency_score,
            frequency_score=scores.frequency_score, monetary_score=scores.monetary_score, as_of=now)
        event = envelope(SegmentChanged, event_id=event_id, occurred_at=now, recorded_at=now, producer=PRODUCER,
                         correlation_id=correlation_id or str(event_id), customer_id=customer_id, payload=payload)
        self.messages.append(OutboxMessage.event(self.topic, event, key=customer_id))
        self.kinds["SegmentChanged"] += 1

    async def record(self, conn: Any) -> None:
        await repository.write_alerts(conn, self.rows)

    def count_after_commit(self) -> None:
        for kind, n in self.kinds.items():
            metrics.ALERTS.labels(kind).inc(n)
        if self.silenced:
            metrics.ALERTS_SILENCED.inc(self.silenced)
