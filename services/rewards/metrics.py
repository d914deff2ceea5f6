"""Prometheus metrics of the rewards service."""

from prometheus_client import Counter, Gauge, Histogram

REDEMPTIONS = Counter(
    "rewards_redemptions_total",
    "Redemptions by outcome (requested, fulfilled, failed, cancelled) and reason for failures",
    ["outcome", "reason"],
)
REDEMPTION_LATENCY = Histogram(
    "rewards_redemption_latency_seconds",
    "End to end: from the accepted request to the committed outcome (fulfilled or failed)",
    ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120, 600),
)
SAGA_WAIT = Counter(
    "rewards_http_saga_wait_total",
    "POST /v1/redemptions answers: with the outcome (answered) or 202 after the wait (accepted)",
    ["result"],
)
RECOVERY_ACTIONS = Counter(
    "rewards_recovery_actions_total",
    "Unanswered redemptions requested again (resent) or given up (failed, hold voided)",
    ["action"],
)
STOCK_REMAINING = Gauge("rewards_stock_remaining", "Units left of a reward with limited stock", ["reward_id"])
COUPON_POOL_AVAILABLE = Gauge("rewards_coupon_pool_available", "Unassigned coupon codes of a reward", ["reward_id"])
AUTH_REFUSALS = Counter(
    "rewards_http_auth_refusals_total",
    "Requests refused with 401: missing_token, token_<why> (expired, signature_invalid, algorithm_not_accepted, "
    "...), missing_admin_key, invalid_admin_key",
    ["reason"],
)
SHIPMENTS = Counter(
    "rewards_shipments_total", "Physical rewards shipped or delivered (a repeated call is not counted)", ["event"]
)
AWAITING_SHIPMENT = Gauge(
    "rewards_awaiting_shipment", "Fulfilled physical redemptions not shipped yet (the fulfilment queue)"
)
AWAITING_SHIPMENT_OLDEST = Gauge(
    "rewards_awaiting_shipment_oldest_seconds",
    "How long the oldest redemption in the fulfilment queue has waited since its fulfilment (0 when empty)",
)
POINTS_EVENTS_DEAD_LETTERED = Counter(
    "rewards_points_events_dead_lettered_total", "points.events records sent to rewards.dlq", ["reason"]
)


def record_outcome(outcome: str, reason: str | None = None) -> None:
    REDEMPTIONS.labels(outcome, reason or "").inc()


def set_stock(reward_id: str, *, kind: str, stock_remaining: int | None, coupons_available: int) -> None:
    if stock_remaining is not None:
        STOCK_REMAINING.labels(reward_id).set(stock_remaining)
    if kind == "coupon":
        COUPON_POOL_AVAILABLE.labels(reward_id).set(coupons_available)
