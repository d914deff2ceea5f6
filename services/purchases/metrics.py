"""Prometheus metrics of the purchases service."""

from prometheus_client import Counter, Histogram

RECEIVED = Counter("purchases_received_total", "Inputs received, per door", ["door"])
RECORDED = Counter("purchases_recorded_total", "Purchases recorded, per door and type", ["door", "type"])
DUPLICATES = Counter("purchases_duplicates_total", "Identical resends recognised and ignored", ["door"])
REJECTED = Counter("purchases_rejected_total", "Inputs refused, per door and reason", ["door", "reason"])
PARKED = Counter("purchases_returns_parked_total", "Returns that arrived before their sale and wait for it", ["door"])
CLAIMS = Counter("purchases_claims_total", "Claims of anonymous purchases, per outcome", ["outcome"])
BATCH_SIZE = Histogram(
    "purchases_batch_size", "Inputs per processed batch", ["door"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
PROCESSING_SECONDS = Histogram(
    "purchases_batch_processing_seconds", "Time to validate, record and enqueue one batch", ["door"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
WEBHOOK_TESTS = Counter("purchases_webhook_test_notifications_total",
                        "E-shop test notifications acknowledged and not recorded", ["door"])
