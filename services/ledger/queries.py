"""The read side: balances, what a purchase would earn, the ledger-wide gauges."""

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from services.ledger import domain as d
from services.ledger import metrics
from services.ledger import repository as repo
from services.ledger.program import STACKING_ORDER
from services.ledger.service import Ledger
from shared.events.purchases import PurchasePayload


@dataclass
class BalanceView:
    balance: d.Balance
    next_expiry_at: datetime | None
    next_expiry_points: int


async def balance_of(conn: asyncpg.Connection, ledger: Ledger, customer_id: str) -> BalanceView | None:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        book = await repo.read_customer(conn, customer_id=customer_id)
        if book is None:
            return None
        nxt = await repo.next_expiry(conn, customer_id=customer_id)
    return BalanceView(book.balance(), nxt["expires_at"] if nxt else None, int(nxt["points"]) if nxt else 0)


@dataclass
class Simulation:
    rule_version: int
    earning: d.Earning
    pending: bool
    matures_at: datetime
    expires_at: datetime
    stacking_order: tuple[str, ...] = STACKING_ORDER


async def simulate(
    conn: asyncpg.Connection, ledger: Ledger, *, purchase: PurchasePayload, customer_id: str | None,
    tier: str | None, first_purchase: bool | None,
) -> Simulation:
    """What `purchase` would earn now, rule by rule, for a customer (their tier, first
    purchase and daily cap as they stand) or for the given tier. Raises UnknownCurrency,
    ProgramHistoryUnavailable (the program is not loaded and ledger.programs cannot be read)."""
    await ledger.programs.ensure_loaded(conn, wait=False)  # HTTP only
    now = ledger.clock()
    rules = ledger.programs.at(now)
    program, version = rules.program, rules.version
    earned_today = 0
    if customer_id is not None:
        book = await repo.read_customer(conn, customer_id=customer_id)
        if book is not None:
            tier = tier or book.tier
            first_purchase = book.has_purchased is False if first_purchase is None else first_purchase
            day = d.utc_day(purchase.occurred_at)
            by_day = await repo.earned_by_day(conn, customer_ids=[customer_id],
                                              since=purchase.occurred_at - timedelta(days=1))
            earned_today = by_day.get((customer_id, day), 0)
    earning = d.calculate_earning(program, purchase, tier=program.tier_named(tier or program.tiers[0].name),
                                  first_purchase=True if first_purchase is None else first_purchase,
                                  earned_today_points=earned_today)
    matures_at = purchase.occurred_at + timedelta(days=program.pending_days)
    return Simulation(version, earning, matures_at > now, matures_at, matures_at + timedelta(days=program.expiry_days))


async def refresh_gauges(pool: asyncpg.Pool) -> dict[str, int]:
    async with pool.acquire() as conn:
        t = await repo.totals(conn)
    metrics.LIABILITY.labels("available").set(t["available"])
    metrics.LIABILITY.labels("pending").set(t["pending"])
    metrics.LIABILITY.labels("held").set(t["held"])
    metrics.LIABILITY.labels("debt").set(t["debt"])
    metrics.INVARIANT.labels("posted").set(t["posted_imbalance"])
    metrics.INVARIANT.labels("pending").set(t["pending_imbalance"])
    spent = t["expired"] + t["redeemed"]
    metrics.BREAKAGE.set(t["expired"] / spent if spent else 0.0)
    return t
