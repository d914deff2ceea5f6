"""E[purchases in the next t | alive] for BG/NBD and MBG/NBD, accurate where scipy's 2F1 is not:
the numerics behind models.expected_purchases and models.customer_lifetime_value."""

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import special

if TYPE_CHECKING:
    from services.churn.models import FrequencyFit


def _shift(fit: "FrequencyFit") -> int:
    return 1 if fit.model == "mbgnbd" else 0


def _alive_purchases(fit: "FrequencyFit", t: np.ndarray, x: np.ndarray, T: np.ndarray, r: float, a: float) -> np.ndarray:
    """E[purchases in (T, T+t] | alive, x, T]: the posterior of p is Beta(a, b+x+k), of lambda
    Gamma(r+x, alpha+T). The published form c/(a-1) [1 - ((alpha+T)/(alpha+T+t))^(r+x)
    2F1(r+x, b+x+k; c; z)], c = a+b+x+k-1, z = t/(alpha+T+t), is rewritten by Euler's
    transformation as c/(a-1) [1 - (1-z)^(a-1) 2F1(c-r-x, a-1; c; z)], whose 2F1 has small
    upper parameters and stays near 1 even for heavy buyers (no overflow, no cancellation in x)."""
    k = _shift(fit)
    c = a + fit.b + x + k - 1
    z = t / (fit.alpha + T + t)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = special.hyp2f1(c - r - x, a - 1, c, z)
        return c / (a - 1) * -np.expm1((a - 1) * np.log1p(-z) + np.log(h))


def alive_purchases(fit: "FrequencyFit", t: np.ndarray, x: np.ndarray, T: np.ndarray) -> np.ndarray:
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


def _alive_purchases_quadrature(fit: "FrequencyFit", t: np.ndarray, x: np.ndarray, T: np.ndarray) -> np.ndarray:
    """The same expectation as E_p[(1 - ((alpha+T)/(alpha+T+p t))^(r+x)) / p], p ~ Beta(a, b+x+k),
    by composite Gauss-Legendre: the fallback where scipy's 2F1 overflows or goes wrong (z
    near 1 with a large, or a and b in the millions). p <= 1/2 is integrated on the log p scale,
    p >= 1/2 on the log(1-p) scale, where the Beta's spikes at 0 and 1, the integrand's step at
    p ~ 1/(r+x)u and a near point-mass Beta are all smooth, with breakpoints at each of them."""
    k = _shift(fit)
    a = fit.a
    big_b = fit.b + x + k
    s, u = fit.r + x, t / (fit.alpha + T)
    log_norm = special.betaln(a, big_b)
    half = math.log(0.5)
    mean = a / (a + big_b)
    spread = 8 * np.sqrt(big_b / (a * (a + big_b + 1)))  # 8 sd of log p (and of log(1-p), mirrored)
    step = -np.log(np.maximum(s * u, 1e-300))
    lower = np.minimum(-60.0 / a, step - 60.0)
    low = np.stack([lower, step - 5, step + 5, np.log(mean) - spread, np.log(mean) + spread,
                    np.full_like(lower, half)], axis=1)
    lower_w = np.minimum(-60.0 / big_b, half - 1)
    log_rest = np.log1p(-mean)
    spread_w = 8 * np.sqrt(a / (big_b * (a + big_b + 1)))
    high = np.stack([lower_w, log_rest - spread_w, log_rest + spread_w, np.full_like(lower_w, half)], axis=1)

    def integrate(breaks: np.ndarray, lo: np.ndarray, log_weight: object) -> np.ndarray:
        breaks = np.sort(np.clip(breaks, lo[:, None], half), axis=1)
        nodes, weights = np.polynomial.legendre.leggauss(48)
        left, right = breaks[:, :-1, None], breaks[:, 1:, None]
        v = left + (right - left) * (nodes + 1) / 2
        return (np.exp(log_weight(v)) * weights * (right - left) / 2).sum(axis=(1, 2))

    col = (-1, 1, 1)
    log_s, log_u = np.log(s).reshape(col), np.log(np.maximum(u, 1e-300)).reshape(col)

    def log_g(log_p: np.ndarray) -> np.ndarray:
        """log of (1 - (1 + p u)^-s) / p, from log p: exact where p underflows (it tends to s u)."""
        log_pu = log_p + log_u
        log_log1p = np.where(log_pu < -30, log_pu, np.log(np.log1p(np.exp(log_pu))))
        log_y = log_s + log_log1p
        return np.where(log_y < -30, log_y, np.log(-np.expm1(-np.exp(log_y)))) - log_p

    def low_part(v: np.ndarray) -> np.ndarray:  # p = e^v, dp = p dv
        return a * v + (big_b.reshape(col) - 1) * np.log1p(-np.exp(v)) - log_norm.reshape(col) + log_g(v)

    def high_part(w: np.ndarray) -> np.ndarray:  # 1 - p = e^w, dp = -(1-p) dw
        log_p = np.log(-np.expm1(w))
        return (a - 1) * log_p + big_b.reshape(col) * w - log_norm.reshape(col) + log_g(log_p)

    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        return integrate(low, lower, low_part) + integrate(high, lower_w, high_part)
