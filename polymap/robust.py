"""Robust location and spread: the median and the scaled median absolute deviation.

One home for the robust z used by the scorer, the instability labels and model
selection. ``MAD_SCALE`` makes the MAD a consistent estimate of the standard deviation
at the normal; non-finite values are ignored.

>>> median_mad(np.array([1.0, 2.0, 3.0, 100.0, np.nan]))
(2.5, 1.4826)
>>> round(robust_z(10.0, np.array([1.0, 2.0, 3.0])), 3)
5.396
"""

from __future__ import annotations

import math
import warnings

import numpy as np

MAD_SCALE = 1.4826  # 1 / Phi^-1(3/4): MAD -> standard deviation at the normal
MEDIAN_EFFICIENCY = 1.2533  # sqrt(pi / 2): SE of a median / SE of a mean at the normal


def median_mad(values: np.ndarray, axis: int | None = None):
    """``(median, MAD_SCALE x median |values - median|)`` over ``axis``, NaN-aware.

    With ``axis=None`` returns two floats (``nan, nan`` when nothing is finite); with an
    axis, two arrays (NaN where a slice has no finite value).
    """
    values = np.asarray(values, dtype=float)
    if axis is None:
        values = values[np.isfinite(values)]
        if not len(values):
            return math.nan, math.nan
        median = float(np.median(values))
        return median, MAD_SCALE * float(np.median(np.abs(values - median)))
    values = np.where(np.isfinite(values), values, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN
        median = np.nanmedian(values, axis=axis)
        spread = MAD_SCALE * np.nanmedian(np.abs(values - np.expand_dims(median, axis)), axis=axis)
    return median, spread


def robust_z(x: float, reference: np.ndarray, floor: float = 0.0) -> float:
    """``(x - median) / max(MAD, floor, 1e-12)`` of ``x`` against ``reference``."""
    median, spread = median_mad(reference)
    if not math.isfinite(median):
        return math.nan
    return (x - median) / max(spread, floor, 1e-12)


def median_se(values: np.ndarray) -> tuple[float, float]:
    """``(median, its robust standard error)``: ``MEDIAN_EFFICIENCY x MAD / sqrt(n)``."""
    median, spread = median_mad(values)
    n = int(np.isfinite(np.asarray(values, dtype=float)).sum())
    return median, (MEDIAN_EFFICIENCY * spread / math.sqrt(n) if n else math.nan)
