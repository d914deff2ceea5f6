"""The independent reference model of the fault-injection run (bench.chaos): what the ledger
must hold, computed from the generated inputs alone.

It imports nothing from the services. It implements the default program as documented
(services/ledger/program.yaml and README): 1 point per 1.00 PLN of a line's net amount
(quantity x unit price - discount, never below 0), summed over the purchase, floored once
per purchase; Bronze (multiplier 1.0) as long as qualifying points stay below 1,000 (the
generator keeps every customer below); no campaigns, bonus or cap. Points stay pending for
14 days (every generated purchase is recent), so returns never create debt and redemptions
spend only what the admin adjustments funded. A return takes back what the purchase earned
on the returned part of its lines; the purchase keeps floor(sum of what is left).
Redemptions spend adjustment lots, the one that expires first (the first funded) first; a
cancelled redemption gives its points back to the lots they came from.
"""

from collections import defaultdict
from datetime import datetime, timedelta
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal

SILVER_THRESHOLD_POINTS = 1000


@dataclass(frozen=True)
class Line:
    line_id: str
    sku: str
    quantity: int
    unit_price: Decimal
    discount: Decimal = Decimal(0)

    @property
    def net_amount(self) -> Decimal:
        return max(self.quantity * self.unit_price - self.discount, Decimal(0))


@dataclass(frozen=True)
class Sale:
    purchase_id: str
    customer_id: str
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class Return:
    return_id: str
    original_purchase_id: str
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class Funding:
    adjustment_id: str
    customer_id: str
    amount_points: int


@dataclass(frozen=True)
class Redemption:
    key: str  # the Idempotency-Key: one redemption per key
    customer_id: str
    cost_points: int
    cancel: bool


@dataclass
class ExpectedLot:
    amount_points: int
    remaining_points: int
    reversed_points: int = 0
    pending: bool = True


@dataclass
class ExpectedCustomer:
    available_points: int = 0
    pending_points: int = 0
    held_points: int = 0
    debt_points: int = 0
    qualifying_points: int = 0
    tier: str = "Bronze"


@dataclass
class Expected:
    customers: dict[str, ExpectedCustomer]
    purchase_lots: dict[str, ExpectedLot]  # purchase_id -> lot
    adjustment_lots: dict[str, ExpectedLot]  # adjustment_id -> lot
    earn_points: dict[str, int]  # purchase_id -> the one earn transfer's amount (absent when 0)
    # What all the returns of a sale take back together. How it splits between them depends on
    # the order they arrive in (each return floors what is left), which the doors do not fix.
    reversal_points_by_sale: dict[str, int]
    sale_of_return: dict[str, str]  # return_id -> purchase_id
    redemption_outcome: dict[str, str]  # idempotency key -> fulfilled | cancelled
    hold_state: dict[str, str]  # idempotency key -> posted | refunded


def floor_points(amount: Decimal) -> int:
    return int(amount.to_integral_value(rounding=ROUND_FLOOR))


@dataclass
class _Purchase:
    sale: Sale
    earned: int
    returned: dict[str, Decimal] = field(default_factory=dict)  # line_id -> returned amount

    def entitled(self) -> int:
        kept = sum((max(line.net_amount - self.returned.get(line.line_id, Decimal(0)), Decimal(0))
                    for line in self.sale.lines), Decimal(0))
        return min(floor_points(kept), self.earned)


def expected_state(sales: list[Sale], returns: list[Return], fundings: list[Funding],
                   redemptions: list[Redemption]) -> Expected:
    """`returns` in any order (what they take back together does not depend on it); `fundings` and
    `redemptions` each in the order they were made for a customer (the harness makes one
    customer's in sequence)."""
    customers: dict[str, ExpectedCustomer] = defaultdict(ExpectedCustomer)
    purchases: dict[str, _Purchase] = {}
    earn_points: dict[str, int] = {}
    for s in sales:
        assert s.purchase_id not in purchases, f"sale {s.purchase_id} generated twice"
        earned = floor_points(sum((line.net_amount for line in s.lines), Decimal(0)))
        purchases[s.purchase_id] = _Purchase(s, earned)
        if earned > 0:
            earn_points[s.purchase_id] = earned

    sale_of_return: dict[str, str] = {}
    for r in returns:
        assert r.return_id not in sale_of_return, f"return {r.return_id} generated twice"
        sale_of_return[r.return_id] = r.original_purchase_id
        p = purchases[r.original_purchase_id]
        by_id = {line.line_id: line for line in p.sale.lines}
        for line in r.lines:
            bought = by_id[line.line_id]
            p.returned[line.line_id] = min(p.returned.get(line.line_id, Decimal(0)) + line.net_amount,
                                           bought.net_amount)
    reversal_points_by_sale = {pid: p.earned - p.entitled() for pid, p in purchases.items() if p.returned}

    purchase_lots: dict[str, ExpectedLot] = {}
    for pid, p in purchases.items():
        entitled = p.entitled()
        purchase_lots[pid] = ExpectedLot(p.earned, entitled, p.earned - entitled, pending=True)
        c = customers[p.sale.customer_id]
        c.pending_points += entitled
        c.qualifying_points += entitled

    adjustment_lots: dict[str, ExpectedLot] = {}
    lots_of: dict[str, list[str]] = defaultdict(list)
    for f in fundings:
        adjustment_lots[f.adjustment_id] = ExpectedLot(f.amount_points, f.amount_points, pending=False)
        lots_of[f.customer_id].append(f.adjustment_id)
        customers[f.customer_id].available_points += f.amount_points

    outcome: dict[str, str] = {}
    hold_state: dict[str, str] = {}
    for r in redemptions:
        c = customers[r.customer_id]
        assert c.available_points >= r.cost_points, f"redemption {r.key} is not funded: the generator is wrong"
        taken: list[tuple[str, int]] = []
        left = r.cost_points
        for adjustment_id in lots_of[r.customer_id]:  # funded in order, so they expire in order
            lot = adjustment_lots[adjustment_id]
            take = min(left, lot.remaining_points)
            if take:
                lot.remaining_points -= take
                taken.append((adjustment_id, take))
                left -= take
        assert left == 0
        c.available_points -= r.cost_points
        if r.cancel:
            for adjustment_id, take in taken:
                adjustment_lots[adjustment_id].remaining_points += take
            c.available_points += r.cost_points
            outcome[r.key], hold_state[r.key] = "cancelled", "refunded"
        else:
            outcome[r.key], hold_state[r.key] = "fulfilled", "posted"

    for cid, c in customers.items():
        assert c.qualifying_points < SILVER_THRESHOLD_POINTS, f"{cid} would leave Bronze: the generator is wrong"
    return Expected(dict(customers), purchase_lots, adjustment_lots, earn_points, reversal_points_by_sale,
                    sale_of_return, outcome, hold_state)


