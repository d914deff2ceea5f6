"""Use cases of the churn service on each event: fold a batch of events into per-customer
facts (Facts), write them set-based in the batch's transaction, then rescore the customers
touched and apply the event-driven transitions (recovery, segment changes), emitting alerts
through the outbox in the same transaction."""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from services.churn import domain, metrics, repository, scoring
from services.churn.alerts import AlertSink, risk_from_row
from services.churn.settings import ChurnSettings
from shared.events.points import BalanceAfter

log = logging.getLogger(__name__)

PURCHASES_CONSUMER = "churn.purchases"
POINTS_CONSUMER = "churn.points"
REWARDS_CONSUMER = "churn.rewards"
ENGAGEMENT_CONSUMER = "churn.engagement"


class Knowledge:
    """What this instance knows of the base: the latest RFM snapshot and model fit. Re-read
    from the database every `cache_refresh_interval_s` and after a local fit or refresh."""

    def __init__(self) -> None:
        self.snapshot: scoring.Snapshot | None = None
        self.fit: scoring.Fit | None = None


@dataclass
class ChurnContext:
    settings: ChurnSettings
    pool: Callable[[], asyncpg.Pool]
    knowledge: Knowledge = field(default_factory=Knowledge)
    wake_relay: Callable[[], None] = lambda: None

    @property
    def risk_policy(self) -> domain.RiskPolicy:
        s = self.settings
        return domain.RiskPolicy(s.overdue_factor, s.lost_factor, s.p_alive_threshold, s.cooldown_days)

    @property
    def value_policy(self) -> scoring.ValuePolicy:
        s = self.settings
        return scoring.ValuePolicy(s.expected_purchases_days, s.ltv_horizon_days, s.margin_rate, s.cost_per_purchase,
                                   s.cost_per_redemption, s.annual_discount_rate)

    def rhythm(self, row: Any) -> domain.Rhythm:
        s = self.settings
        base = self.knowledge.snapshot.base_median_interval_days if self.knowledge.snapshot else None
        return domain.rhythm(row["median_interval_days"], row["intervals"], min_intervals=s.min_intervals,
                             base_median_days=base, default_days=s.default_interval_days)


@dataclass(slots=True)
class _Delta:
    currency: str | None = None
    first_at: datetime | None = None
    last_at: datetime | None = None
    purchases: int = 0
    returns: int = 0
    gross: Decimal = Decimal(0)
    returned: Decimal = Decimal(0)
    margin: Decimal = Decimal(0)
    history: int = 0
    event_at: datetime | None = None


class Facts:
    """One batch of events folded per customer (the dispatch tables of handlers.py call
    these methods), then written with a handful of set-based statements."""

    def __init__(self, settings: ChurnSettings, news_after: datetime) -> None:
        self.settings = settings
        self.news_after = news_after
        self.deltas: dict[str, _Delta] = {}
        self.days: dict[tuple[str, date], list] = {}
        self.categories: dict[tuple[str, str], list[Decimal]] = {}
        self.points: dict[str, tuple[int, int, str, datetime]] = {}
        self.counters: dict[str, list] = {}
        self.touched: dict[str, str] = {}   # customer -> correlation id of their latest event
        self.news: set[str] = set()         # customers with an event recent enough to be news
        self.bought: set[str] = set()       # customers with a new sale (may end an episode)

    def _touch(self, event: Any, *, history: bool = False) -> str:
        customer = event.customer_id
        self.touched[customer] = event.correlation_id
        if not history and event.occurred_at >= self.news_after:
            self.news.add(customer)
        return customer

    def _delta(self, customer: str, event: Any) -> _Delta:
        d = self.deltas.setdefault(customer, _Delta())
        d.event_at = max(d.event_at, event.occurred_at) if d.event_at else event.occurred_at
        return d

    def sale(self, event: Any) -> None:
        p = event.payload
        customer = self._touch(event, history=p.history)
        d = self._delta(customer, event)
        at = p.occurred_at
        d.currency = p.currency
        d.first_at = min(d.first_at, at) if d.first_at else at
        d.last_at = max(d.last_at, at) if d.last_at else at
        d.purchases += 1
        d.history += 1 if p.history else 0
        d.gross += p.total
        day = self.days.setdefault((customer, at.date()), [0, Decimal(0)])
        day[0] += 1
        day[1] += p.total
        d.margin += self._lines(customer, p.lines, +1)
        self.bought.add(customer)

    def return_(self, event: Any) -> None:
        p = event.payload
        customer = self._touch(event, history=p.history)
        d = self._delta(customer, event)
        d.currency = p.currency
        d.returns += 1
        d.returned += p.total
        d.margin -= self._lines(customer, p.lines, -1)

    def _lines(self, customer: str, lines: Any, sign: int) -> Decimal:
        margin = Decimal(0)
        for line in lines:
            amount = line.net_amount
            line_margin = amount * self.settings.margin_for(line.category)
            margin += line_margin
            entry = self.categories.setdefault((customer, line.category), [Decimal(0), Decimal(0)])
            entry[0] += sign * amount
            entry[1] += sign * line_margin
        return margin

    def balance(self, event: Any) -> None:
        """Any points event: the balance and tier after it (the latest by occurred_at wins)."""
        balance: BalanceAfter = event.payload.balance
        customer = self._touch(event, history=getattr(event.payload, "history", False))
        known = self.points.get(customer)
        if known is None or known[3] <= event.occurred_at:
            self.points[customer] = (balance.available_points, balance.pending_points, balance.tier,
                                     event.occurred_at)

    def _counter(self, event: Any) -> list:
        customer = self._touch(event)
        row = self.counters.setdefault(customer, [0, 0, None, None, None, event.occurred_at])
        row[5] = max(row[5], event.occurred_at)
        return row

    def redemption(self, event: Any, delta: int) -> None:
        self._counter(event)[0] += delta

    def complaint(self, event: Any, delta: int) -> None:
        self._counter(event)[1] += delta

    def survey(self, event: Any) -> None:
        row = self._counter(event)
        p = event.payload
        if row[4] is None or p.answered_at >= row[4]:
            row[2], row[3], row[4] = p.nps, p.csat, p.answered_at

    def noted(self, event: Any) -> None:
        """An event with no fact of its own for churn (a touchpoint, a consent): the customer's
        scores are refreshed all the same."""
        self._touch(event)


