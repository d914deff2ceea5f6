"""Customer-base models for the churn service: who is still a customer, how much they will buy,
what they are worth. Pure numpy/scipy, no I/O; MODELS.md has the formulas and references.

Purchase frequency and dropout: BG/NBD (Fader, Hardie & Lee 2005) or its modified form MBG/NBD
(Batislam, Denizel & Filiztekin 2007). The service default is MBG/NBD: under BG/NBD a customer
can only drop out right after a *repeat* purchase, so every one-time buyer has P(alive) = 1 for
ever, however long ago the only purchase was. A churn service that can never call a one-time
buyer lost (often half the base or more) is useless, and MBG/NBD removes exactly that flaw (a
customer may also drop out right after the first purchase) with the same four parameters, the
same cost, and an equal fit on CDNOW (log-likelihood -9582.1 vs -9582.4).

Spend: Gamma-Gamma (Fader & Hardie 2013), fitted on repeat buyers' mean repeat spend.

The likelihoods are the published closed forms, evaluated vectorised with scipy.special with
analytic gradients in log-parameters (which keeps every parameter positive) and minimised with
L-BFGS-B (Nelder-Mead if that fails). Terms that depend on x alone, T alone or t_x alone are
computed once per distinct value, and identical (x, t_x, T) rows are grouped with weights, so
a base of a million customers costs a few thousand distinct rows per likelihood evaluation.
A fit reports converged=False (finite parameters, never NaN) when the data cannot identify the
model: the optimiser failed, a parameter ran to its bound, or the likelihood is flat in some
direction (all one-time buyers, a single customer); only an empty base raises NotEnoughData.
Times are in whatever unit the caller uses (the service uses days); alpha is in that unit.
"""

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import special, stats

from services.churn._fit import NotEnoughData, compress, minimise
from services.churn.rfm import (
    SEGMENTS,
    quintile_edges,
    quintile_score,
    quintile_scores,
    segment,
)

__all__ = [
    "DEFAULT_MODEL",
    "SEGMENTS",
    "FrequencyFit",
    "NotEnoughData",
    "SpendFit",
    "customer_lifetime_value",
    "expected_purchases",
    "expected_spend",
    "fit_frequency_model",
    "fit_gamma_gamma",
    "p_alive",
    "quintile_edges",
    "quintile_score",
    "quintile_scores",
    "segment",
]

FrequencyModel = Literal["bgnbd", "mbgnbd"]
DEFAULT_MODEL: FrequencyModel = "mbgnbd"
DAYS_PER_YEAR = 365.0


@dataclass(frozen=True)
class FrequencyFit:
    model: FrequencyModel
    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    converged: bool
    customers: int
    iterations: int
    seconds: float
    message: str = ""
    distinct_rows: int = 0


@dataclass(frozen=True)
class SpendFit:
    p: float
    q: float
    gamma: float
    log_likelihood: float
    converged: bool
    customers: int
    seconds: float
    message: str = ""
    # E[spend] of a customer with no repeat purchase: p*gamma/(q-1); when q <= 1 that mean
    # does not exist and the fitted customers' weighted mean spend stands in.
    population_mean: float = 0.0


def _shift(model: FrequencyModel) -> int:
    """MBG/NBD gives a customer one more chance to drop out (after the first purchase)."""
    if model == "bgnbd":
        return 0
    if model == "mbgnbd":
        return 1
    raise ValueError(f"unknown frequency model {model!r} (bgnbd or mbgnbd)")


def _columns(*arrays: object) -> list[np.ndarray]:
    cols = [np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in arrays]
    cols = list(np.broadcast_arrays(*cols))
    for c in cols:
        if not np.all(np.isfinite(c)):
            raise ValueError("customer data must be finite numbers")
    return [np.ascontiguousarray(c) for c in cols]


def _check_rfm(x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> None:
    if np.any(x < 0) or np.any(t_x < 0) or np.any(t_x > T * (1 + 1e-12)):
        raise ValueError("need x >= 0 and 0 <= t_x <= T for every customer")
    if np.any((x == 0) & (t_x != 0)):
        raise ValueError("a customer with no repeat purchase (x = 0) has t_x = 0")


def _weights(weights: object, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), (n,)).copy()
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0")
    return w


