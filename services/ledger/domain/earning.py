"""Earning: what a purchase earns rule by rule (base, multipliers, campaigns, tier,
rounding, first-purchase bonus, daily cap), credited as a new lot."""

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_FLOOR, Decimal

from services.ledger.domain.accounts import ISSUANCE, Code, Journal, Transfer
from services.ledger.domain.books import Balance, CustomerBook, LineEarning, Lot, pay_debt, purchase_ref
from services.ledger.domain.errors import UnknownCurrency
from services.ledger.domain.tiers import TierMoved, in_tier_window, retier, tier_at
from services.ledger.program import Program, Tier
from shared.events import derived_event_id
from shared.events.purchases import PurchaseLine, PurchasePayload


_ONE = Decimal(1)
_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Earning:
    """What a purchase earns and why: `breakdown` lists each rule's contribution in the
    stacking order; its points add up to `points`."""

    points: int
    exact_points: Decimal  # after the tier multiplier, before rounding
    lines: list[LineEarning]
    bonus_points: int
    capped_points: int
    tier: str
    tier_multiplier: Decimal
    breakdown: list[dict[str, str | int]]
    rate: Decimal = Decimal(1)  # 1 unit of the purchase's currency in the program currency


def line_net_amount(line: PurchaseLine) -> Decimal:
    return max(line.net_amount, _ZERO)


def calculate_earning(
    program: Program,
    purchase: PurchasePayload,
    *,
    tier: Tier,
    first_purchase: bool,
    earned_today_points: int = 0,
) -> Earning:
    """The points a purchase earns under `program`, rule by rule (see STACKING_ORDER)."""
    rate = program.rate_to_program_currency(purchase.currency)
    if rate is None:
        raise UnknownCurrency(f"no rate from {purchase.currency} to {program.currency}")
    contributions: dict[str, Decimal] = {}

    def add(rule: str, points: Decimal) -> None:
        contributions[rule] = contributions.get(rule, _ZERO) + points

    # The base rule is the same for every line: summed locally, recorded first.
    base_rule = f"base {program.points_per_unit} pt per 1.00 {program.currency}"
    contributions[base_rule] = _ZERO
    base_total = _ZERO
    per_unit = program.points_per_unit
    sku_multipliers, category_multipliers = program.sku_multipliers, program.category_multipliers
    campaigns = program.campaigns
    lines: list[LineEarning] = []
    subtotal = _ZERO
    for line in purchase.lines:
        net = line_net_amount(line) * rate
        points = net * per_unit
        base_total += points
        if sku_multipliers or category_multipliers:
            multiplier = sku_multipliers.get(line.sku)
            if multiplier is not None:
                rule = f"sku {line.sku} x{multiplier}"
            else:
                multiplier = category_multipliers.get(line.category)
                rule = f"category {line.category} x{multiplier}"
            if multiplier is not None and multiplier != _ONE:
                add(rule, points * (multiplier - _ONE))
                points *= multiplier
        for campaign in campaigns:
            if campaign.applies(
                occurred_at=purchase.occurred_at, channel=purchase.source, sku=line.sku, category=line.category
            ):
                add(f"campaign {campaign.name} x{campaign.multiplier}", points * (campaign.multiplier - _ONE))
                points *= campaign.multiplier
        lines.append(LineEarning(line.line_id, line.sku, net, points))
        subtotal += points
    contributions[base_rule] = base_total
    exact = subtotal * tier.multiplier
    if tier.multiplier != _ONE:
        add(f"tier {tier.name} x{tier.multiplier}", exact - subtotal)
    floored = int(exact.to_integral_value(rounding=ROUND_FLOOR))
    if exact != floored:
        add("rounding: floor per purchase", Decimal(floored) - exact)
    bonus = program.first_purchase_bonus_points if first_purchase and floored > 0 else 0
    if bonus:
        add("first purchase bonus", Decimal(bonus))
    points = floored + bonus
    capped = 0
    if program.daily_cap_points is not None:
        room = max(program.daily_cap_points - earned_today_points, 0)
        if points > room:
            capped = points - room
            add(f"daily cap {program.daily_cap_points}", Decimal(-capped))
            points = room
    breakdown: list[dict[str, str | int]] = [{"rule": r, "points": format(p.normalize(), "f")} for r, p in contributions.items()]
    return Earning(points, exact, lines, bonus, capped, tier.name, tier.multiplier, breakdown, rate)


