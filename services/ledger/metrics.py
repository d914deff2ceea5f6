"""Prometheus metrics of the ledger service."""

from prometheus_client import Counter, Gauge, Histogram

POINTS_ISSUED = Counter("ledger_points_issued_total", "Points credited to customers (earned and adjusted up)")
POINTS_REDEEMED = Counter("ledger_points_redeemed_total", "Points redeemed (holds posted), net of refunds")
POINTS_EXPIRED = Counter("ledger_points_expired_total", "Points expired")
POINTS_REVERSED = Counter("ledger_points_reversed_total", "Points taken back by returns (including debt)")
EVENTS = Counter("ledger_events_total", "Input events processed, per type and outcome", ["type", "outcome"])
DEAD_LETTERS = Counter("ledger_dead_letters_total", "Inputs sent to points.dlq, per reason", ["reason"])
POSTINGS = Counter("ledger_postings_total", "Transfers written, per code (rate() gives postings per second)", ["code"])
HTTP_REFUSALS = Counter("ledger_http_refusals_total", "HTTP requests refused before reaching a route, per reason",
                        ["reason"])
HOLDS = Counter("ledger_holds_total", "Redemption hold decisions, per outcome", ["outcome"])
LATE_FULFILMENTS = Counter(
    "ledger_late_fulfilments_total",
    "Fulfilments that arrived after their hold was voided, redeemed all the same: covered by the available "
    "points, or with a shortfall that became debt", ["outcome"],
)

LIABILITY = Gauge("ledger_liability_points", "Outstanding points owed to customers, per state", ["state"])
BREAKAGE = Gauge("ledger_breakage_ratio", "Expired / (expired + redeemed) points, ledger-wide")
INVARIANT = Gauge(
    "ledger_invariant_imbalance_points",
    "Sum of debits minus sum of credits over all accounts; anything but 0 is a bug", ["phase"],
)

BATCH_SIZE = Histogram(
    "ledger_batch_size", "Records per consumed batch", ["stream"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
BATCH_SECONDS = Histogram(
    "ledger_batch_processing_seconds", "Time to apply one batch (one transaction)", ["stream"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
EVENT_LATENCY = Histogram(
    "ledger_event_latency_seconds", "From the input's recorded_at to its effect committed", ["stream"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SCHEDULER_SECONDS = Histogram("ledger_scheduler_run_seconds", "Duration of one scheduler run")
