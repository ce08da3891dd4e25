"""States an eval cannot tell apart: the measurement-noise rule of model selection.

Eval scores are measurements: lm-eval reports a standard error with each value (an
accuracy on 104 items has a binomial SE near 0.05). Many runs x many checkpoints make
even a systematic 2-SE difference between chance-level checkpoints "significant" to an
HMM, so held-out likelihood alone splits chance-level noise into states (measured on the
published Pythia evals: K=8, runs leaving their first state at steps 8-128 while every
task is at chance). A variance floor does not help (the HMM then still separates the
*means*); this rule acts on the means.

**Rule.** Two states are *distinguishable* when, in at least one feature, their means
(over the checkpoints the Viterbi path puts in them) differ by more than ``c`` measurement
standard errors, where a feature's SE is the larger of the two states' median
``<feature>_stderr`` (root mean square) and the feature's median SE over the whole table
(a binomial SE is ~0 where an accuracy sits at 0, e.g. LAMBADA before training: that is
not extra precision). ``c = sqrt(2) * z(1 - 0.025 / d)`` for ``d`` features: the two-sided
5% critical value of the difference of two independent measurements, Bonferroni over the
features - two states are distinct only if *one checkpoint's* evals could tell them
apart (``c`` = 2.77 for one feature, 3.87 for eight). The chosen K is the largest K not
above the likelihood's choice whose states are pairwise distinguishable.

It applies only when every feature of the map has a ``<feature>_stderr`` column (weight
features have none: their path is unchanged). Measured error rates: tests/test_phases.py
(synthetic binomial trajectories) and README "Eval trajectories".

>>> round(critical_separation(1), 2), round(critical_separation(8), 2)
(2.77, 3.87)
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from polymap.phases.preprocess import UNCERTAINTY_SUFFIX


def critical_separation(n_features: int) -> float:
    """``sqrt(2) * z(1 - 0.025 / d)``: see the module docs."""
    from scipy.stats import norm

    return math.sqrt(2.0) * float(norm.ppf(1 - 0.025 / max(1, n_features)))


def stderr_matrix(table: pd.DataFrame, features: list[str]) -> np.ndarray | None:
    """The ``<feature>_stderr`` values aligned with ``features`` (rows x features), or
    None when any feature has no such column."""
    columns = [f"{f}{UNCERTAINTY_SUFFIX}" for f in features]
    if not features or any(c not in table.columns for c in columns):
        return None
    return table[columns].to_numpy(float)


def state_separation(states: np.ndarray, values: np.ndarray, stderr: np.ndarray) -> np.ndarray:
    """Pairwise separation of the visited states: ``S[a, b]`` = the largest over features
    of ``|mean_a - mean_b| / SE`` (module docs); NaN for states not visited.

    >>> v = np.array([[0.50], [0.52], [0.90], [0.92]]); s = np.full((4, 1), 0.05)
    >>> state_separation(np.array([0, 0, 1, 1]), v, s).round(1).tolist()
    [[0.0, 8.0], [8.0, 0.0]]
    """
    k = int(states.max()) + 1 if len(states) else 0
    d = values.shape[1]
    means = np.full((k, d), np.nan)
    errors = np.full((k, d), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        floor = np.nan_to_num(np.nanmedian(stderr, axis=0))
        for s in range(k):
            rows = states == s
            if rows.any():
                means[s] = np.nanmean(values[rows], axis=0)
                errors[s] = np.nanmedian(stderr[rows], axis=0)
    out = np.full((k, k), np.nan)
    for a in range(k):
        for b in range(k):
            noise = np.sqrt((errors[a] ** 2 + errors[b] ** 2) / 2)
            noise = np.maximum(np.nan_to_num(noise), floor)
            gap = np.abs(means[a] - means[b]) / np.where(noise > 0, noise, np.inf)
            if np.isfinite(means[a]).any() and np.isfinite(means[b]).any():
                out[a, b] = float(np.nanmax(gap)) if np.isfinite(gap).any() else 0.0
    return out


def min_separation(states: np.ndarray, values: np.ndarray, stderr: np.ndarray) -> float:
    """The smallest separation between two distinct visited states (inf with one)."""
    sep = state_separation(states, values, stderr)
    off = sep[~np.eye(len(sep), dtype=bool)]
    off = off[np.isfinite(off)]
    return float(off.min()) if len(off) else math.inf


__all__ = ["critical_separation", "min_separation", "state_separation", "stderr_matrix"]
