"""The live summary of `make run`: what the demo sent, what came back on the topics, and a
table of each running service's own counters read from its /metrics.

On a terminal the block is redrawn in place and every line fits 80 columns; written to a
pipe or a file it is printed as plain lines every few seconds (no carriage returns, no
escape sequences). A service appears in the table when its /metrics has one of the
counters listed in SERVICE_COUNTERS: the churn and engagement services show up by
themselves once they run.
"""

import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

WIDTH = 79  # an 80-column terminal wraps a line that fills its last column


@dataclass(frozen=True)
class Shown:
    label: str
    metric: str  # a sample name as /metrics writes it (counters end in _total)
    labels: tuple[tuple[str, str], ...] = ()  # only samples with these label values


# Per service, the counters worth a glance, in order. A service none of whose counters
# exists yet is left out of the table.
SERVICE_COUNTERS: dict[str, list[Shown]] = {
    "purchases": [Shown("recorded", "purchases_recorded_total"), Shown("duplicates", "purchases_duplicates_total"),
                  Shown("refused", "purchases_rejected_total")],
    "ledger": [Shown("pts issued", "ledger_points_issued_total"), Shown("redeemed", "ledger_points_redeemed_total"),
               Shown("reversed", "ledger_points_reversed_total")],
    "rewards": [Shown("fulfilled", "rewards_redemptions_total", (("outcome", "fulfilled"),)),
                Shown("failed", "rewards_redemptions_total", (("outcome", "failed"),))],
    "engagement": [Shown("messages sent", "engagement_deliveries_total", (("outcome", "delivered"),)),
                   Shown("failed", "engagement_deliveries_total", (("outcome", "failed"),))],
    "churn": [Shown("alerts", "churn_alerts_total")],
}


def counters_from(text: str, shown: list[Shown]) -> dict[str, float]:
    """The sums of the shown counters present in a /metrics text (absent ones left out)."""
    wanted = {s.metric for s in shown}
    found: dict[str, float] = {}
    samples = [smp for family in text_string_to_metric_families(text) for smp in family.samples
               if smp.name in wanted]
    for s in shown:
        matching = [smp.value for smp in samples
                    if smp.name == s.metric and all(smp.labels.get(k) == v for k, v in s.labels)]
        if matching:
            found[s.label] = sum(matching)
    return found


async def read_services(http: httpx.AsyncClient, urls: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each service's shown counters; a service that does not answer is left out."""
    table: dict[str, dict[str, float]] = {}
    for name, url in urls.items():
        try:
            response = await http.get(f"{url}/metrics", timeout=2)
        except httpx.HTTPError:
            continue
        if response.status_code == 200:
            found = counters_from(response.text, SERVICE_COUNTERS.get(name, []))
            if found:
                table[name] = found
    return table


def _n(value: float) -> str:
    return f"{int(value):,}"


@dataclass
class Snapshot:
    elapsed_s: float
    sent: Counter
    seen: Counter
    redemptions: Counter
    services: dict[str, dict[str, float]] = field(default_factory=dict)
    recorded_per_s: float = 0.0


def render(s: Snapshot) -> list[str]:
    """The summary as lines of at most WIDTH characters."""
    seen = s.seen
    recorded = sum(v for k, v in seen.items() if k.startswith("purchases.recorded"))
    points = sum(v for k, v in seen.items() if k.startswith("points.events"))
    rewards = sum(v for k, v in seen.items() if k.startswith("rewards.events"))
    r = s.redemptions
    lines = [
        f"{s.elapsed_s:5.0f}s  sent {_n(sum(s.sent.values()))}  recorded {_n(recorded)} "
        f"({s.recorded_per_s:,.0f}/s)  dead letters {_n(seen['purchases.dlq'])}",
        f"        sales {_n(seen['purchases.recorded:PurchaseRecorded'])}  "
        f"returns {_n(seen['purchases.recorded:ReturnRecorded'])}  points events {_n(points)}  "
        f"rewards events {_n(rewards)}",
        f"        redemptions asked {_n(sum(r.values()))}: fulfilled {_n(r['fulfilled'])}  "
        f"failed {_n(r['failed'])}  in flight {_n(r['requested'])}  refused {_n(r['refused'])}",
    ]
    for name, found in s.services.items():
        cells = "  ".join(f"{label} {_n(value)}" for label, value in found.items())
        lines.append(f"  {name:<11}{cells}")
    return [line if len(line) <= WIDTH else line[: WIDTH - 3] + "..." for line in lines]


class Display:
    """Redraws the block in place on a terminal; prints it every `plain_every_s` otherwise."""

    def __init__(self, stream=None, *, plain_every_s: float = 10.0) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.plain_every_s = plain_every_s
        self._drawn = 0
        self._last_plain = float("-inf")

    def show(self, lines: list[str]) -> None:
        if self.live:
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            if len(lines) < self._drawn:  # a shorter block: clear what is left of the old one
                self.stream.write("\x1b[0J")
            self._drawn = len(lines)
        else:
            now = time.monotonic()
            if now - self._last_plain < self.plain_every_s:
                return
            self._last_plain = now
            self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
