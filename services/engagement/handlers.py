"""What engagement reads: one subscription per topic through the shared pipeline, and one
dispatch table naming what each event type does. Decoders and facts only; the use cases
are in service.py."""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from services.engagement import domain as d
from services.engagement import service
from services.engagement.service import Engagement
from shared.events.churn import CustomerAtRisk, CustomerLost, CustomerRecovered
from shared.events.points import PointsEarned, PointsWillExpire, TierChanged
from shared.events.purchases import PurchaseClaimed, PurchaseRecorded, ReturnRecorded
from shared.events.wire import fast_or
from shared.events.rewards import RedemptionCancelled, RedemptionFulfilled
from shared.pipeline import Batch, Subscription, pydantic_decoder
from shared.topics import (
    CHURN_ALERTS,
    ENGAGEMENT_DLQ,
    POINTS_EVENTS,
    PURCHASES_RECORDED,
    REWARDS_EVENTS,
)

Publish = Callable[..., None]


def _purchase_facts(e: PurchaseRecorded | PurchaseClaimed) -> d.Facts:
    p = e.payload
    top = max(p.lines, key=lambda line: line.quantity * line.unit_price - line.discount) if p.lines else None
    return d.Facts(event_id=e.event_id, event_type="PurchaseRecorded", customer_id=e.customer_id,
                   occurred_at=p.occurred_at, history=p.history, purchase_id=p.purchase_id, source=p.source,
                   store_id=p.store_id, category=top.category if top else None, basket=p.total,
                   context={"purchase_id": p.purchase_id, "store_id": p.store_id,
                            "category": top.category if top else None, "total": str(p.total),
                            "currency": p.currency})


async def on_purchase(conn, engine: Engagement, e: PurchaseRecorded | PurchaseClaimed, publish: Publish) -> None:
    if e.customer_id is None:
        return  # an anonymous sale: nobody to talk to (until it is claimed)
    await service.sale_recorded(conn, engine, _purchase_facts(e), total=e.payload.total, currency=e.payload.currency,
                                publish=publish)


async def on_return(conn, engine: Engagement, e: ReturnRecorded, publish: Publish) -> None:
    if e.customer_id is not None:
        await service.return_recorded(conn, engine, customer_id=e.customer_id,
                                      original_purchase_id=e.payload.original_purchase_id, source=e.payload.source,
                                      publish=publish)


async def on_points_earned(conn, engine: Engagement, e: PointsEarned, publish: Publish) -> None:
    p = e.payload
    # The sale, when it was read first (usually): its store and category for the trigger's
    # conditions. The message reads them at send time (dispatch.py), whichever came first.
    sold = await service.repo.sale(conn, purchase_id=p.purchase_id, customer_id=e.customer_id)
    await service.on_facts(conn, engine, d.Facts(
        event_id=e.event_id, event_type=e.type, customer_id=e.customer_id, occurred_at=e.occurred_at,
        history=p.history, purchase_id=p.purchase_id, source=p.source, tier=p.balance.tier,
        store_id=sold["store_id"] if sold else None, category=sold["category"] if sold else None,
        context={"points": p.amount_points, "pending": p.pending, "available_points": p.balance.available_points,
                 "purchase_id": p.purchase_id}), publish)


async def on_points_will_expire(conn, engine: Engagement, e: PointsWillExpire, publish: Publish) -> None:
    p = e.payload
    await service.on_facts(conn, engine, d.Facts(
        event_id=e.event_id, event_type=e.type, customer_id=e.customer_id, occurred_at=e.occurred_at,
        history=p.history, tier=p.balance.tier,
        context={"points": p.amount_points, "expires_on": p.expires_on.isoformat()}), publish)


async def on_tier_changed(conn, engine: Engagement, e: TierChanged, publish: Publish) -> None:
    p = e.payload
    await service.repo.set_tier(conn, customer_id=e.customer_id, tier=p.to_tier)
    await service.on_facts(conn, engine, d.Facts(
        event_id=e.event_id, event_type=e.type, customer_id=e.customer_id, occurred_at=e.occurred_at,
        history=p.history, tier=p.to_tier, from_tier=p.from_tier,
        context={"from_tier": p.from_tier, "to_tier": p.to_tier}), publish)


async def on_alert(conn, engine: Engagement, e: CustomerAtRisk | CustomerLost | CustomerRecovered,
                   publish: Publish) -> None:
    p = e.payload
    await service.on_facts(conn, engine, d.Facts(
        event_id=e.event_id, event_type=e.type, customer_id=e.customer_id, occurred_at=e.occurred_at,
        priority=p.priority, quadrant=p.quadrant, ltv=p.ltv,
        context={"segment": p.segment, "quadrant": p.quadrant}), publish)


async def on_redemption(conn, engine: Engagement, e: RedemptionFulfilled | RedemptionCancelled, publish: Publish) -> None:
    # No shipped journey starts here yet; the customer is known from now on.
    if e.customer_id is not None:
        await service.repo.ensure_customer(conn, e.customer_id)


# What each event type does: the one place to look.
DISPATCH: dict[str, Callable[[Any, Engagement, Any, Publish], Awaitable[None]]] = {
    "PurchaseRecorded": on_purchase,
    "PurchaseClaimed": on_purchase,
    "ReturnRecorded": on_return,
    "PointsEarned": on_points_earned,
    "PointsWillExpire": on_points_will_expire,
    "TierChanged": on_tier_changed,
    "CustomerAtRisk": on_alert,
    "CustomerLost": on_alert,
    "CustomerRecovered": on_alert,
    "RedemptionFulfilled": on_redemption,
    "RedemptionCancelled": on_redemption,
}

_PURCHASES = (PurchaseRecorded, ReturnRecorded, PurchaseClaimed)
_POINTS = (PointsEarned, PointsWillExpire, TierChanged)
_REWARDS = (RedemptionFulfilled, RedemptionCancelled)
_ALERTS = (CustomerAtRisk, CustomerLost, CustomerRecovered)

TOPICS = ((PURCHASES_RECORDED, _PURCHASES, "engagement.purchases"), (POINTS_EVENTS, _POINTS, "engagement.points"),
          (REWARDS_EVENTS, _REWARDS, "engagement.rewards"), (CHURN_ALERTS, _ALERTS, "engagement.alerts"))


def _union(models: tuple) -> Any:
    return Annotated[Union[models], Field(discriminator="type")]  # noqa: UP007 - a union built from a tuple


def subscriptions(engine: Engagement, *, refresh: Callable) -> list[Subscription]:
    """Every other event type on these topics is skipped unread (forward compatible)."""
    s = engine.settings

    async def apply(batch: Batch) -> None:
        for item in batch.items:
            await DISPATCH[item.event.type](batch.conn, engine, item.event, batch.publish)

    out = []
    for topic, models, consumer in TOPICS:
        union = _union(models)
        known = frozenset(m.model_fields["type"].default for m in models)
        assert known <= DISPATCH.keys()
        decode = pydantic_decoder(TypeAdapter(union), known_types=known)
        out.append(Subscription(topic=s.topic(topic), consumer=consumer,
                                decode=fast_or(decode) if topic == PURCHASES_RECORDED else decode, apply=apply,
                                dead_letter_topic=s.topic(ENGAGEMENT_DLQ), door=f"{topic} consumer", lane="main",
                                prepare=refresh, schema=union, description=f"{topic}, read by engagement's journeys"))
    return out