class _FrequencyLikelihood:
    """-log L of BG/NBD (k = 0) or MBG/NBD (k = 1) over a grouped base, with its gradient in
    log-parameters. Per customer (FHL 2005 eq. 6; Batislam et al. 2007):
        L = B(a, b+x+k)/B(a,b) * G(r+x)/G(r) * alpha^r
            * [ (alpha+T)^-(r+x) + [x>0 or k=1] * a/(b+x+k-1) * (alpha+t_x)^-(r+x) ]
    """

    def __init__(self, k: int, x: np.ndarray, t_x: np.ndarray, T: np.ndarray, w: np.ndarray):
        g = compress(x, t_x, T, weights=w)
        (self.ux, self.ut, self.uT), (self.gx, self.gt, self.gT), counts = g.uniques, g.index, g.weight
        self.k = k
        self.w = counts
        self.wx = np.bincount(self.gx, weights=counts, minlength=len(self.ux))
        self.xg = self.ux[self.gx]
        self.active_x = (self.ux > 0) | (k == 1)
        self.total = float(counts.sum())

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        r, alpha, a, b = np.exp(theta)
        k, ux, wx, w = self.k, self.ux, self.wx, self.w
        log_aT = np.log(alpha + self.uT)[self.gT]
        log_at = np.log(alpha + self.ut)[self.gt]
        s = r + self.xg
        c1 = -s * log_aT
        with np.errstate(divide="ignore"):
            log_ratio_x = np.where(self.active_x, np.log(a) - np.log(np.maximum(b + ux + k - 1, 1e-300)), -np.inf)
        c2 = log_ratio_x[self.gx] - s * log_at
        hi = np.maximum(c1, c2)
        lse = hi + np.log1p(np.exp(-np.abs(c1 - c2)))
        pi2 = np.exp(c2 - lse)  # share of the "dropped out after t_x" term
        pi1 = 1.0 - pi2
        ll_x = (special.gammaln(r + ux) - special.gammaln(r) + r * np.log(alpha)
                + special.gammaln(a + b) + special.gammaln(b + ux + k) - special.gammaln(b)
                - special.gammaln(a + b + ux + k))
        ll = float(wx @ ll_x + w @ lse)
        inv_aT = (1.0 / (alpha + self.uT))[self.gT]
        inv_at = (1.0 / (alpha + self.ut))[self.gt]
        wpi2_x = np.bincount(self.gx, weights=w * pi2, minlength=len(ux))
        d_r = wx @ (special.digamma(r + ux) - special.digamma(r) + math.log(alpha)) - w @ (pi1 * log_aT + pi2 * log_at)
        d_alpha = self.total * r / alpha - w @ (s * (pi1 * inv_aT + pi2 * inv_at))
        psi_abxk = special.digamma(a + b + ux + k)
        d_a = wx @ (special.digamma(a + b) - psi_abxk) + wpi2_x.sum() / a
        inv_bx = np.where(self.active_x, 1.0 / np.maximum(b + ux + k - 1, 1e-300), 0.0)
        d_b = wx @ (special.digamma(a + b) + special.digamma(b + ux + k) - special.digamma(b) - psi_abxk) - wpi2_x @ inv_bx
        grad = np.array([d_r * r, d_alpha * alpha, d_a * a, d_b * b])
        return -ll / self.total, -grad / self.total


def fit_frequency_model(x: object, t_x: object, T: object, *, model: FrequencyModel = DEFAULT_MODEL,
                        weights: object = None) -> FrequencyFit:
    """Maximum-likelihood BG/NBD or MBG/NBD. x = repeat purchase periods, t_x = time of the last
    one since the first purchase, T = time since the first purchase (alpha comes out in that unit)."""
    started = time.perf_counter()
    k = _shift(model)
    x, t_x, T = _columns(x, t_x, T)
    _check_rfm(x, t_x, T)
    w = _weights(weights, x.size)
    keep = w > 0
    if not keep.any():
        raise NotEnoughData("no customers to fit the frequency model on")
    x, t_x, T, w = x[keep], t_x[keep], T[keep], w[keep]
    nll = _FrequencyLikelihood(k, x, t_x, T, w)
    # Start where the Gamma prior's mean rate matches the observed rate; a and b neutral.
    rate = float(w @ x) / max(float(w @ T), 1e-12)
    alpha0 = 1.0 / rate if rate > 0 else max(float(w @ T) / w.sum(), 1.0)
    theta0 = np.log([1.0, alpha0, 1.0, 1.0])
    theta, value, converged, iterations, message = minimise(nll, theta0)
    if k == 0 and not np.any(x > 0):
        converged, message = False, "no repeat purchases: BG/NBD's a and b are not identified"
    r, alpha, a, b = (float(v) for v in np.exp(theta))
    return FrequencyFit(model=model, r=r, alpha=alpha, a=a, b=b, log_likelihood=-value * nll.total,
                        converged=converged, customers=round(nll.total), iterations=iterations,
                        seconds=time.perf_counter() - started, message=message, distinct_rows=len(nll.w))


