"""A run's feature curves read at other steps: how runs with different checkpoint
schedules are compared step by step (linear in ``log1p(step)``, the scale on which
training curves are smooth)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def interpolate_run(tx: np.ndarray, run: pd.DataFrame, features: list[str]) -> np.ndarray:
    """One run's features at ``tx`` (log1p steps), linear in log step (NaN outside the
    run's steps): one weight computation for all complete columns, ``np.interp`` on the
    finite values of columns with gaps."""
    sx = np.log1p(run["step"].to_numpy(float))
    sv = run[features].to_numpy(float)
    out = np.full((len(tx), len(features)), np.nan)
    finite = np.isfinite(sv)
    complete = finite.all(axis=0)
    if len(sx) == 1:
        out[:, complete] = sv[0, complete]
    elif complete.any():
        right = np.clip(np.searchsorted(sx, tx, side="right"), 1, len(sx) - 1)
        left = right - 1
        width = sx[right] - sx[left]
        frac = np.clip(
            np.where(width > 0, (tx - sx[left]) / np.where(width > 0, width, 1), 0), 0, 1
        )
        block = sv[:, complete]
        out[:, complete] = block[left] + frac[:, None] * (block[right] - block[left])
    for j in np.flatnonzero(~complete & (finite.sum(axis=0) >= 1)):
        ok = finite[:, j]
        out[:, j] = np.interp(tx, sx[ok], sv[ok, j])
    out[(tx < sx[0]) | (tx > sx[-1]), :] = np.nan
    return out