# ---- imported history, policy as-earned ---------------------------------------------------
# The default program again, now with its tiers (Bronze x1.0, Silver x1.25 from 1,000
# qualifying points, Gold x1.5 from 5,000, over 365 days), maturity (14 days) and expiry (365
# days after maturity), each taken at the purchase's own time: what a history imported with
# POLICY=as-earned must leave in the ledger. Purchases in the inbound contract (dicts), in
# time order.

HISTORY_TIERS = ((0, "Bronze", Decimal("1.0")), (1000, "Silver", Decimal("1.25")), (5000, "Gold", Decimal("1.5")))


def _tier(points: int) -> tuple[str, Decimal]:
    name, multiplier = HISTORY_TIERS[0][1:]
    for threshold, n, m in HISTORY_TIERS:
        if points >= threshold:
            name, multiplier = n, m
    return name, multiplier


@dataclass
class HistoryLot:
    customer_id: str
    occurred_at: datetime
    multiplier: Decimal
    net_by_line: dict[str, Decimal]
    earned: int
    returned: dict[str, Decimal] = field(default_factory=dict)

    @property
    def reversed(self) -> int:
        kept = sum((max(net - self.returned.get(line_id, Decimal(0)), Decimal(0))
                    for line_id, net in self.net_by_line.items()), Decimal(0))
        return self.earned - min(floor_points(kept * self.multiplier), self.earned)


@dataclass
class HistoryCustomer:
    available_points: int = 0
    pending_points: int = 0
    expired_points: int = 0
    qualifying_points: int = 0
    tier: str = "Bronze"


def _net(line: dict) -> Decimal:
    return max(Decimal(line["unit_price"]) * int(line["quantity"]) - Decimal(line["discount"]), Decimal(0))


def expected_history(purchases: list[dict], *, now: datetime) -> tuple[dict[str, HistoryCustomer],
                                                                        dict[tuple[str, str, str], HistoryLot]]:
    window, pending, expiry = timedelta(days=365), timedelta(days=14), timedelta(days=365)
    lots: dict[tuple[str, str, str], HistoryLot] = {}
    by_customer: dict[str, list[HistoryLot]] = defaultdict(list)
    for p in purchases:
        t = datetime.fromisoformat(p["occurred_at"])
        if p["type"] == "sale":
            cid = p["customer_id"]
            if cid is None:
                continue  # anonymous: earns nothing
            qualifying = sum(x.earned - x.reversed for x in by_customer[cid] if t - window < x.occurred_at <= t)
            _, multiplier = _tier(qualifying)
            nets = {line["line_id"]: _net(line) for line in p["lines"]}
            lot = HistoryLot(cid, t, multiplier, nets, floor_points(sum(nets.values(), Decimal(0)) * multiplier))
            lots[(p["source"], p["store_id"], p["purchase_id"])] = lot
            by_customer[cid].append(lot)
        else:
            lot = lots.get((p["source"], p["store_id"], p["original_purchase_id"]))
            if lot is None:
                continue
            for line in p["lines"]:
                bought = lot.net_by_line[line["line_id"]]
                lot.returned[line["line_id"]] = min(lot.returned.get(line["line_id"], Decimal(0)) + _net(line), bought)
    customers: dict[str, HistoryCustomer] = {}
    for cid, own in by_customer.items():
        c = customers[cid] = HistoryCustomer()
        for lot in own:
            points = lot.earned - lot.reversed
            matures_at = lot.occurred_at + pending
            if matures_at + expiry <= now:
                c.expired_points += points
            elif matures_at <= now:
                c.available_points += points
            else:
                c.pending_points += points
            if lot.occurred_at > now - window:
                c.qualifying_points += points
        c.tier = _tier(c.qualifying_points)[0]
    return customers, lots