async def write_facts(conn: asyncpg.Connection, facts: Facts, now: datetime) -> None:
    if facts.deltas:
        deltas = [repository.CustomerDelta(c, d.currency, d.first_at, d.last_at, d.purchases, d.returns, d.gross,
                                           d.returned, d.margin, d.history, d.event_at)
                  for c, d in facts.deltas.items()]
        days = [(c, day, n, spend) for (c, day), (n, spend) in facts.days.items()]
        categories = [(c, cat, spend, margin) for (c, cat), (spend, margin) in facts.categories.items()]
        await repository.add_purchases(conn, deltas=deltas, days=days, categories=categories, now=now)
    if facts.points:
        await repository.set_points(conn, [(c, *v) for c, v in facts.points.items()], now)
    if facts.counters:
        await repository.add_counters(conn, [(c, *v) for c, v in facts.counters.items()], now)


async def apply_facts(ctx: ChurnContext, batch: Any, facts: Facts) -> None:
    """The apply function of every subscription, after its dispatch table folded the batch."""
    if not facts.touched:
        return
    await write_facts(batch.conn, facts, batch.now)
    sink = AlertSink(ctx.settings)
    await refresh_customers(ctx, batch.conn, list(facts.touched), now=batch.now, sink=sink, facts=facts)
    batch.publish(*sink.messages)
    await sink.record(batch.conn)
    applied = len(batch.items)
    batch.after_commit(lambda: (metrics.EVENTS_APPLIED.inc(applied), sink.count_after_commit()))


async def refresh_customers(ctx: ChurnContext, conn: asyncpg.Connection, customer_ids: list[str], *,
                            now: datetime, sink: AlertSink, facts: Facts) -> None:
    """Rescore the customers an event touched; a new sale ends an at-risk episode
    (CustomerRecovered); segment changes are emitted. Only news (recent, not imported)
    emits: older events change the state silently (domain.news_window_start)."""
    rows = await repository.load_for_update(conn, customer_ids)
    scores = scoring.score(rows, now=now, snapshot=ctx.knowledge.snapshot, fit=ctx.knowledge.fit,
                           policy=ctx.value_policy)
    risks = []
    for row, s in zip(rows, scores):
        customer = row["customer_id"]
        news = customer in facts.news
        correlation = facts.touched.get(customer, "")
        if s.segment_changed and news:
            sink.segment_changed(customer, s, now=now, correlation_id=correlation)
        if customer in facts.bought:
            transition = domain.purchase_recovers(risk_from_row(row), now=now,
                                                  last_purchase_at=row["last_purchase_at"])
            if transition is not None:
                risks.append((customer, transition.risk))
                if news:
                    sink.alert(customer, transition, s, row, now=now, correlation_id=correlation)
                else:
                    sink.silent(transition)
    await repository.write_scores(conn, scores, now)
    await repository.write_risks(conn, risks, now)
