"""The live summary of `make run`: every line fits an 80-column terminal, a pipe or file gets
plain lines (no carriage returns, no escape sequences), and a service's row appears as soon
as its /metrics has one of the counters looked for (churn and engagement included)."""

import io
from collections import Counter

from deploy.local.summary import WIDTH, Display, Snapshot, counters_from, render

METRICS = """\
# HELP churn_alerts_total Alerts emitted
# TYPE churn_alerts_total counter
churn_alerts_total{type="CustomerAtRisk"} 7.0
churn_alerts_total{type="CustomerLost"} 2.0
# HELP rewards_redemptions_total Redemptions
# TYPE rewards_redemptions_total counter
rewards_redemptions_total{outcome="fulfilled",reason=""} 12.0
rewards_redemptions_total{outcome="failed",reason="insufficient_points"} 3.0
"""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def busy_snapshot() -> Snapshot:
    big = 9_876_543_210
    seen = Counter({"purchases.recorded:PurchaseRecorded": big, "purchases.recorded:ReturnRecorded": big,
                    "purchases.dlq": big, "points.events:PointsEarned": big, "rewards.events:RedemptionFulfilled": big})
    services = {name: {f"counter {i}": big for i in range(6)} for name in ("purchases", "ledger", "engagement")}
    return Snapshot(elapsed_s=123_456, sent=Counter(kafka=big), seen=seen,
                    redemptions=Counter(fulfilled=big, failed=big, requested=big, refused=big),
                    services=services, recorded_per_s=123_456.7)


def test_every_line_fits_an_80_column_terminal_even_with_huge_numbers():
    lines = render(busy_snapshot())
    assert len(lines) == 6
    assert all(len(line) <= WIDTH for line in lines), [len(line) for line in lines]


def test_a_pipe_gets_plain_lines_without_carriage_returns_or_escapes():
    out = io.StringIO()
    display = Display(out, plain_every_s=0)
    display.show(render(busy_snapshot()))
    display.show(render(busy_snapshot()))
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.count("\n") == 12


def test_a_terminal_gets_the_block_redrawn_in_place():
    out = Terminal()
    display = Display(out)
    display.show(["a", "b"])
    display.show(["c", "d"])
    assert out.getvalue() == "\x1b[2Ka\n\x1b[2Kb\n\x1b[2F\x1b[2Kc\n\x1b[2Kd\n"


def test_churn_alerts_and_redemption_outcomes_are_read_from_metrics():
    from deploy.local.summary import SERVICE_COUNTERS

    assert counters_from(METRICS, SERVICE_COUNTERS["churn"]) == {"alerts": 9.0}
    assert counters_from(METRICS, SERVICE_COUNTERS["rewards"]) == {"fulfilled": 12.0, "failed": 3.0}
    assert counters_from(METRICS, SERVICE_COUNTERS["engagement"]) == {}  # not there: no row
