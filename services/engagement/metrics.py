"""The engagement service's Prometheus metrics: aggregates only, never a customer id."""

from prometheus_client import Counter, Gauge, Histogram

JOURNEYS = Counter("engagement_journeys_total", "Journey instances, by what happened to them",
                   ["journey", "outcome"])
DECISIONS = Counter("engagement_decisions_total", "Touchpoint decisions at send time (sent, deferred, skipped, "
                    "failed, retried) and why", ["journey", "decision", "reason"])
DELIVERIES = Counter("engagement_deliveries_total", "Channel calls, by outcome", ["channel", "outcome"])
DISPATCH_LAG = Histogram("engagement_dispatch_lag_seconds", "From a touchpoint's due time to its send",
                         buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400))
DISPATCH_LAG_NOW = Gauge("engagement_dispatch_lag_now_seconds",
                         "Age of the oldest touchpoint due and not yet handled (0 when none)")
SCHEDULED = Gauge("engagement_touchpoints_scheduled", "Touchpoints waiting for their time")
CONSENT_CHANGES = Counter("engagement_consent_changes_total", "Consent changes", ["channel", "change", "source"])
ERASURES = Counter("engagement_erasures_total", "Customers erased")
SURVEY_ANSWERS = Counter("engagement_survey_answers_total", "Survey answers", ["kind"])
COMPLAINTS = Counter("engagement_complaints_total", "Complaints and detractor answers opened as follow-ups",
                     ["source"])
FOLLOWUPS_OPEN = Gauge("engagement_followups_open", "Follow-ups not resolved yet")
FOLLOWUPS_OVERDUE = Gauge("engagement_followups_overdue", "Follow-ups open past their deadline")
FOLLOWUPS_RESOLVED = Counter("engagement_followups_resolved_total", "Follow-ups resolved", ["within_deadline"])
# Satisfaction per store, category and month (aggregates; refreshed on a schedule)
NPS = Gauge("engagement_nps", "Net promoter score (-100..100) of the answers", ["store", "category", "month"])
CSAT = Gauge("engagement_csat_average", "Average CSAT (1-5) of the answers", ["store", "category", "month"])
RESPONSE_RATE = Gauge("engagement_survey_response_rate", "Surveys answered / surveys sent",
                      ["store", "category", "month"])
# The relationship gap (sales of the last 30 days)
FIRST_TOUCH_SECONDS = Gauge("engagement_sale_first_touch_median_seconds",
                            "Median time from a sale to its first touchpoint")
FOLLOWED_UP_SHARE = Gauge("engagement_sales_followed_up_share", "Share of sales with a touchpoint within the window",
                          ["window"])
FOLLOWUPS_IN_DEADLINE_SHARE = Gauge("engagement_followups_resolved_in_deadline_share",
                                    "Share of resolved follow-ups resolved within their deadline")
