"""Scores of a group of customers at once: RFM against the latest snapshot of the base, the
buy-till-you-die and Gamma-Gamma models against the latest fit, LTV, value. Vectorised over
the group (one call of each model function per batch, not per customer)."""

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Mapping

import numpy as np

from services.churn import models

CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The base as of `computed_at`: quintile boundaries and the typical rhythm."""

    version: int
    computed_at: datetime
    customers: int
    recency_edges: list[float]
    frequency_edges: list[float]
    monetary_edges: list[float]
    ltv_edges: list[float] | None
    base_median_interval_days: float | None


@dataclass(frozen=True, slots=True)
class Fit:
    version: int
    fitted_at: datetime
    frequency: Any  # models.FrequencyFit
    spend: Any | None  # models.SpendFit


@dataclass(frozen=True, slots=True)
class ValuePolicy:
    expected_purchases_days: int
    horizon_days: int
    margin_rate: Decimal
    cost_per_purchase: Decimal
    cost_per_redemption: Decimal
    annual_discount_rate: float


@dataclass(slots=True)
class Scores:
    customer_id: str
    recency_days: int | None
    recency_score: int | None
    frequency_score: int | None
    monetary_score: int | None
    segment: str | None
    segment_changes: int
    p_alive: float | None
    expected_purchases: float | None
    expected_spend: Decimal | None
    ltv: Decimal | None
    value_score: int | None
    rank_value: Decimal
    fit_version: int | None
    snapshot_version: int | None
    previous_segment: str | None = None

    @property
    def segment_changed(self) -> bool:
        return self.segment is not None and self.segment != self.previous_segment


def model_inputs(rows: list[Mapping[str, Any]], today: date) -> tuple[np.ndarray, ...]:
    """x (repeat purchase days), t_x (days from the first to the last purchase day: the
    models' recency), T (days from the first purchase day to today), mean value per purchase
    day (net of returns), in days, as the models expect."""
    x = np.array([max(r["purchase_days"] - 1, 0) for r in rows], dtype=float)
    t_x = np.array([(r["last_purchase_day"] - r["first_purchase_day"]).days for r in rows], dtype=float)
    T = np.array([max((today - r["first_purchase_day"]).days, 0) for r in rows], dtype=float)
    T = np.maximum(T, t_x)
    mean_value = np.array([max(float(r["net_spend"]) / r["purchase_days"], 0.0) for r in rows], dtype=float)
    return x, t_x, T, mean_value


def _money(value: float) -> Decimal | None:
    if value is None or not np.isfinite(value):
        return None
    return Decimal(repr(float(value))).quantize(CENT)


def _margin_rate(row: Mapping[str, Any], default: Decimal) -> float:
    net = row["net_spend"]
    return float(row["margin"] / net) if net and net > 0 else float(default)


def score(rows: list[Mapping[str, Any]], *, now: datetime, snapshot: Snapshot | None, fit: Fit | None,
          policy: ValuePolicy) -> list[Scores]:
    today = now.date()
    out: list[Scores] = []
    buyers = [r for r in rows if r["purchase_days"] and r["first_purchase_day"] is not None]
    model_values: dict[str, tuple[float, float, Decimal | None, Decimal | None]] = {}
    if fit is not None and buyers:
        model_values = _model_scores(buyers, today=today, fit=fit, policy=policy)
    rfm = _rfm_scores(rows, today=today, snapshot=snapshot)
    for r in rows:
        recency_days, rs, fs, ms = rfm[r["customer_id"]]
        segment = models.segment(rs, fs) if rs is not None else None
        p_alive, expected, spend, ltv = model_values.get(r["customer_id"], (None, None, None, None))
        if ltv is not None and snapshot is not None and snapshot.ltv_edges:
            value_score = models.quintile_score(float(ltv), snapshot.ltv_edges)
        else:
            value_score = ms
        rank_value = ltv if ltv is not None else Decimal(r["margin"]).quantize(CENT)
        previous = r["segment"]
        changes = (r["segment_changes"] or 0) + (1 if segment is not None and segment != previous else 0)
        out.append(Scores(
            r["customer_id"], recency_days, rs, fs, ms, segment, changes, p_alive, expected, spend, ltv,
            value_score, rank_value, fit.version if fit is not None and p_alive is not None else None,
            snapshot.version if snapshot is not None else None, previous))
    return out


def _rfm_scores(rows: list[Mapping[str, Any]], *, today: date, snapshot: Snapshot | None,
                ) -> dict[str, tuple[int | None, int | None, int | None, int | None]]:
    """(recency days, R, F, M) per customer; scores None without a snapshot or a purchase."""
    out: dict[str, tuple[int | None, int | None, int | None, int | None]] = {}
    buyers = []
    for r in rows:
        if r["purchase_days"] and r["last_purchase_day"] is not None:
            buyers.append(r)
        out[r["customer_id"]] = (None, None, None, None)
    if not buyers:
        return out
    recency = [(today - r["last_purchase_day"]).days for r in buyers]
    if snapshot is None:
        for r, days in zip(buyers, recency):
            out[r["customer_id"]] = (days, None, None, None)
        return out
    rs = models.quintile_scores(recency, snapshot.recency_edges, higher_is_better=False)
    fs = models.quintile_scores([r["purchase_days"] for r in buyers], snapshot.frequency_edges)
    ms = models.quintile_scores([float(r["net_spend"]) for r in buyers], snapshot.monetary_edges)
    for i, r in enumerate(buyers):
        out[r["customer_id"]] = (recency[i], int(rs[i]), int(fs[i]), int(ms[i]))
    return out


def _model_scores(rows: list[Mapping[str, Any]], *, today: date, fit: Fit, policy: ValuePolicy,
                  ) -> dict[str, tuple[float, float, Decimal | None, Decimal | None]]:
    x, t_x, T, mean_value = model_inputs(rows, today)
    p_alive = np.asarray(models.p_alive(fit.frequency, x, t_x, T), dtype=float)
    expected = np.asarray(models.expected_purchases(fit.frequency, policy.expected_purchases_days, x, t_x, T),
                          dtype=float)
    spend = ltv = None
    if fit.spend is not None:
        spend = np.asarray(models.expected_spend(fit.spend, x, mean_value), dtype=float)
        margin = np.array([_margin_rate(r, policy.margin_rate) for r in rows], dtype=float)
        ltv = np.asarray(models.customer_lifetime_value(
            fit.frequency, fit.spend, x, t_x, T, mean_value, horizon_days=policy.horizon_days, margin_rate=margin,
            cost_per_purchase=float(policy.cost_per_purchase),
            annual_discount_rate=policy.annual_discount_rate), dtype=float)
        # Redemptions cost to serve too: the customer's redemptions per purchase so far times
        # the purchases expected over the horizon (undiscounted: a small, cautious term).
        horizon_purchases = np.asarray(models.expected_purchases(fit.frequency, policy.horizon_days, x, t_x, T),
                                       dtype=float)
        per_purchase = np.array([r["redemptions"] / max(r["purchases"], 1) for r in rows], dtype=float)
        ltv = ltv - float(policy.cost_per_redemption) * per_purchase * horizon_purchases
    out = {}
    for i, r in enumerate(rows):
        out[r["customer_id"]] = (
            float(p_alive[i]), float(expected[i]),
            _money(spend[i]) if spend is not None else None,
            _money(ltv[i]) if ltv is not None else None)
    return out
