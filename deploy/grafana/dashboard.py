"""The Grafana dashboard as code: `python deploy/grafana/dashboard.py` rewrites
dashboards/loyalty.json. Edit the panels here, not the JSON (tests/unit/test_compose.py
fails when the two differ), so that every query stays reviewable in one place."""

import json
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "loyalty-prometheus"}  # provisioning/datasources
OUTPUT = Path(__file__).parent / "dashboards" / "loyalty.json"
DEAD_LETTERS = 'outbox_published_total{topic=~".*[.]dlq"}'


class Layout:
    """Places rows and panels on Grafana's 24-column grid, top to bottom."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._y = 0
        self._row_height = 0

    def row(self, title: str) -> None:
        self._next_line()
        self.panels.append({"type": "row", "title": title, "id": len(self.panels) + 1, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}, "panels": []})
        self._y += 1

    def line(self) -> None:
        self._next_line()

    def panel(self, title: str, kind: str, targets: list[tuple[str, str]], *, x: int, w: int, h: int = 8,
              unit: str | None = None, description: str | None = None,
              thresholds: list[dict[str, Any]] | None = None) -> None:
        panel: dict[str, Any] = {
            "type": kind, "title": title, "id": len(self.panels) + 1, "datasource": DATASOURCE,
            "gridPos": {"h": h, "w": w, "x": x, "y": self._y},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                        for i, (expr, legend) in enumerate(targets)],
            "fieldConfig": {"defaults": {}, "overrides": []},
        }
        if description:
            panel["description"] = description
        if unit:
            panel["fieldConfig"]["defaults"]["unit"] = unit
        if thresholds:
            panel["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": thresholds}
        if kind == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "colorMode": "background", "graphMode": "none", "textMode": "auto"}
        else:
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                "tooltip": {"mode": "multi", "sort": "desc"}}
        self.panels.append(panel)
        self._row_height = max(self._row_height, h)

    def _next_line(self) -> None:
        self._y += self._row_height
        self._row_height = 0


def p95(metric: str, by: str) -> str:
    return f"histogram_quantile(0.95, sum by (le, {by}) (rate({metric}_bucket[5m])))"


def build() -> dict[str, Any]:
    g = Layout()
    g.row("Platform")
    g.panel("Services up", "stat", [('up{tier="app"}', "{{job}}")], x=0, w=8, h=6,
            description="1 = Prometheus scrapes the service's /metrics.",
            thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
    g.panel("Ledger invariant (debits - credits)", "stat", [("ledger_invariant_imbalance_points", "{{phase}}")],
            x=8, w=8, h=6, description="Double entry: always exactly 0. Anything else is a bug.",
            thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 0}, {"color": "red", "value": 1}])
    g.panel("Dead letters (last 10 min)", "stat", [(f"sum by (topic) (increase({DEAD_LETTERS}[10m]))", "{{topic}}")],
            x=16, w=8, h=6, description="Inputs refused and parked in a .dlq topic with their reason.",
            thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 1}])

    g.row("Purchases")
    g.panel("Purchases per second", "timeseries", [
        ("sum by (door) (rate(purchases_received_total[5m]))", "received {{door}}"),
        ("sum by (door, type) (rate(purchases_recorded_total[5m]))", "recorded {{door}} {{type}}"),
        ("sum by (door) (rate(purchases_duplicates_total[5m]))", "duplicate {{door}}"),
    ], x=0, w=12, unit="ops")
    g.panel("Rejected per second by reason", "timeseries", [
        ("sum by (door, reason) (rate(purchases_rejected_total[5m]))", "{{door}}: {{reason}}"),
    ], x=12, w=12, unit="ops")
    g.line()
    g.panel("Batch processing time (p50 / p95)", "timeseries", [
        ("histogram_quantile(0.5, sum by (le, door) (rate(purchases_batch_processing_seconds_bucket[5m])))",
         "p50 {{door}}"),
        (p95("purchases_batch_processing_seconds", "door"), "p95 {{door}}"),
    ], x=0, w=12, unit="s")
    g.panel("Average batch size", "timeseries", [
        ("sum by (door) (rate(purchases_batch_size_sum[5m])) / sum by (door) (rate(purchases_batch_size_count[5m]))",
         "{{door}}"),
    ], x=12, w=12, unit="short")

    g.row("Ledger")
    g.panel("Points per second", "timeseries", [
        ("rate(ledger_points_issued_total[5m])", "issued"),
        ("rate(ledger_points_redeemed_total[5m])", "redeemed"),
        ("rate(ledger_points_expired_total[5m])", "expired"),
        ("rate(ledger_points_reversed_total[5m])", "reversed by returns"),
    ], x=0, w=8, unit="short")
    g.panel("Outstanding points (liability)", "timeseries", [
        ("sum by (state) (ledger_liability_points)", "{{state}}"),
    ], x=8, w=8, unit="short")
    g.panel("Events processed per second", "timeseries", [
        ("sum by (type, outcome) (rate(ledger_events_total[5m]))", "{{type}} {{outcome}}"),
    ], x=16, w=8, unit="ops")
    g.line()
    g.panel("Batch processing time p95", "timeseries", [
        (p95("ledger_batch_processing_seconds", "stream"), "p95 {{stream}}"),
    ], x=0, w=12, unit="s")
    g.panel("Input to effect latency p95", "timeseries", [
        (p95("ledger_event_latency_seconds", "stream"), "p95 {{stream}}"),
    ], x=12, w=12, unit="s")

    g.row("Rewards")
    g.panel("Redemptions per second by outcome", "timeseries", [
        ("sum by (outcome) (rate(rewards_redemptions_total[5m]))", "{{outcome}}"),
    ], x=0, w=12, unit="ops")
    g.panel("Redemption latency p95 (request to outcome)", "timeseries", [
        (p95("rewards_redemption_latency_seconds", "outcome"), "p95 {{outcome}}"),
    ], x=12, w=12, unit="s")

    g.row("Relationship")
    rolling = 'max by (indicator) (churn_relationship_indicator{window="rolling", indicator=~"%s"})'
    g.panel("Retention, churn, loyalty (rolling window)", "stat", [
        (rolling % "retention_rate|churn_rate|loyalty_index|csat", "{{indicator}}")], x=0, w=8, h=6,
        unit="percentunit", description="The churn service's four key indicators over the rolling window "
        "(CHURN_ROLLING_WINDOW_MONTHS); formulas in services/churn/REPORTS.md. Also on GET /dashboard.")
    g.panel("NPS (rolling window)", "stat", [(rolling % "nps", "NPS")], x=8, w=4, h=6,
            description="% promoters (9-10) minus % detractors (0-6) of the survey answers, -100..100.",
            thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 0},
                        {"color": "green", "value": 30}])
    g.panel("Customers at risk / lost", "stat", [
        ('max by (state) (churn_customers_by_risk_state{state=~"at_risk|lost"})', "{{state}}")], x=12, w=6, h=6)
    g.panel("Churn alerts per hour", "stat", [
        ("sum by (kind) (rate(churn_alerts_total[1h])) * 3600", "{{kind}}")],
        x=18, w=6, h=6, description="CustomerAtRisk, CustomerRecovered, CustomerLost and SegmentChanged emitted.")
    g.line()
    g.panel("Indicators this month", "timeseries", [
        ('max by (indicator) (churn_relationship_indicator{window="month", indicator=~"retention_rate|churn_rate|'
         'loyalty_index|csat"})', "{{indicator}}")], x=0, w=8, unit="percentunit",
        description="The calendar month so far (resets on the 1st).")
    g.panel("Customers by RFM segment", "timeseries", [
        ("max by (segment) (churn_customers)", "{{segment}}")], x=8, w=8, unit="short")
    g.panel("Customers by loyalty-matrix quadrant", "timeseries", [
        ("max by (quadrant) (churn_relationship_quadrant_customers)", "{{quadrant}}")], x=16, w=8, unit="short")

    g.row("Engagement: the relationship gap")
    g.panel("Sales followed up", "timeseries", [
        ('engagement_sales_followed_up_share{window="24h"}', "within 24 h"),
        ('engagement_sales_followed_up_share{window="7d"}', "within 7 days"),
    ], x=0, w=6, unit="percentunit",
        description="Share of the last 30 days' sales that got a touchpoint within the window")
    g.panel("Median time from a sale to its first touchpoint", "stat", [
        ("engagement_sale_first_touch_median_seconds", "median"),
    ], x=6, w=6, unit="s")
    g.panel("Touchpoint decisions per second", "timeseries", [
        ("sum by (decision, reason) (rate(engagement_decisions_total[5m]))", "{{decision}} {{reason}}"),
    ], x=12, w=6, unit="ops")
    g.panel("Follow-ups and dispatch lag", "timeseries", [
        ("engagement_followups_open", "open follow-ups"),
        ("engagement_followups_overdue", "past their deadline"),
        ("engagement_dispatch_lag_now_seconds / 60", "dispatch lag (min)"),
    ], x=18, w=6, unit="short")
    g.line()
    g.panel("NPS by store", "timeseries", [
        ("avg by (store) (engagement_nps)", "{{store}}"),
    ], x=0, w=8, unit="short")
    g.panel("CSAT by category", "timeseries", [
        ("avg by (category) (engagement_csat_average)", "{{category}}"),
    ], x=8, w=8, unit="short")
    g.panel("Survey response rate and follow-ups resolved in time", "timeseries", [
        ("avg by (store) (engagement_survey_response_rate)", "responses {{store}}"),
        ("engagement_followups_resolved_in_deadline_share", "follow-ups resolved within deadline"),
    ], x=16, w=8, unit="percentunit")

    g.row("Kafka and outbox")
    g.panel("Consumer lag (messages)", "timeseries", [
        ("sum by (job, topic) (kafka_consumer_lag_messages)", "{{job}} {{topic}}"),
    ], x=0, w=8, unit="short")
    g.panel("Events published per second", "timeseries", [
        ("sum by (topic) (rate(outbox_published_total[5m]))", "{{topic}}"),
    ], x=8, w=8, unit="ops")
    g.panel("Outbox backlog and relay errors", "timeseries", [
        ("max by (job) (outbox_pending_rows)", "pending {{job}}"),
        ("sum by (job) (increase(outbox_relay_errors_total[5m]))", "relay errors {{job}} (5m)"),
    ], x=16, w=8, unit="short")

    return {
        "uid": "loyalty-overview", "title": "Loyalty platform", "tags": ["loyalty"], "timezone": "utc",
        "schemaVersion": 39, "version": 1, "editable": False, "graphTooltip": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "annotations": {"list": []}, "templating": {"list": []},
        "panels": g.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
