"""Prometheus metrics of the churn service: aggregates only (a customer id is never a label).
Consumer lag is shared/consumer.py's kafka_consumer_lag_messages."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS_APPLIED = Counter("churn_events_applied_total", "Input events folded into customer state (after the commit)")
ALERTS = Counter("churn_alerts_total", "Events emitted on churn.alerts, by kind", ["kind"])
ALERTS_SILENCED = Counter("churn_alerts_silenced_total",
                          "Transitions caused by old or imported events: state changed, no alert (not news)")
CUSTOMERS_BY_SEGMENT = Gauge("churn_customers", "Customers per RFM segment ('none': not scored yet)", ["segment"])
SEGMENT_VALUE = Gauge("churn_segment_ltv", "Sum of the customers' LTV per RFM segment", ["segment"])
CUSTOMERS_BY_RISK = Gauge("churn_customers_by_risk_state", "Customers per risk state", ["state"])
FIT_SECONDS = Histogram("churn_model_fit_seconds", "Time to fit the models on the whole base",
                        buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
FIT_LOG_LIKELIHOOD = Gauge("churn_model_fit_log_likelihood", "Log-likelihood of the latest fit", ["model"])
EVALUATION_SECONDS = Histogram("churn_evaluation_seconds", "Time to evaluate the whole base",
                               buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
LAST_EVALUATION = Gauge("churn_evaluation_last_finished_timestamp_seconds",
                        "When the last evaluation of the whole base finished (Unix time)")
