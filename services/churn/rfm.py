"""RFM scoring for the churn service: quintile scores 1..5 and the recency x frequency segment
grid (MODELS.md has the table). Pure functions."""

import numpy as np

from services.churn._fit import NotEnoughData

# (segment, recency scores, frequency scores): the widely used 5 x 5 recency x frequency grid,
# with its bottom-left corner split so that R=1 is "Lost" and R=2 "Hibernating".
_GRID: tuple[tuple[str, str, str], ...] = (
    ("Champions", "5", "45"),
    ("Loyal", "34", "45"),
    ("Potential loyalist", "45", "23"),
    ("New", "5", "1"),
    ("Promising", "4", "1"),
    ("Need attention", "3", "3"),
    ("About to sleep", "3", "12"),
    ("At risk", "12", "34"),
    ("Can't lose them", "12", "5"),
    ("Hibernating", "2", "12"),
    ("Lost", "1", "12"),
)
SEGMENTS: tuple[str, ...] = tuple(name for name, _, _ in _GRID)
_BY_SCORES = {(int(r), int(f)): name for name, rs, fs in _GRID for r in rs for f in fs}
assert len(_BY_SCORES) == 25, "the grid must cover each of the 25 cells exactly once"


def quintile_edges(values: object) -> tuple[float, float, float, float]:
    """The 20th, 40th, 60th and 80th percentiles (linear interpolation) of the values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise NotEnoughData("no values to take quintiles of")
    e = np.quantile(v, [0.2, 0.4, 0.6, 0.8])
    return (float(e[0]), float(e[1]), float(e[2]), float(e[3]))


def quintile_scores(values: object, edges: tuple[float, float, float, float], *,
                    higher_is_better: bool = True) -> np.ndarray:
    """1 + the number of edges a value is above (a value on an edge takes the lower quintile),
    reversed when lower is better (recency in days since the last purchase: fewer is better)."""
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("values to score must be finite numbers")
    above = np.searchsorted(np.asarray(edges, dtype=np.float64), v, side="left")
    return (1 + above if higher_is_better else 5 - above).astype(np.int64)


def quintile_score(value: float, edges: tuple[float, float, float, float], *, higher_is_better: bool = True) -> int:
    return int(quintile_scores(value, edges, higher_is_better=higher_is_better))


def segment(recency_score: int, frequency_score: int) -> str:
    """The grid's segment for a recency and a frequency score, each 1..5."""
    try:
        return _BY_SCORES[(int(recency_score), int(frequency_score))]
    except KeyError:
        raise ValueError(f"scores must be 1..5, got recency {recency_score}, frequency {frequency_score}") from None
