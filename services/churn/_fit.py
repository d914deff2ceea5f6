"""Numerical plumbing shared by the model fits: grouping identical rows, and a minimiser that
says honestly whether it found an identified optimum."""

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy import optimize

# Log-parameters are kept inside +-LOG_BOUND (e^25 ~ 7e10): far beyond any sensible value,
# close enough that the likelihood stays finite. A fit that ends near the bound is unidentified.
LOG_BOUND = 25.0
# Beyond 1e+-6 a parameter is heading for a limit (no heterogeneity in the rates, a point-mass
# dropout probability, ...) that the likelihood approaches without reaching: not an optimum the
# data identify, whatever the optimiser reports. Times and money must be in units that keep
# sensible parameters inside this range (days and currency units do).
AT_BOUND = math.log(1e6)


class NotEnoughData(ValueError):
    """The base holds no customer the model can be fitted on."""


class Grouped(NamedTuple):
    uniques: list[np.ndarray]   # per column, its distinct values (sorted)
    index: list[np.ndarray]     # per column, for each distinct row, the index into uniques
    weight: np.ndarray          # per distinct row, the summed weight of its rows
    inverse: np.ndarray         # per input row, its distinct row


def compress(*columns: np.ndarray, weights: np.ndarray | None = None) -> Grouped:
    """Distinct rows of equal-length 1-D columns. Each column is first reduced to its distinct
    values, then rows are keyed by one int64 made of the per-column codes."""
    n = columns[0].size
    uniques, codes = [], []
    for c in columns:
        u, i = np.unique(c, return_inverse=True)
        uniques.append(u)
        codes.append(i.astype(np.int64).ravel())
    span = 1
    for u in uniques:
        span *= max(len(u), 1)
    if span < 2**62:
        key = np.zeros(n, dtype=np.int64)
        for u, i in zip(uniques, codes):
            key = key * len(u) + i
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    else:  # too many distinct values to pack in an int64: sort the code rows instead
        _, first, inverse = np.unique(np.stack(codes, axis=1), axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    w = np.ones(n) if weights is None else weights
    weight = np.bincount(inverse, weights=w, minlength=len(first))
    return Grouped(uniques, [i[first] for i in codes], weight, inverse)


Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]


def minimise(objective: Objective, theta0: np.ndarray) -> tuple[np.ndarray, float, bool, int, str]:
    """Minimise a mean negative log-likelihood over log-parameters. Returns (theta, value,
    converged, iterations, message). converged needs: the optimiser succeeded, a finite value,
    no parameter at its bound, and a curvature that is positive in every direction (a flat
    direction means the data do not identify the model, whatever the optimiser says)."""
    bounds = [(-LOG_BOUND, LOG_BOUND)] * len(theta0)

    def safe(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = objective(theta)
        if not np.isfinite(value) or not np.all(np.isfinite(grad)):
            return 1e300, np.zeros_like(theta)
        return value, grad

    res = optimize.minimize(safe, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                            options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9})
    iterations, theta, value, ok = int(res.nit), res.x, float(res.fun), bool(res.success)
    message = "" if ok else f"L-BFGS-B: {res.message}"
    if not ok or value >= 1e300:
        nm = optimize.minimize(lambda th: safe(np.clip(th, -LOG_BOUND, LOG_BOUND))[0], theta, method="Nelder-Mead",
                               options={"maxiter": 4000, "xatol": 1e-8, "fatol": 1e-12})
        iterations += int(nm.nit)
        if float(nm.fun) <= value:
            theta, value, ok = np.clip(nm.x, -LOG_BOUND, LOG_BOUND), float(nm.fun), bool(nm.success)
            message = "" if ok else f"Nelder-Mead: {nm.message}"
    if not np.isfinite(value) or value >= 1e300:
        return np.asarray(theta0, dtype=float), float("inf"), False, iterations, "likelihood not finite"
    if ok and np.any(np.abs(theta) >= AT_BOUND):
        ok, message = False, "a parameter ran past 1e+-6 towards a limit: the data do not identify the model"
    if ok and not _curved(safe, theta):
        ok, message = False, "the likelihood is flat in some direction: the data do not identify the model"
    return theta, value, ok, iterations, message


def _curved(objective: Objective, theta: np.ndarray, step: float = 1e-4) -> bool:
    """True when the Hessian of the mean -log L (central differences of the analytic
    gradient) is positive definite with a condition number below 1e10."""
    n = len(theta)
    hess = np.empty((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = step
        hess[:, j] = (objective(theta + e)[1] - objective(theta - e)[1]) / (2 * step)
    hess = 0.5 * (hess + hess.T)
    if not np.all(np.isfinite(hess)):
        return False
    eig = np.linalg.eigvalsh(hess)
    return bool(eig[0] > 0 and eig[0] > 1e-10 * eig[-1])
