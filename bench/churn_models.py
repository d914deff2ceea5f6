"""Benchmark: fit and score a synthetic customer base with the churn service's models.

    .venv/bin/python -m bench.churn_models [--customers 1000000] [--seed 7]

Draws a base from known MBG/NBD and Gamma-Gamma parameters at day resolution (each customer
joins uniformly over the last two years; purchases Poisson in continuous time at rate
lambda ~ Gamma(r, alpha); after the first purchase and after each repeat the customer drops out
with probability p ~ Beta(a, b); times recorded in whole days; with --purchase-days a second
purchase on one day is not counted, as the service counts x, which the continuous-time model
does not know about: the recovered parameters then carry that bias); the spend of each repeat
purchase is Gamma(p, nu) with nu ~ Gamma(q, gamma)), then fits MBG/NBD and
Gamma-Gamma and scores every customer: P(alive), expected purchases in 90 days, expected spend,
and a 365-day CLV in 30-day steps. Prints one JSON line: wall and CPU seconds per phase, the
total for fit + score, the distinct rows the fit saw, and each recovered parameter's relative
error against the true one.
"""

import argparse
import json
import time

import numpy as np

from services.churn import models

TRUE_FREQUENCY = {"r": 0.55, "alpha": 42.0, "a": 0.9, "b": 1.6}  # alpha in days (CDNOW-like)
TRUE_SPEND = {"p": 6.25, "q": 3.74, "gamma": 15.44}
HISTORY_DAYS = 730


def simulate(customers: int, seed: int, *, purchase_days: bool = False) -> dict[str, np.ndarray]:
    """x, t_x, T (days, integer) and the mean repeat spend of a synthetic base. purchase_days:
    count a second purchase on the same day as none (as the service's x does) instead of
    counting every purchase the model makes."""
    rng = np.random.default_rng(seed)
    f = TRUE_FREQUENCY
    T = rng.integers(0, HISTORY_DAYS + 1, customers).astype(np.float64)
    lam = rng.gamma(f["r"], 1.0 / f["alpha"], customers)
    p = rng.beta(f["a"], f["b"], customers)
    # MBG/NBD: the number of purchases made before dropping out is geometric on 0, 1, 2, ...
    # (a drop-out chance after the first purchase and after each repeat one).
    survivals = rng.geometric(p) - 1
    # Purchases happen in continuous time from the first one (at a uniform moment u0 of day 0);
    # the base is observed at the same time of day T days later; t_x is the day of the last
    # purchase, so times are whole days with no bias (the model's exposure is exactly T).
    u0 = rng.random(customers)
    x = np.zeros(customers)
    t_x = np.zeros(customers)
    clock = np.zeros(customers)
    last_day = np.zeros(customers)
    left = survivals.astype(np.int64)
    active = np.flatnonzero((left > 0) & (T > 0))
    # Simulate the gaps in rounds, all still-active customers at once: a million in seconds.
    while active.size:
        clock[active] += rng.exponential(1.0, active.size) / lam[active]
        active = active[clock[active] <= T[active]]
        day = np.floor(u0[active] + clock[active])
        new_day = day > last_day[active] if purchase_days else np.ones(active.size, dtype=bool)
        counted = active[new_day]
        x[counted] += 1
        t_x[counted] = day[new_day]
        last_day[counted] = day[new_day]
        left[active] -= 1
        active = active[left[active] > 0]
    s = TRUE_SPEND
    nu = rng.gamma(s["q"], 1.0 / s["gamma"], customers)
    # The mean of x Gamma(p, nu) spends is Gamma(p x, nu x) distributed.
    repeat = x > 0
    mean_value = np.zeros(customers)
    mean_value[repeat] = rng.gamma(s["p"] * x[repeat], 1.0 / (nu[repeat] * x[repeat]))
    return {"x": x, "t_x": t_x, "T": T, "mean_value": mean_value}


def timed(phases: dict, name: str, fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    phases[name] = {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--purchase-days", action="store_true", help="count purchase days, not purchases")
    args = parser.parse_args()
    phases: dict[str, dict[str, float]] = {}
    base = timed(phases, "simulate", simulate, args.customers, args.seed, purchase_days=args.purchase_days)
    x, t_x, T, mean_value = base["x"], base["t_x"], base["T"], base["mean_value"]
    freq = timed(phases, "fit_mbgnbd", models.fit_frequency_model, x, t_x, T, model="mbgnbd")
    spend = timed(phases, "fit_gamma_gamma", models.fit_gamma_gamma, x, mean_value)
    alive = timed(phases, "score_p_alive", models.p_alive, freq, x, t_x, T)
    purchases = timed(phases, "score_expected_purchases_90d", models.expected_purchases, freq, 90.0, x, t_x, T)
    spend_each = timed(phases, "score_expected_spend", models.expected_spend, spend, x, mean_value)
    clv = timed(phases, "score_clv_365d", models.customer_lifetime_value, freq, spend, x, t_x, T, mean_value,
                horizon_days=365, margin_rate=0.3, cost_per_purchase=1.0, annual_discount_rate=0.1, step_days=30)
    work = [k for k in phases if k != "simulate"]
    total = {"wall_s": round(sum(phases[k]["wall_s"] for k in work), 3),
             "cpu_s": round(sum(phases[k]["cpu_s"] for k in work), 3)}
    recovered = {"r": freq.r, "alpha": freq.alpha, "a": freq.a, "b": freq.b,
                 "p": spend.p, "q": spend.q, "gamma": spend.gamma}
    truth = {**TRUE_FREQUENCY, **TRUE_SPEND}
    scores = np.concatenate([alive, purchases, spend_each, clv])
    print(json.dumps({
        "bench": "churn_models", "customers": args.customers, "seed": args.seed, "purchase_days": args.purchase_days,
        "repeat_buyers": int((x > 0).sum()), "distinct_rows": freq.distinct_rows,
        "phases": phases, "fit_and_score": total,
        "converged": {"mbgnbd": freq.converged, "gamma_gamma": spend.converged},
        "iterations_mbgnbd": freq.iterations,
        "true": truth, "recovered": {k: round(v, 4) for k, v in recovered.items()},
        "relative_error": {k: round(recovered[k] / truth[k] - 1, 4) for k in truth},
        "all_scores_finite": bool(np.all(np.isfinite(scores))),
        "mean": {"p_alive": round(float(alive.mean()), 4), "expected_purchases_90d": round(float(purchases.mean()), 4),
                 "expected_spend": round(float(spend_each.mean()), 3), "clv_365d": round(float(clv.mean()), 3)},
    }))


if __name__ == "__main__":
    main()