@dataclass(frozen=True, slots=True)
class Earned:
    customer_id: str
    lot: Lot
    earning: Earning
    debt_paid_points: int
    balance: Balance


def utc_day(moment: datetime) -> date:
    """The calendar day of a moment in UTC: the unit of the daily cap."""
    return moment.astimezone(timezone.utc).date()


def history_earns(history: bool, import_policy: str | None) -> bool:
    """What a purchase of imported history earns, by the policy it was imported under:
    `analytics` nothing (the purchases are there for the analytics only: no lot, no
    transfer, no event); `as-earned` as if earned at the time (tier, multipliers, maturity
    and expiry from the purchase's own time, what would have expired recorded as expired).
    A history purchase without a policy earns nothing. Live purchases always earn."""
    if not history:
        return True
    return import_policy == "as-earned"


def earn(
    book: CustomerBook,
    journal: Journal,
    program: Program,
    rule_version: int,
    *,
    purchase: PurchasePayload,
    now: datetime,
    history: bool = False,
) -> list[Earned | TierMoved]:
    """Credit a sale as a new lot: pending inside the return window, then available.
    Tier, multipliers, maturity and expiry come from the purchase's own time; `now` (the
    ledger's clock) only says whether the return window has closed yet and what counts for
    the customer's current tier. Raises UnknownCurrency. The caller makes sure the purchase
    has no lot yet."""
    capped = program.daily_cap_points is not None  # the per-day tally is kept only for a cap
    day = utc_day(purchase.occurred_at) if capped else None
    earning = calculate_earning(
        program, purchase,
        tier=tier_at(book, program, purchase.occurred_at),
        first_purchase=not book.has_purchased,
        earned_today_points=book.earned_by_day.get(day, 0) if capped else 0,
    )
    matures_at = purchase.occurred_at + timedelta(days=program.pending_days)
    pending = matures_at > now
    ref = purchase_ref(purchase.source, purchase.purchase_id, purchase.store_id)
    lot = Lot(
        lot_id=derived_event_id("ledger", "lot", ref),
        customer_id=book.customer_id,
        source="purchase",
        purchase_id=purchase.purchase_id,
        purchase_source=purchase.source,
        purchase_store=purchase.store_id,
        currency_rate=earning.rate,
        history=history,
        occurred_at=purchase.occurred_at,
        amount_points=earning.points,
        remaining_points=earning.points,
        pending=pending,
        matures_at=matures_at,
        expires_at=matures_at + timedelta(days=program.expiry_days),
        rule_version=rule_version,
        qualifying=True,
        earned_points=earning.points,
        bonus_points=earning.bonus_points,
        tier_multiplier=earning.tier_multiplier,
        lines=earning.lines,
        breakdown=earning.breakdown,
        is_new=True,
    )
    book.lots[lot.lot_id] = lot
    book.has_purchased = True
    book.changed = True
    if capped:
        book.earned_by_day[day] = book.earned_by_day.get(day, 0) + earning.points
    target = book.pending if pending else book.available
    paid = 0
    if earning.points > 0:
        journal.post(Transfer(
            derived_event_id("ledger", "earn", ref), ISSUANCE, target.account_id, earning.points,
            Code.EARN, book.customer_id, purchase.purchase_id, lot_id=lot.lot_id, rule_version=rule_version,
            occurred_at=purchase.occurred_at,
        ))
        if book.debt.debits_posted > book.debt.credits_posted:
            paid = pay_debt(book, journal, source=target, amount=earning.points,
                            cause=f"earn:{ref}", ref=f"earn:{purchase.purchase_id}", lot=lot)
    if in_tier_window(program, purchase.occurred_at, now):
        book.qualifying_points += earning.points
    out: list[Earned | TierMoved] = [Earned(book.customer_id, lot, earning, paid, book.balance())]
    moved = retier(book, program)
    if moved:
        out.append(moved)
    return out
