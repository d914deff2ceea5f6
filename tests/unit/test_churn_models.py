"""The churn service's customer-base models (services/churn/models.py): published known answers
on the CDNOW sample, an independent reference for MBG/NBD, the day/week equivalence, properties
of P(alive) and expected purchases, the edge cases a real base throws at a fit, and CLV."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, special

from services.churn import models as m

CDNOW = Path(__file__).resolve().parents[1] / "fixtures" / "cdnow"
WEEK_DAYS = 7.0


def cdnow_summary() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(CDNOW / "cdnow_customers_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return tuple(np.array([float(r[c]) for r in rows]) for c in ("frequency", "recency", "T"))


def cdnow_spend() -> tuple[np.ndarray, np.ndarray]:
    with open(CDNOW / "cdnow_customers_summary_with_transactions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([float(r["x"]) for r in rows]), np.array([float(r["zbar"]) for r in rows])


@pytest.fixture(scope="module")
def bgnbd_weeks() -> m.FrequencyFit:
    return m.fit_frequency_model(*cdnow_summary(), model="bgnbd")


@pytest.fixture(scope="module")
def mbgnbd_weeks() -> m.FrequencyFit:
    return m.fit_frequency_model(*cdnow_summary(), model="mbgnbd")


# -- published known answers ---------------------------------------------------------------

def test_bgnbd_on_cdnow_gives_the_parameters_published_by_fader_hardie_and_lee(bgnbd_weeks):
    # FHL (2005), section 5: r = 0.243, alpha = 4.414, a = 0.793, b = 2.426, LL = -9582.4.
    f = bgnbd_weeks
    assert f.converged and f.customers == 2357
    assert (round(f.r, 2), round(f.alpha, 2), round(f.a, 2), round(f.b, 2)) == (0.24, 4.41, 0.79, 2.43)
    assert f.r == pytest.approx(0.243, abs=5e-4) and f.alpha == pytest.approx(4.414, abs=5e-4)
    assert f.a == pytest.approx(0.793, abs=5e-4) and f.b == pytest.approx(2.426, abs=5e-4)
    assert f.log_likelihood == pytest.approx(-9582.4, abs=0.05)


def test_bgnbd_expects_1_226_purchases_in_39_weeks_from_the_published_customer(bgnbd_weeks):
    # FHL (2005): x = 2, t_x = 30.43, T = 38.86 weeks -> 1.226 expected purchases in weeks 40-78.
    assert float(m.expected_purchases(bgnbd_weeks, 39, 2, 30.43, 38.86)[0]) == pytest.approx(1.226, abs=5e-4)


def test_gamma_gamma_on_cdnow_repeat_buyers_gives_the_parameters_published_by_fader_and_hardie():
    # Fader & Hardie (2013), "The Gamma-Gamma model of monetary value": p = 6.25, q = 3.74, gamma = 15.44.
    x, zbar = cdnow_spend()
    g = m.fit_gamma_gamma(x, zbar)
    assert g.converged and g.customers == 946
    assert (round(g.p, 2), round(g.q, 2)) == (6.25, 3.74)
    # gamma comes out 15.4477 here and in lifetimes alike: the shipped zbar is rounded to the
    # cent, the published 15.44 was fitted on the unrounded spend; it agrees within 0.01.
    assert g.gamma == pytest.approx(15.44, abs=0.01)
    assert (g.p, g.q, g.gamma) == pytest.approx((6.248803, 3.744588, 15.447748), abs=1e-4)  # lifetimes 0.11.3
    # lifetimes 0.11.3 GammaGammaFitter on the same data: 24.6586 for x = 2, zbar = 22.35.
    assert float(m.expected_spend(g, 2, 22.35)[0]) == pytest.approx(24.65862, abs=1e-4)
    assert float(m.expected_spend(g, 0, 0.0)[0]) == pytest.approx(g.p * g.gamma / (g.q - 1))


def test_mbgnbd_on_cdnow_matches_lifetimes_modified_beta_geo_fitter(mbgnbd_weeks):
    # Reference values from lifetimes 0.11.3 ModifiedBetaGeoFitter(penalizer_coef=0).fit on the
    # same file, run once in a throw-away venv (numpy 2.4.6, scipy 1.17.1, autograd 1.9.1):
    # r = 0.524838, alpha = 6.182988, a = 0.891356, b = 1.614; conditional expected purchases in
    # 39 weeks for (2, 30.43, 38.86) = 1.2626708; P(alive) = 0.7061263 for it and 0.3897164 for
    # a one-time buyer (0, 0, 38.86). Both implement Batislam et al. (2007), eq. 5 and 8.
    f = mbgnbd_weeks
    assert f.converged
    assert f.r == pytest.approx(0.524838, abs=1e-4) and f.alpha == pytest.approx(6.182988, abs=1e-3)
    assert f.a == pytest.approx(0.891356, abs=1e-4) and f.b == pytest.approx(1.614, abs=1e-3)
    assert float(m.expected_purchases(f, 39, 2, 30.43, 38.86)[0]) == pytest.approx(1.2626708, abs=1e-5)
    np.testing.assert_allclose(m.p_alive(f, [2, 0], [30.43, 0], [38.86, 38.86]), [0.7061263, 0.3897164], atol=1e-5)
    # MBG/NBD fits CDNOW at least as well as BG/NBD with the same number of parameters.
    assert f.log_likelihood > -9582.4


@pytest.mark.parametrize("model", ["bgnbd", "mbgnbd"])
def test_a_fit_in_days_gives_the_same_r_a_b_and_seven_times_alpha(model):
    x, t_x, T = cdnow_summary()
    weeks = m.fit_frequency_model(x, t_x, T, model=model)
    days = m.fit_frequency_model(x, t_x * WEEK_DAYS, T * WEEK_DAYS, model=model)
    assert days.converged
    assert days.r == pytest.approx(weeks.r, rel=1e-6) and days.a == pytest.approx(weeks.a, rel=1e-6)
    assert days.b == pytest.approx(weeks.b, rel=1e-6)
    assert days.alpha == pytest.approx(weeks.alpha * WEEK_DAYS, rel=1e-6)
    # The density of the purchase times changes by 7 per repeat purchase; nothing else.
    assert days.log_likelihood == pytest.approx(weeks.log_likelihood - x.sum() * math.log(WEEK_DAYS), abs=1e-4)
    assert m.expected_purchases(days, 39 * WEEK_DAYS, 2, 30.43 * WEEK_DAYS, 38.86 * WEEK_DAYS)[0] == pytest.approx(
        m.expected_purchases(weeks, 39, 2, 30.43, 38.86)[0], rel=1e-6)


# -- an independent computation of the expectation ------------------------------------------

def expected_purchases_by_integration(f: m.FrequencyFit, t: float, x: float, t_x: float, T: float) -> float:
    """P(alive) * E_p[(1 - ((alpha+T)/(alpha+T+p t))^(r+x)) / p], p ~ Beta(a, b+x+k), by quad."""
    k = 1 if f.model == "mbgnbd" else 0
    beta_b = f.b + x + k

    def integrand(p: float) -> float:
        density = math.exp((f.a - 1) * math.log(p) + (beta_b - 1) * math.log1p(-p) - special.betaln(f.a, beta_b))
        return density * -math.expm1(-(f.r + x) * math.log1p(p * t / (f.alpha + T))) / p

    # points: the mode of the Beta, so quad sees a nearly point-mass density.
    mode = min(max((f.a - 1) / (f.a + beta_b - 2), 1e-9), 1 - 1e-9) if f.a > 1 and beta_b > 1 else 0.5
    value, _ = integrate.quad(integrand, 0, 1, points=[mode], limit=400, epsabs=1e-13, epsrel=1e-11)
    return float(m.p_alive(f, x, t_x, T)[0]) * value


@pytest.mark.parametrize("model", ["bgnbd", "mbgnbd"])
@pytest.mark.parametrize("a", [0.35, 0.9999999, 1.0, 2.7])
@pytest.mark.parametrize("customer", [(0, 0, 300), (2, 120, 300), (40, 280, 300), (250, 729, 730)])
def test_expected_purchases_agree_with_direct_integration_over_the_dropout_probability(model, a, customer):
    f = m.FrequencyFit(model=model, r=0.8, alpha=45.0, a=a, b=2.4, log_likelihood=0.0, converged=True,
                       customers=1, iterations=0, seconds=0.0)
    for t in (1.0, 90.0, 365.0, 3650.0):
        got = float(m.expected_purchases(f, t, *customer)[0])
        assert got == pytest.approx(expected_purchases_by_integration(f, t, *customer), rel=1e-6, abs=1e-12)


def test_expected_purchases_stay_finite_when_dropout_is_nearly_a_point_mass():
    # a and b in the millions (a small base can push a fit there): scipy's 2F1 overflows and
    # the quantile-quadrature fallback answers; p ~ 0.25 almost surely.
    f = m.FrequencyFit(model="mbgnbd", r=0.8, alpha=45.0, a=2.0e6, b=6.0e6, log_likelihood=0.0, converged=False,
                       customers=1, iterations=0, seconds=0.0)
    got = m.expected_purchases(f, 90.0, [0, 3], [0, 100], [200, 200])
    assert np.all(np.isfinite(got))
    for value, (x, t_x, T) in zip(got, [(0, 0, 200), (3, 100, 200)]):
        assert value == pytest.approx(expected_purchases_by_integration(f, 90.0, x, t_x, T), rel=1e-3)


# -- properties ----------------------------------------------------------------------------

customers = st.tuples(st.integers(0, 300), st.floats(0, 1), st.floats(0, 2000)).map(
    lambda c: (float(c[0]), 0.0 if c[0] == 0 else c[1] * c[2], c[2]))
fits = st.builds(
    lambda model, r, alpha, a, b: m.FrequencyFit(model=model, r=r, alpha=alpha, a=a, b=b, log_likelihood=0.0,
                                                 converged=True, customers=1, iterations=0, seconds=0.0),
    st.sampled_from(["bgnbd", "mbgnbd"]), st.floats(0.01, 20), st.floats(0.1, 5000), st.floats(0.01, 50),
    st.floats(0.01, 50))


@settings(max_examples=300, deadline=None)
@given(fits, customers)
def test_p_alive_is_a_probability(f, customer):
    value = float(m.p_alive(f, *customer)[0])
    assert 0.0 <= value <= 1.0


@settings(max_examples=300, deadline=None)
@given(fits, customers)
def test_expected_purchases_are_non_negative_and_grow_with_the_horizon(f, customer):
    horizons = np.array([0.0, 1.0, 30.0, 90.0, 365.0, 1000.0])
    values = m.expected_purchases(f, horizons, *customer)
    assert np.all(np.isfinite(values)) and values[0] == 0.0
    assert np.all(values >= 0) and np.all(np.diff(values) >= -1e-12 * np.maximum(values[1:], 1))


@settings(max_examples=200, deadline=None)
@given(fits)
def test_a_one_time_buyer_fades_under_mbgnbd_and_stays_alive_under_bgnbd(f):
    T = np.array([0.0, 10.0, 100.0, 1000.0])
    alive = m.p_alive(f, np.zeros(4), np.zeros(4), T)
    if f.model == "mbgnbd":
        assert np.all(np.diff(alive) < 0)
    else:
        assert np.all(alive == 1.0)


def test_p_alive_of_a_repeat_buyer_falls_with_the_time_since_the_last_purchase(mbgnbd_weeks):
    assert np.all(np.diff(m.p_alive(mbgnbd_weeks, 3, 10.0, np.array([10.0, 20, 40, 80]))) < 0)


# -- edge cases ----------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["bgnbd", "mbgnbd"])
@pytest.mark.parametrize("base", [
    pytest.param((np.zeros(50), np.zeros(50), np.linspace(1, 300, 50)), id="all-one-time-buyers"),
    pytest.param(([0.0], [0.0], [40.0]), id="a-single-one-time-buyer"),
    pytest.param(([2.0], [30.0], [40.0]), id="a-single-repeat-buyer"),
    pytest.param((np.zeros(3), np.zeros(3), np.zeros(3)), id="all-bought-today"),
])
def test_a_base_that_cannot_identify_the_model_gives_a_finite_unconverged_fit(model, base):
    f = m.fit_frequency_model(*base, model=model)
    assert not f.converged and f.message
    assert all(math.isfinite(v) and v > 0 for v in (f.r, f.alpha, f.a, f.b)) and math.isfinite(f.log_likelihood)
    assert np.all(np.isfinite(m.p_alive(f, *base))) and np.all(np.isfinite(m.expected_purchases(f, 90, *base)))


def test_an_empty_base_raises_not_enough_data():
    with pytest.raises(m.NotEnoughData):
        m.fit_frequency_model([], [], [])
    with pytest.raises(m.NotEnoughData):
        m.fit_frequency_model([1.0], [2.0], [3.0], weights=[0.0])
    with pytest.raises(m.NotEnoughData):
        m.fit_gamma_gamma([0.0, 0.0], [0.0, 0.0])


def test_impossible_customer_data_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="t_x <= T"):
        m.fit_frequency_model([1.0], [5.0], [3.0])
    with pytest.raises(ValueError, match="finite"):
        m.p_alive(m.fit_frequency_model(*cdnow_summary()), [1.0], [float("nan")], [3.0])


def test_a_gamma_gamma_fit_on_one_repeat_buyer_is_finite_and_unconverged():
    g = m.fit_gamma_gamma([2.0], [10.0])
    assert not g.converged and all(math.isfinite(v) for v in (g.p, g.q, g.gamma, g.population_mean))
    assert np.all(np.isfinite(m.expected_spend(g, [0, 2], [0.0, 10.0])))


@pytest.mark.parametrize("model", ["bgnbd", "mbgnbd"])
def test_weights_fit_the_same_as_repeated_rows(model):
    x, t_x, T = cdnow_summary()
    first = slice(0, 400)
    repeats = np.arange(400) % 3 + 1
    weighted = m.fit_frequency_model(x[first], t_x[first], T[first], model=model, weights=repeats)
    expanded = m.fit_frequency_model(np.repeat(x[first], repeats), np.repeat(t_x[first], repeats),
                                     np.repeat(T[first], repeats), model=model)
    assert weighted.customers == expanded.customers == int(repeats.sum())
    for name in ("r", "alpha", "a", "b", "log_likelihood"):
        assert getattr(weighted, name) == pytest.approx(getattr(expanded, name), rel=1e-6)


# -- spend and lifetime value --------------------------------------------------------------

def test_expected_spend_shrinks_a_customer_mean_towards_the_population_mean():
    g = m.SpendFit(p=6.0, q=4.0, gamma=15.0, log_likelihood=0.0, converged=True, customers=1, seconds=0.0,
                   population_mean=30.0)
    few, many = m.expected_spend(g, [1, 50], [100.0, 100.0])
    assert 30.0 < few < many < 100.0
    assert few == pytest.approx(6.0 * (15.0 + 100.0) / (6.0 + 4.0 - 1))


def test_lifetime_value_is_the_discounted_margin_of_the_expected_purchases_step_by_step(mbgnbd_weeks):
    days = m.FrequencyFit(model="mbgnbd", r=mbgnbd_weeks.r, alpha=mbgnbd_weeks.alpha * WEEK_DAYS, a=mbgnbd_weeks.a,
                          b=mbgnbd_weeks.b, log_likelihood=0.0, converged=True, customers=1, iterations=0, seconds=0.0)
    g = m.SpendFit(p=6.25, q=3.74, gamma=15.44, log_likelihood=0.0, converged=True, customers=1, seconds=0.0,
                   population_mean=6.25 * 15.44 / 2.74)
    x, t_x, T, mean = np.array([0.0, 2, 7]), np.array([0.0, 213, 245]), np.array([272.0, 272, 272]), np.array([0.0, 22, 40])
    terms = {"margin_rate": 0.3, "cost_per_purchase": 1.5, "annual_discount_rate": 0.1}
    clv = m.customer_lifetime_value(days, g, x, t_x, T, mean, horizon_days=365, step_days=30, **terms)
    unit = m.expected_spend(g, x, mean) * 0.3 - 1.5
    edges = [min(k * 30, 365) for k in range(1, 14)]
    upto = [m.expected_purchases(days, t, x, t_x, T) for t in [0] + edges]
    by_hand = sum((upto[k] - upto[k - 1]) * unit / 1.1 ** (edges[k - 1] / 365) for k in range(1, 14))
    np.testing.assert_allclose(clv, by_hand, rtol=1e-9)
    undiscounted = m.customer_lifetime_value(days, g, x, t_x, T, mean, horizon_days=365, margin_rate=0.3,
                                             cost_per_purchase=1.5, annual_discount_rate=0.0, step_days=365)
    np.testing.assert_allclose(undiscounted, m.expected_purchases(days, 365, x, t_x, T) * unit, rtol=1e-9)
    assert np.all(undiscounted > clv)


def test_fits_recover_the_parameters_a_synthetic_base_was_drawn_from():
    from bench.churn_models import TRUE_FREQUENCY, TRUE_SPEND, simulate

    base = simulate(200_000, seed=11)
    f = m.fit_frequency_model(base["x"], base["t_x"], base["T"])
    g = m.fit_gamma_gamma(base["x"], base["mean_value"])
    assert f.model == m.DEFAULT_MODEL == "mbgnbd" and f.converged and g.converged
    for name, truth in TRUE_FREQUENCY.items():
        assert getattr(f, name) == pytest.approx(truth, rel=0.06), name
    for name, truth in TRUE_SPEND.items():
        assert getattr(g, name) == pytest.approx(truth, rel=0.06), name
