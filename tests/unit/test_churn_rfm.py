"""RFM scoring for the churn service (services/churn/rfm.py, re-exported by models.py):
quintile cut points, scores 1..5 either way round, and the recency x frequency segment grid."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.churn import models as m


def test_quintile_edges_are_the_20_40_60_80th_percentiles():
    assert m.quintile_edges(np.arange(1, 101)) == pytest.approx((20.8, 40.6, 60.4, 80.2))
    assert m.quintile_edges([3.0, float("nan"), 3.0]) == (3.0, 3.0, 3.0, 3.0)


def test_quintiles_of_nothing_are_not_enough_data():
    with pytest.raises(m.NotEnoughData):
        m.quintile_edges([])


def test_scores_run_from_1_to_5_with_a_value_on_an_edge_taking_the_lower_quintile():
    edges = (10.0, 20.0, 30.0, 40.0)
    assert [m.quintile_score(v, edges) for v in (0, 10, 10.5, 20, 25, 35, 40, 41)] == [1, 1, 2, 2, 3, 4, 4, 5]


def test_recency_in_days_scores_5_for_the_most_recent():
    edges = (7.0, 30.0, 90.0, 180.0)
    assert [m.quintile_score(d, edges, higher_is_better=False) for d in (0, 7, 8, 60, 120, 365)] == [5, 5, 4, 3, 2, 1]


def test_a_base_of_mostly_one_time_buyers_puts_them_all_in_the_lowest_frequency_quintile():
    purchases = np.array([1] * 70 + [2] * 20 + [5] * 10)
    edges = m.quintile_edges(purchases)
    scores = m.quintile_scores(purchases, edges)
    assert set(scores[:70]) == {1} and scores[-1] == 5


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200), st.floats(-2e6, 2e6), st.booleans())
def test_a_score_is_always_1_to_5_and_monotone(values, probe, higher_is_better):
    edges = m.quintile_edges(values)
    score = m.quintile_score(probe, edges, higher_is_better=higher_is_better)
    assert 1 <= score <= 5
    above = m.quintile_score(probe + 1e6, edges, higher_is_better=higher_is_better)
    assert above >= score if higher_is_better else above <= score


@pytest.mark.parametrize(("r", "f", "name"), [
    (5, 5, "Champions"), (5, 4, "Champions"), (4, 5, "Loyal"), (3, 4, "Loyal"),
    (5, 2, "Potential loyalist"), (4, 3, "Potential loyalist"), (5, 1, "New"), (4, 1, "Promising"),
    (3, 3, "Need attention"), (3, 1, "About to sleep"), (3, 2, "About to sleep"), (2, 3, "At risk"),
    (1, 4, "At risk"), (2, 5, "Can't lose them"), (1, 5, "Can't lose them"), (2, 2, "Hibernating"),
    (2, 1, "Hibernating"), (1, 1, "Lost"), (1, 2, "Lost"),
])
def test_segment_reads_the_recency_by_frequency_grid(r, f, name):
    assert m.segment(r, f) == name


def test_the_grid_has_eleven_segments_each_of_them_used():
    used = {m.segment(r, f) for r in range(1, 6) for f in range(1, 6)}
    assert used == set(m.SEGMENTS) and len(m.SEGMENTS) == 11


def test_a_missing_value_is_refused_rather_than_scored():
    with pytest.raises(ValueError, match="finite"):
        m.quintile_score(float("nan"), (1.0, 2.0, 3.0, 4.0))


@pytest.mark.parametrize(("r", "f"), [(0, 3), (6, 1), (3, 0), (3, 6)])
def test_a_score_outside_1_to_5_is_refused(r, f):
    with pytest.raises(ValueError, match="1..5"):
        m.segment(r, f)
