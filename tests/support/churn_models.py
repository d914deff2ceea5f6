"""services/churn/models.py is written on another branch (churn-models). Until it is merged,
unit tests of the churn service's own parts run against this small stand-in with the same
interface (quintiles by numpy percentiles, the usual R x F grid, models that have no data);
once the real module exists it is always the one used."""

import importlib
import sys
import types
from dataclasses import dataclass

import numpy as np


class NotEnoughData(Exception):
    pass


@dataclass(frozen=True)
class FrequencyFit:
    model: str
    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    converged: bool
    customers: int
    iterations: int
    seconds: float


@dataclass(frozen=True)
class SpendFit:
    p: float
    q: float
    gamma: float
    log_likelihood: float
    converged: bool
    customers: int
    seconds: float


def quintile_edges(values):
    return [float(v) for v in np.percentile(np.asarray(values, dtype=float), [20, 40, 60, 80])]


def quintile_score(value, edges, *, higher_is_better=True):
    score = 1 + sum(1 for e in edges if value > e)
    return score if higher_is_better else 6 - score


_GRID = [("11", "Lost"), ("[1-2][1-2]", "Hibernating"), ("[1-2][3-4]", "At risk"), ("[1-2]5", "Can't lose them"),
         ("3[1-2]", "About to sleep"), ("33", "Need attention"), ("[3-4][4-5]", "Loyal"), ("41", "Promising"),
         ("51", "New"), ("[4-5][2-3]", "Potential loyalist"), ("5[4-5]", "Champions")]


def segment(recency_score, frequency_score):
    import re

    key = f"{recency_score}{frequency_score}"
    for pattern, name in _GRID:
        if re.fullmatch(pattern, key):
            return name
    raise ValueError(key)


def fit_frequency_model(x, t_x, T, *, model="mbgnbd"):
    raise NotEnoughData("stand-in")


def fit_gamma_gamma(x, mean_value):
    raise NotEnoughData("stand-in")


def install_if_missing() -> None:
    try:
        importlib.import_module("services.churn.models")
    except ModuleNotFoundError:
        module = types.ModuleType("services.churn.models")
        for name in ("NotEnoughData", "FrequencyFit", "SpendFit", "quintile_edges", "quintile_score", "segment",
                     "fit_frequency_model", "fit_gamma_gamma"):
            setattr(module, name, globals()[name])
        sys.modules["services.churn.models"] = module
