"""``polymap label``: which runs later became unstable, from a metric over steps.

Two rules, either marks a run (``onset_step`` = the first step of whichever fires first):

- **band**: the run's metric is worse than the median of the *other* runs at the same
  steps (interpolated in step) by more than all of

  - ``k`` x 1.4826 MAD of the other runs (``k`` = 5),
  - the measurement noise, where the table has a ``<metric>_stderr`` column (lm-eval
    writes one): ``NOISE_Z`` (3) x ``sqrt(se_run^2 + median se_others^2)``,
  - ``min_gap``: by default ``GAP_FRACTION`` (10%) of how much the runs' median curve
    still changes over the second half of training (its late-training scale: 0.03 nats
    for the suite's validation loss, ~1 point of accuracy for a Pythia task), so a gap
    that is tiny on the metric's own scale never counts where runs agree to the last
    decimal;

  at ``lasting`` (3) consecutive checkpoints or more;
- **spike** (losses only, by default): the run's metric (optionally smoothed: EMA with
  weight ``smoothing`` on the newest value; 1 = raw) gets worse than its own running
  best by more than ``spike`` (by default: the band's gap floor and noise). Accuracies
  move by their measurement noise between checkpoints, so a "spike" on them is noise
  unless asked for (``spike=`` a number);
- **non-finite**: the metric stops being finite (always, floor or not).

**At the floor nothing counts.** Eval scores sit at chance for the first part of
training (Pythia: every core task until step ~1000), where runs differ only by noise.
Checkpoints before the metric starts to move - the first step at which the runs' median
curve has improved on its first value by more than the band's gap floor and noise - are
not labelled; detected from the data, not a fixed step (``after_step`` adds a cut).

**Like with like.** ``group_by`` labels each group (e.g. ``model``: one model size) on its
own; a group of fewer than 3 runs has no band (a warning says so).

This is the one instability rule of polymap: ``polymap label``, the suite's manifest
(:func:`polymap.suite.measure_instability`, with ``min_gap`` 0.03 nats, ``spike`` 0.05
and ``lasting`` 3) and the scorer benchmark all call :func:`label_runs`.

``higher_is_better`` says which direction is worse: True for accuracies, False for losses;
by default it is guessed from the column name (``loss``/``ppl``/``perplexity`` -> False).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from polymap.errors import UsageError
from polymap.phases.preprocess import UNCERTAINTY_SUFFIX
from polymap.robust import median_mad
from polymap.table import as_table

log = logging.getLogger(__name__)

K_MAD = 5.0
LASTING = 3
NOISE_Z = 3.0
GAP_FRACTION = 0.1


LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "nll", "bits_per_byte", "bpb", "error")


def better_when_higher(metric: str) -> bool:
    """Whether a higher value of ``metric`` is better, from its name: losses,
    perplexities, NLL, bits per byte and error rates are lower-is-better.

    >>> better_when_higher("eval.piqa.acc"), better_when_higher("evals_native.loss")
    (True, False)
    """
    name = metric.lower()
    return not any(w in name for w in LOWER_IS_BETTER)


def _curves(table: pd.DataFrame, metric: str) -> dict[str, np.ndarray]:
    """run -> (checkpoints x 3) array of step, value, stderr (NaN without a column)."""
    se = f"{metric}{UNCERTAINTY_SUFFIX}"
    columns = ["step", metric] + ([se] if se in table.columns else [])
    out = {}
    for run, grp in table.groupby("run", sort=True):
        values = grp.sort_values("step")[columns].to_numpy(dtype=float)
        if values.shape[1] == 2:
            values = np.column_stack([values, np.full(len(values), np.nan)])
        out[str(run)] = values
    return out


def _median_curve(curves: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs' median value and median stderr at every step any run has."""
    steps = np.unique(np.concatenate([c[:, 0] for c in curves.values()]))
    values = np.full((len(curves), len(steps)), np.nan)
    errors = np.full((len(curves), len(steps)), np.nan)
    for i, c in enumerate(curves.values()):
        inside = (steps >= c[0, 0]) & (steps <= c[-1, 0])
        ok = np.isfinite(c[:, 1])
        if ok.any():
            values[i, inside] = np.interp(steps[inside], c[ok, 0], c[ok, 1])
        ok = np.isfinite(c[:, 2])
        if ok.any():
            errors[i, inside] = np.interp(steps[inside], c[ok, 0], c[ok, 2])
    with warnings.catch_warnings():  # all-NaN steps: NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return steps, np.nanmedian(values, axis=0), np.nanmedian(errors, axis=0)


