"""``polymap label``: which runs later became unstable, from a metric over steps.

Two rules, either marks a run (``onset_step`` = the first step of whichever fires first):

- **band**: the run's metric leaves the band of the *other* runs at the same steps, i.e.
  is worse than ``median +/- k * 1.4826 * MAD`` of the other runs (interpolated in step)
  by more than ``min_gap``, at ``lasting`` (3) consecutive checkpoints or more (``k`` = 5);
- **spike**: the run's metric (optionally smoothed: EMA with weight ``smoothing`` on the
  newest value; 1 = raw, the default, as checkpoint evals are already averages) gets worse
  than its own running best by more than ``spike`` (0.05 nats by default), or stops being
  finite.

This is the one instability rule of polymap: ``polymap label``, the suite's manifest
(:func:`polymap.suite.measure_instability`, with ``min_gap`` 0.03 nats and ``lasting`` 3)
and the scorer benchmark all call :func:`label_runs`.

``higher_is_better`` says which direction is worse: True for accuracies, False for losses;
by default it is guessed from the column name (``loss``/``ppl``/``perplexity`` -> False).
Only steps after ``after_step`` count.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

K_MAD = 5.0
LASTING = 3


def _guess_higher_is_better(metric: str) -> bool:
    name = metric.lower()
    return not any(w in name for w in ("loss", "ppl", "perplexity", "nll"))


def label_runs(
    table: pd.DataFrame,
    metric: str,
    after_step: int | None = None,
    higher_is_better: bool | None = None,
    k: float = K_MAD,
    min_gap: float = 0.0,
    lasting: int = LASTING,
    spike: float | None = 0.05,
    smoothing: float = 1.0,
) -> pd.DataFrame:
    """``run, unstable, onset_step`` for every run of ``table`` (columns run, step, metric).

    >>> t = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
    ...                   "step": [1, 2, 3] * 3,
    ...                   "acc": [.5, .6, .7, .5, .6, .7, .5, .2, .1]})
    >>> label_runs(t, "acc", spike=None, lasting=2)["unstable"].tolist()
    [False, False, True]
    """
    for column in ("run", "step", metric):
        if column not in table.columns:
            raise ValueError(f"column {column!r} not in the table (has {list(table.columns)[:8]})")
    if higher_is_better is None:
        higher_is_better = _guess_higher_is_better(metric)
    sign = 1.0 if higher_is_better else -1.0  # sign * value: higher is better
    curves = {
        run: grp.sort_values("step")[["step", metric]].to_numpy(dtype=float)
        for run, grp in table.groupby("run", sort=True)
    }
    out = []
    for run, curve in curves.items():
        steps, values = curve[:, 0], curve[:, 1]
        keep = steps > after_step if after_step is not None else np.ones(len(steps), bool)
        onsets = []
        others = [c for r, c in curves.items() if r != run]
        if len(others) >= 2:
            worse_run = 0
            for step, value, counted in zip(steps, values, keep, strict=True):
                peers = np.array(
                    [
                        np.interp(step, c[:, 0], c[:, 1])
                        for c in others
                        if c[0, 0] <= step <= c[-1, 0]
                    ]
                )
                peers = peers[np.isfinite(peers)]
                if len(peers) < 2 or not counted:
                    worse_run = 0
                    continue
                median = float(np.median(peers))
                mad = 1.4826 * float(np.median(np.abs(peers - median)))
                gap = sign * (median - value)  # positive when the run is worse
                worse = not math.isfinite(value) or gap > max(k * mad, min_gap, 1e-12)
                worse_run = worse_run + 1 if worse else 0
                if worse_run >= lasting:
                    onsets.append(float(steps[list(steps).index(step) - lasting + 1]))
                    break
        if spike is not None:
            best, ema = -math.inf, None
            for step, value, counted in zip(steps, values, keep, strict=True):
                if not math.isfinite(value):
                    if counted:
                        onsets.append(float(step))
                        break
                    continue
                ema = value if ema is None else smoothing * value + (1 - smoothing) * ema
                if counted and best - sign * ema > spike and best > -math.inf:
                    onsets.append(float(step))
                    break
                best = max(best, sign * ema)
        onset = int(min(onsets)) if onsets else None
        out.append({"run": run, "unstable": onset is not None, "onset_step": onset})
    return pd.DataFrame(out, columns=["run", "unstable", "onset_step"]).astype(
        {"onset_step": "Int64"}
    )
