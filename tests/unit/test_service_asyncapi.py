"""Each service's AsyncAPI document names every topic it reads once, with the schemas of every
event type on it, and every topic it publishes with every type it emits (a real DeadLetter
schema for its dead-letter topic). Nothing connects: the apps are only built."""

from faststream.specification import AsyncAPI

from services.ledger.main import create_app as create_ledger
from services.ledger.settings import LedgerSettings
from services.purchases.main import create_app as create_purchases
from services.purchases.settings import PurchasesSettings
from services.rewards.main import create_app as create_rewards
from services.rewards.settings import RewardsSettings


def document(app) -> tuple[dict, set[str]]:
    doc = AsyncAPI(app.state.runtime.broker, title="t").to_specification().to_jsonable()
    return doc["channels"], set(doc["components"]["schemas"])


def addresses(channels: dict) -> list[str]:
    return sorted(channel["address"] for channel in channels.values())


def test_the_ledger_documents_each_stream_it_reads_once_with_every_type():
    channels, schemas = document(create_ledger(LedgerSettings()))
    assert set(channels) >= {"purchases.recorded#consumer", "rewards.events#consumer", "ledger.adjustments#consumer",
                             "points.events", "points.dlq", "ledger.adjustments", "ledger.programs"}
    assert addresses(channels).count("purchases.recorded") == 1  # one subscription, however many consumers
    assert {"PurchaseRecorded", "ReturnRecorded", "PurchaseClaimed", "RedemptionRequested", "RedemptionFulfilled",
            "RedemptionFailed", "RedemptionCancelled", "RedemptionShipped", "RedemptionDelivered",
            "AdjustmentRecorded", "DeadLetter", "PointsEarned", "PointsHeld"} <= schemas


def test_rewards_documents_points_events_and_all_six_saga_types():
    app = create_rewards(RewardsSettings(jwt_secret="s" * 40))
    channels, schemas = document(app)
    assert set(channels) >= {"points.events#consumer", "rewards.events", "rewards.dlq"}
    assert {"PointsHeld", "PointsHoldRejected", "PointsRedeemed", "PointsReleased", "PointsEarned",
            "RedemptionRequested", "RedemptionFulfilled", "RedemptionFailed", "RedemptionCancelled",
            "RedemptionShipped", "RedemptionDelivered", "DeadLetter"} <= schemas


def test_purchases_documents_the_raw_door_and_what_it_records():
    channels, schemas = document(create_purchases(PurchasesSettings()))
    assert set(channels) >= {"purchases.raw#consumer", "purchases.recorded", "purchases.dlq"}
    assert {"PurchaseIn", "PurchaseRecorded", "ReturnRecorded", "PurchaseClaimed", "DeadLetter"} <= schemas