def metric_scale(curves: dict[str, np.ndarray], sign: float) -> tuple[float, float | None]:
    """``(late_change, moving_step)``: how much the runs' median curve changes over the
    second half of training (by step), and the first step at which it has improved on
    its first value by more than ``max(GAP_FRACTION * late_change, NOISE_Z * median
    stderr)`` (None: it never moves)."""
    steps, median, errors = _median_curve(curves)
    finite = np.isfinite(median)
    steps, median, errors = steps[finite], median[finite], errors[finite]
    if len(steps) < 2:
        return 0.0, None
    half = steps[0] + (steps[-1] - steps[0]) / 2
    late = median[steps >= half]
    late_change = float(np.max(late) - np.min(late)) if len(late) else 0.0
    moving = floor_end(steps, median, errors, GAP_FRACTION * late_change, sign)
    return late_change, moving


def floor_end(
    steps: np.ndarray,
    median: np.ndarray,
    stderr: np.ndarray,
    min_change: float = 0.0,
    sign: float | None = None,
) -> float | None:
    """The first step at which a median curve has left its first value by more than
    ``max(min_change, NOISE_Z * stderr)`` (towards better when ``sign`` is given, either
    way when None): before it, the runs sit at the metric's floor and differ by noise.
    None when it never leaves. Used by the labels and by the scorer's deviation.

    >>> floor_end(np.array([0, 1, 2, 3]), np.array([.25, .26, .24, .5]), np.full(4, .02))
    3.0
    """
    change = median - median[0]
    change = sign * change if sign is not None else np.abs(change)
    threshold = np.maximum(min_change, NOISE_Z * np.nan_to_num(stderr))
    moved = change > np.maximum(threshold, 1e-12)
    return float(steps[np.argmax(moved)]) if moved.any() else None


def check_label_params(min_gap, spike, lasting: int, smoothing: float = 1.0) -> None:
    """:func:`label_runs`'s numbers in range before any work (a NaN gap or a negative
    spike threshold marked most healthy runs unstable; ``lasting=0`` every run at its
    second step)."""

    def finite(value) -> bool:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )

    if min_gap is not None and not (finite(min_gap) and min_gap >= 0):
        raise UsageError(f"min_gap={min_gap!r}: must be a finite number >= 0 (or None: auto)")
    if spike not in (None, "auto") and not (finite(spike) and spike > 0):
        raise UsageError(f"spike={spike!r}: must be a finite number > 0, 'auto' or None (off)")
    if not (isinstance(lasting, int) and not isinstance(lasting, bool) and lasting >= 1):
        raise UsageError(f"lasting={lasting!r}: must be an integer >= 1")
    if not (finite(smoothing) and smoothing >= 0):
        raise UsageError(f"smoothing={smoothing!r}: must be a finite number >= 0")


