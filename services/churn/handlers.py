"""The churn service's subscriptions: four topics through the shared pipeline, each with a
dispatch table from event type to what the event adds to the batch's facts. Events of a type
not in a table are skipped (forward compatible: the engagement service grows)."""

from collections.abc import Callable
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from services.churn import domain, service, signals
from services.churn.reports_settings import ReportsSettings
from services.churn.service import ChurnContext, Facts
from shared.events.engagement import ENGAGEMENT_EVENT_TYPES
from shared.events.points import POINTS_EVENT_TYPES
from shared.events.purchases import PurchaseClaimed, PurchaseRecorded, ReturnRecorded
from shared.events.wire import fast_or
from shared.events.rewards import REWARDS_EVENT_TYPES, SHIPMENT_EVENT_TYPES
from shared.pipeline import Batch, Subscription, pydantic_decoder
from shared.topics import (
    CHURN_DLQ,
    ENGAGEMENT_EVENTS,
    POINTS_EVENTS,
    PURCHASES_RECORDED,
    REWARDS_EVENTS,
)

Fold = Callable[[Facts, Any], None]

PURCHASES: dict[str, Fold] = {
    "PurchaseRecorded": Facts.sale,
    "PurchaseClaimed": Facts.sale,
    "ReturnRecorded": Facts.return_,
}
POINTS: dict[str, Fold] = {t.model_fields["type"].default: Facts.balance for t in POINTS_EVENT_TYPES}
REWARDS: dict[str, Fold] = {
    "RedemptionFulfilled": lambda facts, e: facts.redemption(e, +1),
    "RedemptionCancelled": lambda facts, e: facts.redemption(e, -1 if e.payload.was_fulfilled else 0),
}
ENGAGEMENT: dict[str, Fold] = {
    "SurveyAnswered": Facts.survey,
    "ComplaintOpened": lambda facts, e: facts.complaint(e, +1),
    "ComplaintResolved": lambda facts, e: facts.complaint(e, -1),
    "TouchpointSent": Facts.noted,
}


def _union(types: tuple[type, ...]) -> Any:
    return Annotated[Union[types], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007


def applier(ctx: ChurnContext, table: dict[str, Fold],
            tier_order: tuple[str, ...] = ()) -> Callable[[Batch[Any]], Any]:
    async def apply(batch: Batch[Any]) -> None:
        facts = Facts(ctx.settings, domain.news_window_start(batch.now, ctx.settings.alert_horizon_days))
        for item in batch.items:
            fold = table.get(item.event.type)
            if fold is not None and item.event.customer_id:  # an anonymous sale is nobody's yet
                fold(facts, item.event)
        await service.apply_facts(ctx, batch, facts)
        await signals.record_signals(batch.conn, batch.events, tier_order=tier_order)  # the reports' (issue 13)
    return apply


def subscriptions(ctx: ChurnContext) -> list[Subscription[Any]]:
    s = ctx.settings
    dlq = s.topic(CHURN_DLQ)
    tier_order = tuple(ReportsSettings().tier_order)
    specs = (
        (PURCHASES_RECORDED, service.PURCHASES_CONSUMER, (PurchaseRecorded, ReturnRecorded, PurchaseClaimed),
         PURCHASES, "sales, returns and claimed sales: purchase days, spend, rhythm"),
        (POINTS_EVENTS, service.POINTS_CONSUMER, POINTS_EVENT_TYPES, POINTS, "balance and tier after each posting"),
        (REWARDS_EVENTS, service.REWARDS_CONSUMER, REWARDS_EVENT_TYPES + SHIPMENT_EVENT_TYPES, REWARDS,
         "fulfilled and cancelled redemptions (cost to serve)"),
        (ENGAGEMENT_EVENTS, service.ENGAGEMENT_CONSUMER, ENGAGEMENT_EVENT_TYPES, ENGAGEMENT,
         "survey answers and complaints; unknown types skipped"),
    )
    subs = []
    for topic, consumer, types, table, description in specs:
        known = frozenset(t.model_fields["type"].default for t in types)
        decode = pydantic_decoder(TypeAdapter(_union(types)), known_types=known)
        subs.append(Subscription(
            topic=s.topic(topic), consumer=consumer, decode=fast_or(decode) if topic == PURCHASES_RECORDED else decode,
            apply=applier(ctx, table, tier_order), dead_letter_topic=dlq, door=f"{topic} consumer", lane="main",
            schema=_union(types), description=f"read by {consumer}: {description}"))
    return subs