def _log_odds_dead(fit: FrequencyFit, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
    """log(P(dead)/P(alive)); -inf for a BG/NBD customer with no repeat purchase (alive for sure)."""
    k = _shift(fit.model)
    active = (x > 0) | (k == 1)
    out = np.full(x.shape, -np.inf)
    xa = x[active]
    out[active] = (math.log(fit.a) - np.log(fit.b + xa + k - 1)
                   + (fit.r + xa) * (np.log(fit.alpha + T[active]) - np.log(fit.alpha + t_x[active])))
    return out


def p_alive(fit: FrequencyFit, x: object, t_x: object, T: object) -> np.ndarray:
    """P(still a customer | x, t_x, T) = 1 / (1 + [x>0 or MBG] a/(b+x+k-1) ((alpha+T)/(alpha+t_x))^(r+x))."""
    x, t_x, T = _columns(x, t_x, T)
    _check_rfm(x, t_x, T)
    return special.expit(-_log_odds_dead(fit, x, t_x, T))


def _alive_purchases(fit: FrequencyFit, t: np.ndarray, x: np.ndarray, T: np.ndarray, r: float, a: float) -> np.ndarray:
    """E[purchases in (T, T+t] | alive, x, T]: the posterior of p is Beta(a, b+x+k), of lambda
    Gamma(r+x, alpha+T). The published form c/(a-1) [1 - ((alpha+T)/(alpha+T+t))^(r+x)
    2F1(r+x, b+x+k; c; z)], c = a+b+x+k-1, z = t/(alpha+T+t), is rewritten by Euler's
    transformation as c/(a-1) [1 - (1-z)^(a-1) 2F1(c-r-x, a-1; c; z)], whose 2F1 has small
    upper parameters and stays near 1 even for heavy buyers (no overflow, no cancellation in x)."""
    k = _shift(fit.model)
    c = a + fit.b + x + k - 1
    z = t / (fit.alpha + T + t)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = special.hyp2f1(c - r - x, a - 1, c, z)
        return c / (a - 1) * -np.expm1((a - 1) * np.log1p(-z) + np.log(h))


def expected_purchases(fit: FrequencyFit, t: object, x: object, t_x: object, T: object) -> np.ndarray:
    """E[repeat purchases in the next t | x, t_x, T] = P(alive) * E[purchases in t | alive]."""
    t, x, t_x, T = _columns(t, x, t_x, T)
    _check_rfm(x, t_x, T)
    if np.any(t < 0):
        raise ValueError("t must be >= 0")
    alive = special.expit(-_log_odds_dead(fit, x, t_x, T))
    return alive * _alive_purchases_grouped(fit, t.ravel(), x.ravel(), T.ravel()).reshape(x.shape)


def _alive_purchases_grouped(fit: FrequencyFit, t: np.ndarray, x: np.ndarray, T: np.ndarray) -> np.ndarray:
    # The alive part depends on (x, T, t) only, not on t_x: once per distinct triple.
    g = compress(x, T, t)
    (ux, uT, ut), (ix, iT, it) = g.uniques, g.index
    return _alive_purchases_stable(fit, ut[it], ux[ix], uT[iT])[g.inverse]


def _alive_purchases_stable(fit: FrequencyFit, t: np.ndarray, x: np.ndarray, T: np.ndarray) -> np.ndarray:
    r, a = fit.r, fit.a
    if abs(a - 1.0) < 1e-6:
        # c/(a-1) [...] is 0/0 at a = 1; the mean of a = 1 -+ 1e-4 is exact to O(1e-8).
        out = 0.5 * (_alive_purchases(fit, t, x, T, r, 1.0 - 1e-4) + _alive_purchases(fit, t, x, T, r, 1.0 + 1e-4))
    else:
        out = _alive_purchases(fit, t, x, T, r, a)
    # scipy's 2F1 loses digits near z = 1 when c - a - b (here r + x + 1 - a) is an integer
    # (its logarithmic case): the mean of r -+ 1e-6 is exact to O(1e-12) there.
    gap = r + x + 1 - a
    integer = np.abs(gap - np.round(gap)) < 1e-9
    if integer.any():
        sub = (t[integer], x[integer], T[integer])
        out[integer] = 0.5 * (_alive_purchases(fit, *sub, r - 1e-6, a) + _alive_purchases(fit, *sub, r + 1e-6, a))
    bad = ~np.isfinite(out)
    if bad.any():
        out[bad] = _alive_purchases_quadrature(fit, t[bad], x[bad], T[bad])
    return np.maximum(np.where(t == 0, 0.0, out), 0.0)


def _alive_purchases_quadrature(fit: FrequencyFit, t: np.ndarray, x: np.ndarray, T: np.ndarray,
                                nodes: int = 256) -> np.ndarray:
    """The same expectation as E_p[(1 - ((alpha+T)/(alpha+T+p t))^(r+x)) / p], p ~ Beta(a, b+x+k),
    by the midpoint rule on the quantile scale (nodes per distinct x): the fallback where
    scipy's 2F1 overflows (a and b in the millions: p is then nearly a point mass)."""
    k = _shift(fit.model)
    ux, ix = np.unique(x, return_inverse=True)
    u = (np.arange(nodes) + 0.5) / nodes
    p = np.maximum(stats.beta.ppf(u[None, :], fit.a, fit.b + ux[:, None] + k), 1e-300)[ix]
    g = -np.expm1(-(fit.r + x[:, None]) * np.log1p(p * (t / (fit.alpha + T))[:, None]))
    return (g / p).mean(axis=1)


class _SpendLikelihood:
    """-log L of Gamma-Gamma (Fader & Hardie 2013, eq. 2 with the nu prior integrated out):
        L(p, q, gamma | x, m) = G(px+q) / (G(px) G(q)) * gamma^q * m^(px-1) * x^(px)
                                / (gamma + m x)^(px+q)
    where x = repeat purchases and m = their mean spend. Terms in x alone are per distinct x."""

    def __init__(self, x: np.ndarray, m: np.ndarray, w: np.ndarray):
        g = compress(x, weights=w)
        self.ux, self.gx = g.uniques[0], g.inverse
        self.wx = g.weight
        self.x, self.m, self.w = x, m, w
        self.total = float(w.sum())
        log_m = np.log(m)
        self.sum_x_log_m = float(w @ (x * log_m))
        self.sum_log_m = float(w @ log_m)
        self.sum_x_log_x = float(self.wx @ (self.ux * np.log(self.ux)))
        self.mx = m * x

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        p, q, gamma = np.exp(theta)
        ux, wx, w = self.ux, self.wx, self.w
        log_gmx = np.log(gamma + self.mx)
        ll_x = special.gammaln(p * ux + q) - special.gammaln(p * ux) - special.gammaln(q)
        ll = (wx @ ll_x + self.total * q * math.log(gamma) + p * self.sum_x_log_m - self.sum_log_m
              + p * self.sum_x_log_x - w @ ((p * self.x + q) * log_gmx))
        psi = special.digamma(p * ux + q)
        d_p = wx @ (ux * (psi - special.digamma(p * ux))) + self.sum_x_log_m + self.sum_x_log_x - w @ (self.x * log_gmx)
        d_q = wx @ (psi - special.digamma(q)) + self.total * math.log(gamma) - w @ log_gmx
        d_gamma = self.total * q / gamma - w @ ((p * self.x + q) / (gamma + self.mx))
        grad = np.array([d_p * p, d_q * q, d_gamma * gamma])
        return -float(ll) / self.total, -grad / self.total


def fit_gamma_gamma(x: object, mean_value: object, *, weights: object = None) -> SpendFit:
    """Maximum-likelihood Gamma-Gamma on the customers with x > 0 and mean_value > 0 (the others
    carry no spend information and are left out). Raises NotEnoughData when none is left."""
    started = time.perf_counter()
    x, m = _columns(x, mean_value)
    w = _weights(weights, x.size)
    keep = (x > 0) & (m > 0) & (w > 0)
    if not keep.any():
        raise NotEnoughData("no repeat buyer with a positive mean spend to fit Gamma-Gamma on")
    x, m, w = x[keep], m[keep], w[keep]
    nll = _SpendLikelihood(x, m, w)
    # Method-of-moments-ish start: shape p ~ 1/CV^2 of spend, q a little above 1, gamma to match the mean.
    mean = float(w @ m) / nll.total
    var = float(w @ (m - mean) ** 2) / nll.total
    p0 = min(max(mean**2 / var, 0.1), 100.0) if var > 0 else 1.0
    theta0 = np.log([p0, 2.0, mean / p0])
    theta, value, converged, _, message = minimise(nll, theta0)
    p, q, gamma = (float(v) for v in np.exp(theta))
    population_mean = p * gamma / (q - 1) if q > 1 else mean
    return SpendFit(p=p, q=q, gamma=gamma, log_likelihood=-value * nll.total, converged=converged,
                    customers=round(nll.total), seconds=time.perf_counter() - started, message=message,
                    population_mean=population_mean)


def expected_spend(fit: SpendFit, x: object, mean_value: object) -> np.ndarray:
    """E[mean spend | x, m] = p (gamma + m x) / (p x + q - 1): a weighted mean of the population
    mean p gamma/(q-1) and the customer's own m (weight p x / (p x + q - 1)). x = 0 gives the
    population mean; where p x + q <= 1 the posterior mean does not exist and m stands in."""
    x, m = _columns(x, mean_value)
    if np.any(x < 0):
        raise ValueError("x must be >= 0")
    denominator = fit.p * x + fit.q - 1
    own = np.maximum(m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        posterior = fit.p * (fit.gamma + own * x) / denominator
    out = np.where(denominator > 0, posterior, own)
    return np.where(x == 0, fit.population_mean, out)


def customer_lifetime_value(freq: FrequencyFit, spend: SpendFit, x: object, t_x: object, T: object,
                            mean_value: object, *, horizon_days: float, margin_rate: float,
                            cost_per_purchase: float, annual_discount_rate: float,
                            step_days: float = 30) -> np.ndarray:
    """Discounted expected margin over the horizon, in steps (times in days):
        CLV = sum_k  dE_k * (S * margin_rate - cost_per_purchase) / (1 + annual_discount_rate)^(t_k / 365)
    t_k = min(k * step_days, horizon_days), k = 1..ceil(horizon_days / step_days); dE_k =
    E[Y(t_k)] - E[Y(t_(k-1))], the expected purchases in step k (expected_purchases); S =
    expected_spend; each step's margin is discounted from the end of the step. Reward costs
    (redemptions) are not in here: the churn service subtracts them."""
    if horizon_days < 0 or step_days <= 0:
        raise ValueError("need horizon_days >= 0 and step_days > 0")
    x, t_x, T, m = _columns(x, t_x, T, mean_value)
    _check_rfm(x, t_x, T)
    shape = x.shape
    x, t_x, T, m = x.ravel(), t_x.ravel(), T.ravel(), m.ravel()
    alive = special.expit(-_log_odds_dead(freq, x, t_x, T))
    unit_margin = expected_spend(spend, x, m) * margin_rate - cost_per_purchase
    g = compress(x, T)  # expected purchases once per distinct (x, T)
    (ux, uT), (ix, iT) = g.uniques, g.index
    gx, gT = ux[ix], uT[iT]
    steps = math.ceil(horizon_days / step_days) if horizon_days > 0 else 0
    discounted = np.zeros(len(gx))
    before = np.zeros(len(gx))
    for k in range(1, steps + 1):
        t_k = min(k * step_days, horizon_days)
        upto = _alive_purchases_stable(freq, np.full(len(gx), float(t_k)), gx, gT)
        discounted += (upto - before) / (1 + annual_discount_rate) ** (t_k / DAYS_PER_YEAR)
        before = upto
    return (alive * discounted[g.inverse] * unit_margin).reshape(shape)