def label_runs(
    table: pd.DataFrame | str | Path,
    metric: str,
    after_step: int | None = None,
    higher_is_better: bool | None = None,
    k: float = K_MAD,
    min_gap: float | None = None,
    lasting: int = LASTING,
    spike: float | None | str = "auto",
    smoothing: float = 1.0,
    group_by: str | None = None,
) -> pd.DataFrame:
    """``run, unstable, onset_step`` for every run of ``table`` (columns run, step, metric;
    ``<metric>_stderr`` used when present). See the module docs for the rules.

    ``min_gap``: None = 10% of the late-training change; ``spike``: ``"auto"`` = on for
    losses only, a number = that threshold, None = off; ``group_by``: a column whose
    groups are labelled separately.

    >>> t = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
    ...                   "step": [1, 2, 3] * 3,
    ...                   "acc": [.5, .6, .7, .5, .6, .7, .5, .2, .1]})
    >>> label_runs(t, "acc", lasting=2)["unstable"].tolist()
    [False, False, True]
    """
    check_label_params(min_gap, spike, lasting, smoothing)
    table = as_table(table)
    for column in ("run", "step", metric):
        if column not in table.columns:
            metrics = [
                c for c in table.select_dtypes("number").columns
                if c not in ("step", "seed", "tokens") and not c.endswith(UNCERTAINTY_SUFFIX)
            ]  # fmt: skip
            close = [c for c in metrics if column.split(".")[-1] in c] or metrics
            shown = ", ".join(close[:10]) + (
                f" (+{len(close) - 10} more)" if len(close) > 10 else ""
            )
            raise UsageError(
                f"column {column!r} not in the table; metric columns: {shown or 'none'}"
            )
    if group_by is not None:
        if group_by not in table.columns:
            raise UsageError(f"--group-by {group_by!r}: no such column in the table")
        parts, small = [], []
        for value, part in table.groupby(group_by, sort=True, dropna=False):
            if part["run"].nunique() < 3:
                small.append(str(value))
            labels = label_runs(
                part, metric, after_step, higher_is_better, k, min_gap, lasting, spike,
                smoothing,
            )  # fmt: skip
            parts.append(labels.assign(**{group_by: value}))
        if small:
            log.warning(
                "%d %s group(s) have fewer than 3 runs (%s): no band to compare with there",
                len(small), group_by, ", ".join(small[:8]),
            )  # fmt: skip
        return pd.concat(parts, ignore_index=True)
    if higher_is_better is None:
        higher_is_better = better_when_higher(metric)
    sign = 1.0 if higher_is_better else -1.0  # sign * value: higher is better
    curves = _curves(table, metric)
    late_change, moving = metric_scale(curves, sign)
    gap_floor = GAP_FRACTION * late_change if min_gap is None else float(min_gap)
    if spike == "auto":
        spike = None if higher_is_better else gap_floor
    start = after_step if after_step is not None else -math.inf
    out = []
    for run, curve in curves.items():
        steps, values, errors = curve[:, 0], curve[:, 1], curve[:, 2]
        eligible = steps > start
        counted = eligible & (steps >= moving if moving is not None else False)
        # a non-finite value (a diverged run) counts wherever it is, floor or not
        onsets = [float(steps[i]) for i in np.flatnonzero(eligible & ~np.isfinite(values))[:1]]
        others = [c for r, c in curves.items() if r != run]
        if len(others) >= 2:
            onsets += _band_onset(steps, values, errors, counted, others, sign, k, gap_floor,
                                  lasting)  # fmt: skip
        if spike is not None:
            onsets += _spike_onset(steps, values, errors, counted, sign, spike, smoothing)
        onset = int(min(onsets)) if onsets else None
        out.append({"run": run, "unstable": onset is not None, "onset_step": onset})
    return pd.DataFrame(out, columns=["run", "unstable", "onset_step"]).astype(
        {"onset_step": "Int64"}
    )


def _band_onset(steps, values, errors, counted, others, sign, k, gap_floor, lasting) -> list:
    worse_run = 0
    for i, (step, value, counts) in enumerate(zip(steps, values, counted, strict=True)):
        inside = [c for c in others if c[0, 0] <= step <= c[-1, 0]]
        peers = np.array([np.interp(step, c[:, 0], c[:, 1]) for c in inside])
        peer_se = np.array([np.interp(step, c[:, 0], c[:, 2]) for c in inside])
        ok = np.isfinite(peers)
        if ok.sum() < 2 or not counts:
            worse_run = 0
            continue
        peers = peers[ok]
        median, mad = median_mad(peers)
        noise = 0.0
        if np.isfinite(errors[i]) or np.isfinite(peer_se[ok]).any():
            own = errors[i] if np.isfinite(errors[i]) else 0.0
            theirs = float(np.nanmedian(peer_se[ok])) if np.isfinite(peer_se[ok]).any() else 0.0
            noise = NOISE_Z * math.sqrt(own**2 + theirs**2)
        gap = sign * (median - value)  # positive when the run is worse
        worse = not math.isfinite(value) or gap > max(k * mad, noise, gap_floor, 1e-12)
        worse_run = worse_run + 1 if worse else 0
        if worse_run >= lasting:
            return [float(steps[i - lasting + 1])]
    return []


def _spike_onset(steps, values, errors, counted, sign, spike, smoothing) -> list:
    best, best_se, ema = -math.inf, 0.0, None
    for step, value, se, counts in zip(steps, values, errors, counted, strict=True):
        if not math.isfinite(value):
            continue  # non-finite values are marked by label_runs itself
        ema = value if ema is None else smoothing * value + (1 - smoothing) * ema
        noise = 0.0
        if math.isfinite(se):
            noise = NOISE_Z * math.sqrt(se**2 + best_se**2)
        if counts and best > -math.inf and best - sign * ema > max(spike, noise):
            return [float(step)]
        if sign * ema > best:
            best, best_se = sign * ema, (se if math.isfinite(se) else 0.0)
    return []
