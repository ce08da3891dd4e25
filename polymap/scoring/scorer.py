"""``RiskScorer``: a calibrated early-warning decision per run, scikit-learn style.

From a checkpoint's features to a flag, top to bottom:

1. **Evidence per signal.** For a run cut at the horizon:

   - ``deviation``: each feature's robust z against the *other* runs at the same step
     (median and 1.4826 MAD of their curves, interpolated in log step; spread floored at
     5% of the feature's inter-quartile range over the reference and at the value's own
     ``<feature>_stderr`` when the table has one). Bounded influence: |z| is clipped at
     ``z_clip``. Persistence: a feature counts at a checkpoint only as much as it also
     deviated at the ``persistence - 1`` checkpoints before (the minimum over the window),
     so a single checkpoint cannot decide. Per checkpoint the evidence is the mean of the
     ``top_k`` largest persistent |z| - it grows with the number of agreeing features
     and is not diluted by any number of quiet ones; the run's value is its
     :func:`lasting_mean` (the largest mean over a stretch of at least 3 checkpoints that
     runs up to the horizon: a deviation that started late is not averaged away by the
     quiet checkpoints before it, a short event in the middle is). Features whose
     reference spread is degenerate (fewer than ``MIN_DISTINCT`` distinct values: counts
     such as ``outlier_frac``) are left out and listed in ``degenerate_features_``. An
     eval score (a feature with a ``_stderr`` column) counts only from the step at which
     the reference runs leave its floor (``feature_start_``: chance-level accuracies
     differ by noise and by what a random init happens to guess).
   - ``performance``: how much *worse* the run performs than the other runs at the same
     step, on the probe's loss and token accuracy and any lm-eval score
     (:func:`performance_features`): per feature the signed robust z (positive = worse)
     with the spread floored at the feature's typical between-run spread
     (:func:`typical_spread`) - not at a fraction of its range over training, which for
     a loss that falls from 11 to 4 nats hides a persistent 0.08-nat gap between runs
     that are 0.015 nats apart - averaged over the features per checkpoint, clipped,
     made persistent and aggregated like the deviation. It is the early form of what
     "unstable" later means (a loss above the others'), so one strong persistent gap can
     flag on its own.
   - ``path`` and ``likelihood``: the run's Viterbi path against the other runs' paths
     and its mean forward log-likelihood per checkpoint, under a clone of the user's
     :class:`~polymap.phases.PhaseModel` (same features, covariance, scaling, log
     transform, restarts; K fixed to the fitted map's) fitted *without the run*. The
     likelihood's emissions count each whitened residual at most ``z_clip`` SDs; both
     are per-checkpoint series made persistent and aggregated like the deviation.

2. **The decision** (:mod:`polymap.scoring.calibration`). The deviation's ``|z|`` and
   the performance's "worse" z, column by column, become running maxima of their
   persistent values; each column is calibrated against the reference runs' own running
   maxima of that column at the same step (a column that is noisy in healthy runs weighs
   little, a clean one a lot), the columns combine by their maximum, and the run's
   statistic ``W`` is the running maximum of that over its checkpoints. ``p_value`` is
   the tail of the reference runs' whole-life ``W`` (each leave-one-run-out), checked
   on the reference at fit and widened when it flags more than ``alpha`` of them
   (``calibration_.self_check_``, shown by ``polymap describe``). ``W`` never falls and
   the threshold never moves, so a run flagged at any checkpoint is flagged at its last:
   ``flagged = p_value <= alpha`` bounds the probability that a healthy run is flagged
   at *any* look over its life (assuming it is exchangeable with the reference runs),
   and backtest, ``score --until-step``, the monitor and the callback agree on every
   checkpoint. ``deviation`` is ``W``, ``p_deviation`` its p-value (= ``p_value``),
   ``p_conformal`` its rank among the reference runs (never below ``1 / (n + 1)``);
   ``risk = 1 - p_value`` ranks runs (a confidence that the run is unlike the reference,
   not a probability of later instability). Testing N runs at once flags about
   ``alpha * N`` healthy runs on average; pass ``alpha / N`` for a family-wise rate.

3. **Reported, not deciding**: the path, likelihood and performance signals keep their
   pointwise p-values (``p_path`` conformal, the others a t tail on their lasting mean
   at the horizon) as diagnostics: they are not corrected for the number of looks.

4. **Broken checkpoints are evidence.** A failed or non-finite checkpoint at or before
   the horizon gives ``p_value = 0``, ``risk = 1``, ``flagged`` and a reason; a run whose
   every checkpoint is broken is reported the same way, and never stops the others.

>>> from polymap.phases import PhaseModel
>>> scorer = RiskScorer(phase_model=PhaseModel(n_states=4), alpha=0.05)    # doctest: +SKIP
>>> scorer.fit("features.parquet").score_reference(horizon=0.25)          # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone

from polymap.atomic import atomic_file, write_csv, write_json, write_parquet
from polymap.phases.io import jsonable
from polymap.phases.model import PhaseModel
from polymap.phases.preprocess import UNCERTAINTY_SUFFIX, PhaseInputError, usable_rows
from polymap.robust import MAD_SCALE, median_mad
from polymap.scoring.calibration import AnyLookCalibration, evidence_curves, persistent
from polymap.scoring.curves import interpolate_run as _interpolate
from polymap.scoring.pooling import GroupStandardiser, PoolingError, check_exchangeable
from polymap.scoring.score import ScoringError, horizon_step, path_disagreement
from polymap.table import as_table, feature_columns

log = logging.getLogger(__name__)

SIGNALS = ("path", "likelihood", "deviation", "performance")
# deviation: in log; performance: in z units
SIGNAL_FLOORS = {"path": 0.05, "likelihood": 0.1, "deviation": 0.1, "performance": 0.1}
# what the performance signal reads by default: the probe's loss and token accuracy
# (its perplexity is the loss again) and every lm-eval score
NATIVE_PERFORMANCE = ("evals_native.loss", "evals_native.token_acc")
EVAL_PREFIX = "eval."
FEATURE_FLOOR = 0.05
MIN_DISTINCT = 8
SCORER_FORMAT = "polymap.RiskScorer"
SCORER_VERSION = 1
POOLED_MAP = "pooled_map"  # sub-directory: the map a pooled scorer uses
SCORER_JSON = "scorer.json"
# not early-warning evidence: ``drift`` looks at the run's final checkpoint; standard
# errors and non-finite counters describe a measurement, not the training state
EXCLUDED_SETS = ("drift",)
EXCLUDED_SUFFIXES = (UNCERTAINTY_SUFFIX, "nonfinite_fraction", ".nonfinite")


def scoring_features(table: pd.DataFrame, features: str | list[str] | None = None) -> list[str]:
    """The deviation signal's columns: ``features`` (sets or columns), or by default
    every feature column except ``drift.*``, standard errors and non-finite counters -
    every role, the unembedding included."""
    from polymap.phases.preprocess import select_columns

    if features is not None:
        return select_columns(table, features)
    return [
        c
        for c in feature_columns(table)
        if c.split(".")[0] not in EXCLUDED_SETS and not c.endswith(EXCLUDED_SUFFIXES)
    ]


def performance_features(
    table: pd.DataFrame, performance: str | list[str] | None = "auto"
) -> list[str]:
    """The performance signal's columns. ``"auto"``: ``evals_native.loss``,
    ``evals_native.token_acc`` and every lm-eval score (``eval.*``, not its
    ``_stderr``) the table has; ``"none"`` or None: no performance signal; else sets
    or columns, as ``features``."""
    from polymap.phases.preprocess import select_columns

    if performance is None or (isinstance(performance, str) and performance == "none"):
        return []
    if isinstance(performance, str) and performance == "auto":
        return [
            c
            for c in feature_columns(table)
            if (c in NATIVE_PERFORMANCE or c.startswith(EVAL_PREFIX))
            and not c.endswith(UNCERTAINTY_SUFFIX)
        ]
    return select_columns(table, performance)


def broken_rows(table: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """Rows whose checkpoint failed (``status`` failed/nonfinite), or that have an
    infinite feature value or none at all: ``run, step, why``."""
    bad = pd.Series(False, index=table.index)
    why = pd.Series("", index=table.index, dtype=object)
    if "status" in table.columns:
        failed = table["status"].isin(["failed", "nonfinite"])
        bad |= failed
        why[failed] = "checkpoint " + table.loc[failed, "status"].astype(str)
    present = [f for f in features if f in table.columns]
    if present:
        # an infinite value, or no value at all, is a broken checkpoint; a few missing
        # columns (an eval not run at that step) are just missing
        values = table[present].to_numpy(float)
        nonfinite = np.isinf(values).any(axis=1) | np.isnan(values).all(axis=1)
        nonfinite = pd.Series(nonfinite, index=table.index) & ~bad
        bad |= nonfinite
        why[nonfinite] = "non-finite feature values"
    out = table.loc[bad, ["run", "step"]].copy()
    out["why"] = why[bad]
    return out


def floor_ends(reference: pd.DataFrame, features: list[str]) -> dict[str, float]:
    """For each feature with a ``<feature>_stderr`` column (an eval score): the step at
    which the reference runs' median leaves its first value by more than the
    measurement noise (:func:`polymap.scoring.labels.floor_end`; inf if never). Before
    it, runs at an eval's floor (chance-level accuracy) differ by noise and by what a
    random init happens to guess - not evidence about training."""
    from polymap.scoring.labels import floor_end

    out = {}
    for f in features:
        column = f"{f}{UNCERTAINTY_SUFFIX}"
        if column not in reference.columns:
            continue
        by_step = reference.groupby("step")[[f, column]].median().sort_index()
        by_step = by_step[np.isfinite(by_step[f])]
        if by_step.empty:
            continue
        end = floor_end(
            by_step.index.to_numpy(float),
            by_step[f].to_numpy(float),
            by_step[column].to_numpy(float),
        )
        out[f] = math.inf if end is None else end
    return out


def lasting_mean(values: np.ndarray, min_length: int = 3) -> float:
    """The largest mean of a stretch of checkpoints that runs up to the last one (at
    least ``min_length`` long, or the whole series when shorter): how strongly the run
    deviates *now*, over however long it has deviated.

    >>> lasting_mean(np.array([0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0]))
    3.0
    >>> lasting_mean(np.array([0.0, 6.0, 0.0, 0.0, 0.0]))
    1.5
    """
    values = np.asarray(values, dtype=float)
    if len(values) <= min_length:
        return float(values.mean()) if len(values) else math.nan
    suffix = np.cumsum(values[::-1])[::-1] / np.arange(len(values), 0, -1)
    return float(suffix[: len(values) - min_length + 1].max())


class _Collector(logging.Handler):
    """While a scorer call runs (:func:`_phase_warnings`), the handler of the
    ``polymap.phases`` logger: a warning goes into the calling thread's innermost open
    list instead of being printed; anything else (another thread's records, lower levels)
    goes on up the logger tree as usual."""

    def __init__(self):
        super().__init__(logging.NOTSET)
        self.local = threading.local()
        self.lock = threading.Lock()
        self.active = 0
        self.propagate = True

    @property
    def stack(self) -> list[list[str]]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING and self.stack:
            self.stack[-1].append(record.getMessage())
        else:
            logging.getLogger(PHASE_LOGGER).parent.handle(record)


_COLLECTOR = _Collector()
PHASE_LOGGER = "polymap.phases"


@contextmanager
def _phase_warnings():
    """The warnings of ``polymap.phases`` (a feature dropped as constant, rows with missing
    values...) raised by this thread inside the block, collected rather than printed:
    every leave-one-run-out model of a scorer repeats the same ones."""
    logger = logging.getLogger(PHASE_LOGGER)
    with _COLLECTOR.lock:
        if not _COLLECTOR.active:
            _COLLECTOR.propagate, logger.propagate = logger.propagate, False
            logger.addHandler(_COLLECTOR)
        _COLLECTOR.active += 1
    caught: list[str] = []
    _COLLECTOR.stack.append(caught)
    try:
        yield caught
    finally:
        _COLLECTOR.stack.pop()
        with _COLLECTOR.lock:
            _COLLECTOR.active -= 1
            if not _COLLECTOR.active:
                logger.removeHandler(_COLLECTOR)
                logger.propagate = _COLLECTOR.propagate


def _pass_on(messages: list[str]) -> None:
    """Messages collected elsewhere (a worker process): into the open collection, or
    logged once each when there is none."""
    if _COLLECTOR.stack:
        _COLLECTOR.stack[-1].extend(messages)
    else:
        _log_once(messages)


def _log_once(messages: list[str]) -> None:
    for message, count in Counter(messages).items():
        suffix = f" (x{count}: once per phase model fitted or applied)" if count > 1 else ""
        log.warning("%s%s", message, suffix)


def _warn_once(method):
    """Log each distinct phase-model warning of ``method`` once, with its count."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with _phase_warnings() as caught:
            try:
                return method(*args, **kwargs)
            finally:
                if len(_COLLECTOR.stack) == 1:  # the outermost call reports
                    _log_once(caught)
                else:
                    _COLLECTOR.stack[-2].extend(caught)

    return wrapper


def _degenerate(reference: pd.DataFrame, features: list[str]) -> list[str]:
    values = reference[features]
    distinct = values.nunique(dropna=True)
    return [f for f in features if distinct[f] < MIN_DISTINCT]


def _column_quantiles(values: np.ndarray, qs: tuple[float, ...]) -> list[np.ndarray]:
    """Per-column quantiles ignoring NaN (linear, as ``np.nanquantile``), vectorised:
    ``np.nanquantile`` loops over the columns in Python.

    >>> [q.tolist() for q in _column_quantiles(np.array([[1.0, 1.0], [3.0, np.nan]]), (0.5,))]
    [[2.0, 1.0]]
    """
    ordered = np.sort(values, axis=0)  # NaN last
    count = np.isfinite(ordered).sum(axis=0)
    cols = np.arange(values.shape[1])
    out = []
    for q in qs:
        pos = q * np.maximum(count - 1, 0)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, np.maximum(count - 1, 0))
        with np.errstate(invalid="ignore"):
            value = ordered[lo, cols] + (pos - lo) * (ordered[hi, cols] - ordered[lo, cols])
        out.append(np.where(count > 0, value, np.nan))
    return out


def _range_floor(others: pd.DataFrame, features: list[str], fraction: float) -> np.ndarray:
    """``fraction`` x each feature's inter-quartile range over ``others`` (its standard
    deviation when that range is 0), at least 1e-12."""
    reference = others[features].to_numpy(float)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q75, q25 = _column_quantiles(reference, (0.75, 0.25))
        spread = np.where(q75 > q25, q75 - q25, np.nan_to_num(np.nanstd(reference, axis=0)))
    return np.maximum(fraction * spread, 1e-12)


def typical_spread(others: pd.DataFrame, features: list[str]) -> np.ndarray:
    """Each feature's typical between-run spread: the median over steps (those at
    which at least 3 runs of ``others`` have a checkpoint) of the runs' 1.4826 MAD at
    that step. NaN where no step has 3 runs.

    >>> t = pd.DataFrame({"run": list("abcabc"), "step": [0, 0, 0, 9, 9, 9],
    ...                   "f.x": [1.0, 2.0, 3.0, 10.0, 10.0, 14.0]})
    >>> typical_spread(t, ["f.x"]).round(4).tolist()    # median of 1.4826 and 0
    [0.7413]
    """
    runs = others.groupby("step")["run"].nunique()
    shared = others[others["step"].isin(runs.index[runs >= 3])]
    if shared.empty:
        return np.full(len(features), np.nan)
    by_step = shared.groupby("step")[features]
    deviation = (shared[features] - by_step.transform("median")).abs()
    mad = deviation.groupby(shared["step"]).median().to_numpy(float) * MAD_SCALE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column -> NaN
        return np.nanmedian(mad, axis=0)


def _peer_z(
    target: pd.DataFrame, others: pd.DataFrame, features: list[str], floor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Signed robust z of ``target``'s features against ``others`` at the same step
    (their curves interpolated in log(1 + step)): ``(value - median) / spread`` with the
    spread the peers' 1.4826 MAD, at least ``floor`` (per feature) and the value's own
    ``<feature>_stderr``. Returns ``(steps, z)`` for the target's checkpoints with at
    least two comparable other runs (non-finite z -> 0)."""
    target = target.sort_values("step")
    tx = np.log1p(target["step"].to_numpy(float))
    values = target[features].to_numpy(float)
    groups = [g for _, g in others.sort_values("step").groupby("run")]
    peers = np.stack([_interpolate(tx, g, features) for g in groups]) if groups else None
    if peers is None:
        peers = np.full((0, len(tx), len(features)), np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        noise = np.zeros_like(values)
        for j, f in enumerate(features):
            if f"{f}{UNCERTAINTY_SUFFIX}" in target.columns:
                noise[:, j] = np.nan_to_num(target[f"{f}{UNCERTAINTY_SUFFIX}"].to_numpy(float))
        median, mad = median_mad(peers, axis=0)
        z = (values - median) / np.maximum(np.maximum(mad, floor), noise)
    z = np.where(np.isfinite(z), z, 0.0)
    enough = (np.isfinite(peers[:, :, 0]).sum(axis=0) >= 2) if groups else np.zeros(len(tx), bool)
    return target["step"].to_numpy()[enough], z[enough]


def feature_z(
    target: pd.DataFrame,
    others: pd.DataFrame,
    features: list[str],
    floor: float = FEATURE_FLOOR,
) -> tuple[np.ndarray, np.ndarray]:
    """Robust |z| of every feature of ``target`` against ``others`` at the same step.

    Returns ``(steps, z)`` for the target's checkpoints that have at least two
    comparable other runs (``z`` has shape checkpoints x features; non-finite -> 0).
    Peers' curves are interpolated in log(1 + step); the spread is 1.4826 MAD, floored
    at ``floor`` (default ``FEATURE_FLOOR``) x the feature's inter-quartile range over
    ``others`` (its standard deviation when that range is 0) and at the value's own
    ``<feature>_stderr``.
    """
    steps, z = _peer_z(target, others, features, _range_floor(others, features, floor))
    return steps, np.abs(z)


def performance_z(
    target: pd.DataFrame,
    others: pd.DataFrame,
    features: list[str],
    starts: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """How much *worse* than ``others`` ``target`` performs at each checkpoint, per
    performance feature: the signed robust z (positive = worse: a higher loss, a lower
    accuracy, :func:`~polymap.scoring.labels.better_when_higher`) against the other
    runs at the same step. The spread is floored at the feature's
    :func:`typical_spread` between runs (not at a fraction of its range over training,
    which for a loss falling from 11 to 4 nats dwarfs a 0.05-nat gap between runs) and
    at the value's ``<feature>_stderr``. An eval score counts from ``starts[feature]``
    (the step the reference leaves its floor); before it, 0.

    Returns ``(steps, z)``, ``z`` of shape checkpoints x features.
    """
    from polymap.scoring.labels import better_when_higher

    typical = typical_spread(others, features)
    fallback = _range_floor(others, features, FEATURE_FLOOR)
    floor = np.where(np.isfinite(typical) & (typical > 0), typical, fallback)
    steps, z = _peer_z(target, others, features, floor)
    worse = np.array([-1.0 if better_when_higher(f) else 1.0 for f in features])
    z = z * worse
    for j, f in enumerate(features):
        if starts and f in starts:
            z[np.asarray(steps) < starts[f], j] = 0.0
    return steps, z


def feature_noise(z_by_run: dict[str, np.ndarray], exclude: str | None = None) -> np.ndarray:
    """How far each feature strays in *typical* runs: the median over runs of each run's
    90th percentile of |z| over its checkpoints, relative to the median feature's.

    A feature whose healthy runs often reach large |z| (a power-law exponent whose fit
    jumps between ranges, say) gets a factor > 1 and its |z| is divided by it; a median
    over runs is unmoved by a minority of outlier runs. Features no noisier than the
    median one keep factor 1.
    """
    per_run = [np.percentile(z, 90, axis=0) for r, z in z_by_run.items() if r != exclude and len(z)]
    if not per_run:
        return np.ones(0)
    typical = np.median(np.vstack(per_run), axis=0)
    reference = max(float(np.median(typical)), 1e-12)
    return np.maximum(1.0, typical / reference)


def deviation_evidence(
    target: pd.DataFrame,
    others: pd.DataFrame,
    features: list[str],
    z_clip: float = 8.0,
    persistence: int = 3,
    top_k: int = 5,
    noise: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per checkpoint of ``target``: ``step, evidence, top`` (see the module docs).

    ``evidence`` is the mean of the ``top_k`` largest persistent clipped |z| (each
    divided by its feature's ``noise`` factor, :func:`feature_noise`, when given);
    ``top`` the three features behind it with their (raw) |z|.
    """
    steps, z = feature_z(target, others, features)
    return evidence_from_z(steps, z, features, z_clip, persistence, top_k, noise)


def evidence_from_z(steps, z, features, z_clip, persistence, top_k, noise=None) -> pd.DataFrame:
    scaled = z / noise if noise is not None and len(noise) else z
    lasting = persistent(np.minimum(scaled, z_clip), persistence)
    rows = []
    k = min(top_k, len(features))
    for t in range(len(steps)):
        order = np.argsort(-lasting[t])
        rows.append(
            {
                "step": int(steps[t]),
                "evidence": float(lasting[t, order[:k]].mean()),
                "top": [(features[i], float(z[t, i])) for i in order[:3]],
            }
        )
    return pd.DataFrame(rows, columns=["step", "evidence", "top"])


def _tail(x: float, reference: np.ndarray, floor: float) -> tuple[float, float]:
    """Robust z of ``x`` against ``reference`` and its one-sided p-value.

    ``z = (x - median) / max(1.4826 MAD, floor)``; ``p = P(T > z / sqrt(1 + 1/m))`` for
    Student's t with ``0.37 (m - 1)`` degrees of freedom (at least 2): the MAD of m
    values is as informative as a standard deviation of about 37% as many (its
    asymptotic efficiency at the normal), and the ``sqrt(1 + 1/m)`` is the predictive
    spread of one more run.
    """
    from scipy.stats import t

    m = len(reference)
    median, mad = median_mad(reference)
    z = (x - median) / max(mad, floor)
    df = max(2.0, 0.37 * (m - 1))
    return z, float(t.sf(z / math.sqrt(1 + 1 / m), df))


def _conformal(value: float, pool: np.ndarray) -> float:
    """``(1 + #{pool >= value}) / (n + 1)``: never below ``1 / (n + 1)``.

    >>> _conformal(5.0, np.array([1.0, 2.0, 5.0]))
    0.5
    """
    return (1 + int((np.asarray(pool) >= value).sum())) / (len(pool) + 1)


def _threshold(calibration: AnyLookCalibration, exclude: str | None, alpha: float) -> float:
    """The smallest ``W`` whose p-value is ``<= alpha`` (bisection on the monotone tail)."""
    pool = calibration.pool(exclude)
    if len(pool) < 2:
        return math.inf
    lo, hi = float(np.min(pool)) - 1.0, float(np.max(pool)) + 1.0
    while calibration.p_value(hi, exclude) > alpha:
        hi = hi + 2 * (hi - lo)
        if hi > 1e9:
            return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if calibration.p_value(mid, exclude) <= alpha else (mid, hi)
    return hi


class RiskScorer(BaseEstimator):
    """Calibrated early-warning scores of runs against reference runs.

    Parameters
    ----------
    phase_model : PhaseModel, optional
        The training map. Fitted: used as is (its K, features, covariance, scaling...);
        unfitted: cloned and fitted on the reference; None: ``PhaseModel()`` (K selected).
        The leave-one-run-out models are clones of it with K fixed.
    features : str or list, optional
        Columns of the deviation signal (sets or columns; ``"all"``: every feature column,
        :func:`scoring_features`). Default: the map's columns when ``phase_model`` was
        given a ``features`` list (the risk is about what the map is about), else every
        feature column.
    performance : str or list, optional
        Columns of the performance signal: ``"auto"`` (default: the probe's loss and
        token accuracy and every ``eval.*`` score the table has,
        :func:`performance_features`), ``"none"``, or sets/columns.
    alpha : float
        Nominal false-alarm rate of ``flagged`` per run (default 0.05).
    z_clip, persistence, top_k
        Bounded influence of a feature, checkpoints a deviation must last, features
        averaged per checkpoint.
    feature_floor : float
        A feature's spread is floored at this fraction of its inter-quartile range over
        the reference (default 0.05). Lower is more sensitive to small level shifts of
        smooth features (a loss, a norm) and raises false alarms: measured in the README
        ("The floor"), 0.01 finds all ``data_repeat:0.4`` runs at 25% but flags 6 of 96
        healthy-suite scorings instead of 5.
    pool_by : str, optional
        A column naming each run's group (model size, data order): pool the groups into
        one reference after per-group standardisation (:mod:`polymap.scoring.pooling`),
        only when the leave-one-group-out check finds them exchangeable at ``alpha``
        (else :class:`~polymap.scoring.pooling.PoolingError`). The map is then fitted
        on the standardised runs; targets need the column and a group the reference has.
    n_jobs : int
        joblib workers for the leave-one-run-out fits.
    random_state : int
    progress : bool
        A progress bar over the leave-one-run-out fits.

    Attributes
    ----------
    phase_model_ : PhaseModel fitted on the whole reference
    features_ : list of str (deviation columns actually used)
    degenerate_features_ : list of str
    performance_features_ : list of str (performance columns actually used; may be empty)
    feature_start_ : dict feature -> step from which an eval score (a feature with a
        ``_stderr`` column) counts: where the runs leave its floor (:func:`floor_ends`)
    reference_ : pandas.DataFrame (usable reference rows)
    broken_ : pandas.DataFrame (``run, step, why`` of broken reference checkpoints)
    loo_models_ : dict run -> PhaseModel fitted without that run (whole runs)
    reference_z_ : dict run -> (steps, |z|) of each reference run's features against the
        other whole runs (saved; the reference side of scoring new runs)
    reference_paths_ : dict (run left out, or None for the whole map) -> each reference
        row's Viterbi state on whole runs (-1: none); saved
    reference_performance_ : dict run -> (steps, signed z) of each reference run's
        performance columns against the other whole runs (saved, like ``reference_z_``)
    pooling_ : GroupStandardiser or None (``pool_by``)
    pool_check_ : dict or None: the leave-one-group-out check (rate, SE, per group)
    """

    def __init__(
        self,
        *,
        phase_model: PhaseModel | None = None,
        features: str | list[str] | None = None,
        performance: str | list[str] | None = "auto",
        alpha: float = 0.05,
        z_clip: float = 8.0,
        persistence: int = 3,
        top_k: int = 5,
        feature_floor: float = FEATURE_FLOOR,
        pool_by: str | None = None,
        n_jobs: int = 1,
        random_state: int = 0,
        progress: bool = False,
    ):
        self.phase_model = phase_model
        self.features = features
        self.performance = performance
        self.alpha = alpha
        self.z_clip = z_clip
        self.persistence = persistence
        self.top_k = top_k
        self.feature_floor = feature_floor
        self.pool_by = pool_by
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.progress = progress

    # -- fitting -------------------------------------------------------------------------
    def _check_params(self) -> None:
        if not 0 < self.alpha < 1:
            raise ScoringError(f"alpha={self.alpha} must be in (0, 1)")
        if self.z_clip <= 0 or self.persistence < 1 or self.top_k < 1:
            raise ScoringError("z_clip must be > 0, persistence and top_k >= 1")
        if not 0 <= self.feature_floor < 1:
            raise ScoringError(f"feature_floor={self.feature_floor} must be in [0, 1)")

    @_warn_once
    def fit(self, reference: pd.DataFrame | str | Path) -> RiskScorer:
        """Fit on a reference FeatureTable (DataFrame or Parquet path); returns self."""

        self._check_params()
        table = as_table(reference)
        if table.empty:
            raise ScoringError("the reference table is empty")
        model = self.phase_model
        if model is None:
            model = PhaseModel(random_state=self.random_state, n_jobs=self.n_jobs)
        self.pooling_, self.pool_check_ = None, None
        raw = table
        if self.pool_by is not None:
            table = self._pool(table)
            model = clone(model)  # a map of the standardised runs, not of raw sizes
        self.features_source_, chosen = self._deviation_spec(model)
        features = scoring_features(table, chosen)
        self.broken_ = broken_rows(table, features)
        clean = table.drop(index=self.broken_.index)
        clean = usable_rows(clean)
        runs = clean["run"].unique().tolist()
        if len(runs) < 3:
            raise ScoringError(f"the reference has {len(runs)} usable run(s); need at least 3")
        if not hasattr(model, "hmm_"):
            model = clone(model).fit(clean)
        self.phase_model_ = model
        degenerate = _degenerate(clean, features)
        self.degenerate_features_ = degenerate
        self.features_ = [f for f in features if f not in degenerate]
        if not self.features_:
            raise ScoringError("no usable deviation feature (all constant or discrete)")
        if degenerate:
            log.info("deviation leaves out %d discrete feature(s)", len(degenerate))
        performance = performance_features(table, self.performance)
        discrete = _degenerate(clean, performance)
        self.performance_features_ = [f for f in performance if f not in discrete]
        self.reference_ = clean
        starts = list(dict.fromkeys(self.features_ + self.performance_features_))
        # where an eval leaves its floor: on the runs' own values, pooled or not
        own = usable_rows(raw.drop(index=self.broken_.index)) if raw is not table else clean
        self.feature_start_ = floor_ends(own, starts)
        self.loo_models_ = self._fit_loo(clean, None)
        self.reference_z_ = self._whole_run_z()
        self.reference_performance_ = self._whole_run_performance()
        self.reference_paths_ = self._whole_run_paths()
        self.calibration_ = self._fit_calibration()
        log.info("%s", self.calibration_.summary())
        self._null_cache: dict = {}
        self._null_z: dict = {}
        return self

    def _deviation_spec(self, model: PhaseModel | None) -> tuple[str, str | list[str] | None]:
        """Where the deviation's columns come from, and their spec for
        :func:`scoring_features`: ``features`` when given (``"all"``: every column),
        else the map's own columns when the map was fitted on a chosen list (a risk about
        the columns the user chose), else every column."""
        if self.features == "all":
            return "all columns (features='all')", None
        if self.features is not None:
            return "chosen for the scorer (features=...)", self.features
        chosen = getattr(model, "features", None)
        if chosen is not None:
            return "the map's (fitted on a chosen list)", chosen
        return "every feature column (default)", None

    def _pool(self, table: pd.DataFrame) -> pd.DataFrame:
        """The reference standardised per ``pool_by`` group, after the leave-one-group-out
        exchangeability check (:func:`~polymap.scoring.pooling.check_exchangeable`)."""
        columns = scoring_features(table, self._deviation_spec(self.phase_model)[1])
        columns += performance_features(table, self.performance)
        standardiser = GroupStandardiser(self.pool_by).fit(table, list(dict.fromkeys(columns)))
        standardised = standardiser.transform(table, leave_out=True)
        params = {**self.get_params(deep=False), "pool_by": None, "progress": False}
        template = params.pop("phase_model")

        def factory() -> RiskScorer:
            return RiskScorer(**params, phase_model=None if template is None else clone(template))

        check = check_exchangeable(factory, standardised, self.pool_by, self.alpha)
        groups = ", ".join(f"{g} {c['flagged']}/{c['runs']}" for g, c in check["groups"].items())
        if not check["passed"]:
            raise PoolingError(
                f"pool_by={self.pool_by!r}: the groups are not exchangeable after "
                f"standardisation: leaving each group out, {check['flagged']} of "
                f"{check['runs']} runs were flagged as new runs ({check['rate']:.3f} > alpha "
                f"{self.alpha} + 2 SE {check['se']:.3f}; {groups}); fit one scorer per group "
                "(polymap fit --group-by)"
            )
        log.info(
            "pooled %d groups by %s: leave-one-group-out check %d/%d flagged (%s)",
            len(check["groups"]), self.pool_by, check["flagged"], check["runs"], groups,
        )  # fmt: skip
        self.pooling_, self.pool_check_ = standardiser, check
        return standardised

    # -- the calibrated decision (polymap.scoring.calibration) ----------------------------
    def _fit_calibration(self) -> AnyLookCalibration:
        """Each reference run's evidence curves against the other whole runs (from the
        saved ``reference_z_`` and ``reference_performance_``): the reference side of the
        flag."""
        curves = {}
        for run in self.loo_models_:
            if run not in self.reference_z_:
                continue
            steps, z = self.reference_z_[run]
            perf = self.reference_performance_.get(run)
            curves[run] = self._curves(steps, z, perf, self.features_)
        return AnyLookCalibration(alpha=self.alpha).fit(curves, self.evidence_columns_)

    @property
    def evidence_columns_(self) -> list[str]:
        """The calibrated decision's columns: the deviation's, then each performance
        column's "worse" side."""
        return list(self.features_) + [f"{f} (worse)" for f in self.performance_features_]

    def _curves(self, steps, z, perf, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, L)`` of :func:`evidence_curves` from a run's deviation ``|z|`` (columns
        ``features``) and its performance ``(steps, z)`` (columns
        ``performance_features_``; 0 where it has no such checkpoint); an eval score
        counts from the step the reference leaves its floor."""
        steps = np.asarray(steps, dtype=np.int64)
        z = np.asarray(z, dtype=float).copy()
        for j, f in enumerate(features):
            if f in self.feature_start_:
                z[steps < self.feature_start_[f], j] = 0.0
        worse = np.zeros((len(steps), len(self.performance_features_)))
        if perf is not None and len(perf[0]) and len(self.performance_features_):
            at = {int(t): i for i, t in enumerate(np.asarray(perf[0]))}
            for i, t in enumerate(steps):
                if int(t) in at:
                    worse[i] = perf[1][at[int(t)]]
        return evidence_curves(steps, z, worse, self.z_clip, self.persistence)

    def _calibration(self, features: list[str]) -> AnyLookCalibration:
        """The calibration for the deviation columns ``features`` (all performance
        columns) at the current ``alpha``, cached."""
        key = (tuple(features), self.alpha)
        cache = self.__dict__.setdefault("_calibrations", {})
        if key not in cache:
            calibration = self.calibration_
            if list(features) != list(self.features_):
                columns = [self.features_.index(f) for f in features]
                columns += [len(self.features_) + j for j in range(len(self.performance_features_))]
                calibration = calibration.restricted(columns)
            cache[key] = calibration.at_alpha(self.alpha)
        return cache[key]

    def _calibrated(self, run: str, dev, perf, features: list[str], exclude: str | None) -> dict:
        """The calibrated decision for one run from its deviation ``(steps, |z|)`` and
        performance ``(steps, z)`` up to the cut: ``W`` at its last checkpoint, its p-value
        (any look), the first step at which it was flagged, and what drove it."""
        calibration = self._calibration(features)
        if dev is None or not len(dev[0]):
            return {}
        # float32, as the saved reference side: a run scored as a target and in the
        # backtest gets the same numbers, so the same decision at a threshold's edge
        dev = (dev[0], np.asarray(dev[1], dtype=np.float32))
        if perf is not None:
            perf = (perf[0], np.asarray(perf[1], dtype=np.float32))
        steps, L = self._curves(dev[0], dev[1], perf, features)
        W, V, u = calibration.looks(steps, L, exclude=exclude)
        if not len(W) or not np.isfinite(W).any():
            return {}
        pool = calibration.pool(exclude)
        last = float(W[-1])
        p = calibration.p_value(last, exclude)
        first = None
        if p <= self.alpha:
            threshold = _threshold(calibration, exclude, self.alpha)
            crossed = np.flatnonzero(threshold <= W) if math.isfinite(threshold) else []
            first = int(steps[crossed[0]]) if len(crossed) else int(steps[-1])
        worst = int(np.nanargmax(np.where(np.isfinite(V), V, -np.inf)))
        names = calibration.features_
        order = np.argsort(-np.nan_to_num(u[worst], nan=-np.inf), kind="stable")[:3]
        raw = np.expm1(L[worst])
        top = ", ".join(f"{names[j]} z={raw[j]:.1f} (u={u[worst, j]:.1f})" for j in order)
        median, mad = median_mad(pool) if len(pool) else (math.nan, math.nan)
        return {
            "W": last,
            "z": (last - median) / max(mad, 1e-12) if math.isfinite(median) else 0.0,
            "p": p,
            "p_conformal": calibration.conformal(last, exclude),
            "first": first,
            "explanation": f"largest calibrated deviation at step {int(steps[worst])}: {top}",
        }

    def _whole_run_paths(self) -> dict[str | None, np.ndarray]:
        """The Viterbi state of every reference row under each leave-one-run-out model
        (key: the run left out; -1 on its own rows) and under the whole map (key None),
        decoded on whole runs: the other runs' paths a scored run is compared with,
        cut at the horizon by keeping the rows up to it. Saved with the scorer."""
        reference = self.reference_
        keys = list(self.loo_models_) + [None]
        out = {}
        for key in keys:
            model = self.phase_model_ if key is None else self.loo_models_[key]
            part = reference if key is None else reference[reference["run"] != key]
            out[key] = _states_by_row(reference, _safe_predict(model, part))
        return out

    def _other_paths(self, key: str | None, cut: int) -> pd.DataFrame:
        states = self.reference_paths_[key]
        keep = (states >= 0) & (self.reference_["step"].to_numpy() <= cut)
        rows = self.reference_.loc[keep, ["run", "step"]].reset_index(drop=True)
        return rows.assign(state=states[keep].astype(int))

    def _against_whole_runs(self, compute) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``compute(target, others) -> (steps, z)`` for each reference run against the
        other *whole* runs, at all its checkpoints: what scoring new runs compares with.
        Per column and per checkpoint, so a horizon (the rows up to it) and a subset of
        columns are slices (:func:`_cut`): computed once and saved."""
        reference = self.reference_
        out = {}
        for run in self.loo_models_:
            target = reference[reference["run"] == run]
            others = reference[reference["run"] != run]
            steps, z = compute(target, others)
            out[run] = (np.asarray(steps, dtype=np.int64), z.astype(np.float32))
        return out

    def _whole_run_z(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each reference run's deviation |z| (:func:`feature_z`), whole runs."""
        return self._against_whole_runs(
            lambda target, others: feature_z(target, others, self.features_, self.feature_floor)
        )

    def _whole_run_performance(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each reference run's performance z (:func:`performance_z`), whole runs; empty
        without performance columns."""
        if not self.performance_features_:
            return {}
        return self._against_whole_runs(
            lambda target, others: performance_z(
                target, others, self.performance_features_, self.feature_start_
            )
        )

    def _template(self) -> PhaseModel:
        return clone(self.phase_model_).set_params(
            n_states=int(self.phase_model_.n_states_), n_folds=1, n_jobs=1, progress=False
        )

    def _fit_loo(self, reference: pd.DataFrame, cut: int | None) -> dict[str, PhaseModel]:
        from joblib import Parallel, delayed
        from tqdm.auto import tqdm

        runs = reference["run"].unique().tolist()
        template = self._template()
        desc = "leave-one-run-out fits" + (f" (step <= {cut})" if cut is not None else "")
        bar = tqdm(runs, desc=desc, unit="run", disable=not self.progress, leave=False)
        fitted = Parallel(n_jobs=self.n_jobs)(
            delayed(_fit_without)(template, reference, run) for run in bar
        )
        for _, messages in fitted:
            _pass_on(messages)
        return dict(zip(runs, (model for model, _ in fitted), strict=True))

    # -- signals -------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "reference_"):
            raise RuntimeError("this RiskScorer is not fitted yet; call fit() or load()")

    def _signals(self, model, target, others_paths, per: pd.DataFrame | None, perf=None) -> dict:
        """The signals of one (clean, cut) target run: path and likelihood under
        ``model`` against the other runs' paths, the deviation from its per-checkpoint
        evidence ``per`` (:meth:`_evidence`) and the performance from ``perf`` (``steps,
        z, columns`` of :func:`performance_z`, or None); each a per-checkpoint series, made
        persistent (:func:`persistent`) and aggregated by :func:`lasting_mean`."""
        out = {s: math.nan for s in SIGNALS}
        out.update(first_flag_step=None, explanation="no checkpoint before the horizon")
        out.update(self._performance(perf))
        if target.empty:
            return out
        try:
            if model is None:
                raise PhaseInputError("too few checkpoints before the horizon to fit one")
            loglik = model.score_checkpoints(target, clip=self.z_clip)["loglik"].to_numpy()
            out["likelihood"] = lasting_mean(persistent(-loglik, self.persistence))
            path = model.decode(target)
            per_path, timing = path_disagreement(path, others_paths)
            if len(per_path):
                out["path"] = lasting_mean(persistent(per_path, self.persistence)) + timing
        except PhaseInputError as err:
            out["explanation"] = f"phase model: {err}"
        if per is not None and len(per):
            worst = per.loc[per["evidence"].idxmax()]
            out["deviation"] = lasting_mean(per["evidence"].to_numpy())
            top = ", ".join(f"{f} z={z:.1f}" for f, z in worst["top"])
            out["explanation"] = f"largest persistent deviation at step {worst['step']}: {top}"
            out["_per"] = per
        else:
            out["explanation"] = "no comparable reference checkpoints"
        return out

    def _performance(self, perf) -> dict:
        """The performance signal from ``perf = (steps, z, columns)``: per checkpoint the mean
        over the performance features of the signed z (positive: worse), clipped at
        ``z_clip``, made persistent, aggregated by :func:`lasting_mean`."""
        if perf is None or not len(perf[0]):
            return {}
        steps, z, features = perf
        series = persistent(np.clip(z.mean(axis=1), -self.z_clip, self.z_clip), self.persistence)
        worst = int(np.argmax(series))
        order = np.argsort(-z[worst], kind="stable")[:3]  # the three worst columns there
        top = ", ".join(f"{features[j]} z={z[worst, j]:+.1f}" for j in order)
        return {
            "performance": lasting_mean(series),
            "_perf": pd.DataFrame({"step": np.asarray(steps), "value": series}),
            "performance_explanation": (
                f"performance worse than the reference at step {int(steps[worst])}: {top}"
            ),
        }

    def _reference_signals(
        self,
        cut: int,
        strict: bool,
        features: tuple[str, ...] | None = None,
        performance: tuple[str, ...] | None = None,
    ) -> dict[str, dict]:
        """Each reference run's signals at ``cut``, leave-one-run-out. ``strict``: every
        run cut at ``cut`` and the leave-one-out models refitted on the cut reference (a
        backtest); else the stored whole-run models and whole other runs. ``features``,
        ``performance``: the deviation and performance columns (default all of
        ``features_``, ``performance_features_``)."""
        features = list(features or self.features_)
        performance = list(self.performance_features_ if performance is None else performance)
        key = (cut, strict, tuple(features), tuple(performance))
        if key in self._null_cache:
            return self._null_cache[key]
        reference = self.reference_
        if strict:
            reference = reference[reference["step"] <= cut]
            fitted = self._null_cache.get(("models", cut))
            models = fitted if fitted is not None else self._fit_loo(reference, cut)
            self._null_cache[("models", cut)] = models
        else:
            models = self.loo_models_
        zs = {}
        columns = [self.features_.index(f) for f in features]
        for run in models:
            if not strict and run in self.reference_z_:  # cut and sliced, not recomputed
                zs[run] = _cut(self.reference_z_[run], cut, columns)
                continue
            others = reference[reference["run"] != run]
            target = reference[(reference["run"] == run) & (reference["step"] <= cut)]
            zs[run] = (
                feature_z(target, others, features, self.feature_floor) if len(target) else None
            )
        z_only = {r: v[1] for r, v in zs.items() if v is not None}
        out = {}
        for run, model in models.items():
            others = reference[reference["run"] != run]
            target = reference[(reference["run"] == run) & (reference["step"] <= cut)]
            if strict:
                others_paths = _safe_predict(model, others[others["step"] <= cut])
            else:  # the whole other runs' paths, cut
                others_paths = self._other_paths(run, cut)
            per = perf = None
            if zs[run] is not None:
                per = self._evidence(*zs[run], feature_noise(z_only, exclude=run), features)
            if performance and len(target):
                if not strict and run in self.reference_performance_:  # cut and sliced
                    own = [self.performance_features_.index(f) for f in performance]
                    sliced = _cut(self.reference_performance_[run], cut, own)
                    perf = (*sliced, performance) if sliced else None
                else:
                    perf = (
                        *performance_z(target, others, performance, self.feature_start_),
                        performance,
                    )
            out[run] = self._signals(model, target, others_paths, per, perf)
        self._null_z[key] = z_only
        self._null_cache[key] = out
        return out

    def _evidence(self, steps, z, noise, features) -> pd.DataFrame:
        starts = getattr(self, "feature_start_", {})
        if starts:  # an eval score counts only once the runs have left its floor
            z = z.copy()
            for j, f in enumerate(features):
                if f in starts:
                    z[np.asarray(steps) < starts[f], j] = 0.0
        return evidence_from_z(steps, z, features, self.z_clip, self.persistence, self.top_k, noise)

    # -- decisions -----------------------------------------------------------------------
    def _decide(
        self, run: str, sig: dict, null: dict[str, dict], cut: int, n: int, calibrated: dict
    ) -> dict:
        """One run's row: the reported signals (path, likelihood and performance each with
        its own pointwise p-value, as before) and the decision, which is the calibrated
        deviation's (``calibrated``, :meth:`_calibrated`): ``deviation`` is the run's
        statistic W, ``p_deviation`` its any-look p-value, and ``p_value`` that p-value."""
        row = {"run": run}
        for name in SIGNALS:
            value = sig[name]
            pool = np.array([s[name] for r, s in null.items() if r != run], dtype=float)
            pool = pool[np.isfinite(pool)]
            row[name] = value
            if name == "deviation" or not math.isfinite(value) or len(pool) < 2:
                row[f"{name}_z"], row[f"p_{name}"] = 0.0, 1.0
                continue
            z, p = _tail(value, pool, SIGNAL_FLOORS[name])
            if name == "path":  # discrete, mostly 0: only its rank is honest
                p = _conformal(value, pool)
            row[f"{name}_z"], row[f"p_{name}"] = z, p
        decided = bool(calibrated) and n > 0
        p_value = calibrated["p"] if decided else 1.0
        row.update(
            deviation=calibrated["W"] if decided else math.nan,
            deviation_z=calibrated["z"] if decided else 0.0,
            p_deviation=p_value,
            p_conformal=calibrated["p_conformal"] if decided else 1.0,
        )
        flagged = decided and p_value <= self.alpha
        explanation = calibrated["explanation"] if decided else sig["explanation"]
        row.update(
            risk=1.0 - p_value,
            flagged=bool(flagged),
            p_value=p_value,
            first_flag_step=calibrated["first"] if flagged else None,
            horizon_step=cut,
            n_checkpoints=n,
            explanation=explanation,
        )
        return row

    def _broken_row(self, run: str, broken: pd.DataFrame, cut: int, n: int) -> dict:
        first = broken.sort_values("step").iloc[0]
        row = {"run": run, **{s: math.nan for s in SIGNALS}}
        row.update({f"{s}_z": math.nan for s in SIGNALS})
        row.update({f"p_{s}": math.nan for s in SIGNALS})
        row.update(
            risk=1.0,
            flagged=True,
            p_value=0.0,
            p_conformal=math.nan,
            first_flag_step=int(first["step"]),
            horizon_step=cut,
            n_checkpoints=n,
            explanation=f"{first['why']} at step {int(first['step'])}"
            + (f" ({len(broken)} broken checkpoint(s))" if len(broken) > 1 else ""),
        )
        return row

    @_warn_once
    def score_reference(
        self, horizon: float | None = None, until_step: int | None = None
    ) -> pd.DataFrame:
        """Backtest mode: every reference run replayed as a live run, from its
        checkpoints up to the horizon, against the other runs (leave-one-run-out).

        The decision (``flagged``, ``p_value``, ``first_flag_step``) is exactly what
        :meth:`score` gives that run's rows cut at the horizon: its evidence up to the
        horizon against the other whole runs, with their whole-life threshold (the
        any-look rule, :mod:`polymap.scoring.calibration`). The reported path and
        likelihood signals still use models refitted on the reference cut at the
        horizon, as before."""
        self._check_fitted()
        cut = horizon_step(self.reference_, horizon, until_step)
        null = self._reference_signals(cut, strict=True)
        rows = []
        for run in sorted(set(null) | set(self.broken_["run"])):
            broken = self.broken_[(self.broken_["run"] == run) & (self.broken_["step"] <= cut)]
            n = int(((self.reference_["run"] == run) & (self.reference_["step"] <= cut)).sum())
            if len(broken):
                rows.append(self._broken_row(run, broken, cut, n + len(broken)))
            elif run in null:
                dev = _cut(self.reference_z_[run], cut, list(range(len(self.features_))))
                perf = None
                if run in self.reference_performance_:
                    columns = list(range(len(self.performance_features_)))
                    perf = _cut(self.reference_performance_[run], cut, columns)
                calibrated = self._calibrated(run, dev, perf, self.features_, exclude=run)
                rows.append(self._decide(run, null[run], null, cut, n, calibrated))
        return _frame(rows)

    @_warn_once
    def score(
        self,
        targets: pd.DataFrame | str | Path,
        horizon: float | None = None,
        until_step: int | None = None,
    ) -> pd.DataFrame:
        """Score new or partial runs against the whole reference, without refitting.

        Targets are cut at the horizon (a fraction of the reference runs' median length)
        or ``until_step``; a target run named like a reference run is compared with the
        reference without it.
        """

        self._check_fitted()
        targets = as_table(targets)
        if targets.empty:
            raise ScoringError("the target table is empty")
        for key in ("run", "step"):
            if key not in targets.columns:
                raise ScoringError(f"the target table has no {key!r} column")
        if getattr(self, "pooling_", None) is not None:
            targets = self.pooling_.transform(targets)
        features = [f for f in self.features_ if f in targets.columns]
        missing = [f for f in self.features_ if f not in targets.columns]
        if not features:
            raise ScoringError(
                f"targets lack all {len(missing)} reference feature(s), e.g. {missing[:5]}"
            )
        if missing:  # e.g. weights.*.rel_dist of a live run whose step 0 is not at hand
            log.warning(
                "targets lack %d of the reference's features (e.g. %s): the deviation "
                "uses the other %d, for the reference runs too",
                len(missing), missing[:3], len(features),
            )  # fmt: skip
        performance = tuple(f for f in self.performance_features_ if f in targets.columns)
        cut = horizon_step(self.reference_, horizon, until_step)
        null = self._reference_signals(cut, False, tuple(features), performance)
        targets = targets.copy()
        targets["run"] = targets["run"].astype(str)
        broken = broken_rows(targets, features)
        clean = targets.drop(index=broken.index)
        rows = []
        for run in sorted(targets["run"].unique()):
            own_broken = broken[(broken["run"] == run) & (broken["step"] <= cut)]
            target = clean[(clean["run"] == run) & (clean["step"] <= cut)]
            n = len(target) + len(own_broken)
            if len(own_broken):
                rows.append(self._broken_row(run, own_broken, cut, n))
                continue
            key = run if run in self.loo_models_ else None
            model = self.phase_model_ if key is None else self.loo_models_[run]
            others = self.reference_[self.reference_["run"] != run]
            others_paths = self._other_paths(key, cut)
            target = usable_rows(target) if len(target) else target
            per = perf = None
            calibrated = {}
            if len(target):
                steps, z = feature_z(target, others, features, self.feature_floor)
                z_null = self._null_z[(cut, False, tuple(features), performance)]
                per = self._evidence(steps, z, feature_noise(z_null, exclude=run), features)
                worse = None
                if performance:
                    q_steps, q = performance_z(
                        target, others, list(performance), self.feature_start_
                    )
                    perf = (q_steps, q, list(performance))
                    full = np.zeros((len(q_steps), len(self.performance_features_)))
                    for j, f in enumerate(performance):
                        full[:, self.performance_features_.index(f)] = q[:, j]
                    worse = (q_steps, full)
                calibrated = self._calibrated(run, (steps, z), worse, features, exclude=key)
            sig = self._signals(model, target, others_paths, per, perf)
            rows.append(self._decide(run, sig, null, cut, len(target), calibrated))
        return _frame(rows)

    # -- persistence ---------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``scorer.json`` + ``scorer.npz`` (+ ``scorer_reference.parquet``) into a
        MODEL_DIR (no pickles): the parameters, the deviation columns and every
        leave-one-run-out model's arrays."""
        from polymap.phases.io import model_arrays, model_meta

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "model.json").exists():
            self.phase_model_.save(directory)
        if self.pooling_ is not None:  # the map of the standardised runs, beside the user's
            self.phase_model_.save(directory / POOLED_MAP)
        params = {k: v for k, v in self.get_params(deep=False).items() if k != "phase_model"}
        arrays, loo = {}, {}
        for i, (run, model) in enumerate(self.loo_models_.items()):
            for name, value in model_arrays(model).items():
                arrays[f"m{i}.{name}"] = value
            loo[run] = {"index": i, **model_meta(model)}
            if run in self.reference_z_:
                arrays[f"z{i}.steps"], arrays[f"z{i}.z"] = self.reference_z_[run]
            if run in self.reference_performance_:
                arrays[f"q{i}.steps"], arrays[f"q{i}.z"] = self.reference_performance_[run]
            arrays[f"p{i}.state"] = self.reference_paths_[run]
        arrays["pfull.state"] = self.reference_paths_[None]
        arrays.update(self.calibration_.to_arrays())
        if self.pooling_ is not None:
            arrays.update(self.pooling_.to_arrays())
        meta = {
            "format": SCORER_FORMAT,
            "format_version": SCORER_VERSION,
            "params": params,
            "features": self.features_,
            "features_source": self.features_source_,
            "degenerate_features": self.degenerate_features_,
            "performance_features": self.performance_features_,
            "feature_start": {  # null: the runs never leave that eval's floor
                f: (None if math.isinf(v) else v) for f, v in self.feature_start_.items()
            },
            "loo_models": loo,
            "calibration": self.calibration_.to_meta(),
            "pooling": None
            if self.pooling_ is None
            else {**self.pooling_.to_meta(), "check": self.pool_check_},
        }
        with atomic_file(directory / "scorer.npz") as tmp:
            np.savez(tmp, **arrays)
        write_parquet(self.reference_, directory / "scorer_reference.parquet")
        write_csv(self.broken_, directory / "scorer_broken.csv")
        write_json(directory / SCORER_JSON, meta, default=jsonable)  # last: the commit point
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> RiskScorer:
        """Load a scorer saved by :meth:`save` (``polymap fit`` writes one into every
        MODEL_DIR). Scoring starts at once: nothing is refitted."""
        from polymap.phases.io import model_from_arrays

        directory = Path(directory)
        path = directory / SCORER_JSON
        if not path.exists():
            raise ScoringError(
                f"{directory}: no {SCORER_JSON} (a MODEL_DIR from before polymap's saved "
                "scorer, or not a model directory); refit with `polymap fit`"
            )
        try:
            meta = json.loads(path.read_text())
        except ValueError as err:
            raise ScoringError(f"{path}: unreadable ({err})") from err
        if not isinstance(meta, dict) or meta.get("format") != SCORER_FORMAT:
            raise ScoringError(f"{path}: not a {SCORER_FORMAT}")
        if meta.get("format_version") != SCORER_VERSION:
            raise ScoringError(
                f"{path}: scorer format version {meta.get('format_version')!r} is not "
                f"supported (this polymap reads {SCORER_VERSION}); refit with `polymap fit`"
            )
        pooling = meta.get("pooling")
        phase_model = PhaseModel.load(directory / POOLED_MAP if pooling else directory)
        scorer = cls(phase_model=phase_model, **meta["params"])
        with np.load(directory / "scorer.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        scorer.pooling_, scorer.pool_check_ = None, None
        if pooling:
            scorer.pooling_ = GroupStandardiser.from_saved(pooling, arrays)
            scorer.pool_check_ = pooling.get("check")
        scorer.loo_models_ = {}
        z_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        perf_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        performance = meta.get("performance_features", [])
        path_cache: dict[str | None, np.ndarray] = {}
        if "pfull.state" in arrays:
            path_cache[None] = arrays["pfull.state"]
        for run, spec in meta["loo_models"].items():
            prefix = f"m{spec['index']}."
            own = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            scorer.loo_models_[run] = model_from_arrays(PhaseModel, spec, own)
            z_key = f"z{spec['index']}."
            if f"{z_key}z" in arrays:
                z = arrays[f"{z_key}z"]
                if z.ndim != 2 or z.shape[1] != len(meta["features"]):
                    raise ScoringError(f"{directory / 'scorer.npz'}: {z_key}z has shape {z.shape}")
                z_cache[run] = (arrays[f"{z_key}steps"], z)
            if f"p{spec['index']}.state" in arrays:
                path_cache[run] = arrays[f"p{spec['index']}.state"]
            q = f"q{spec['index']}."
            if f"{q}z" in arrays and arrays[f"{q}z"].shape[1:] == (len(performance),):
                perf_cache[run] = (arrays[f"{q}steps"], arrays[f"{q}z"])
        scorer.phase_model_ = phase_model
        scorer.features_ = meta["features"]
        scorer.features_source_ = meta.get("features_source", "every feature column (default)")
        scorer.degenerate_features_ = meta["degenerate_features"]
        scorer.performance_features_ = performance
        scorer.feature_start_ = {
            str(f): (math.inf if v is None else float(v))
            for f, v in (meta.get("feature_start") or {}).items()
        }
        scorer.reference_ = pd.read_parquet(directory / "scorer_reference.parquet")
        scorer.broken_ = pd.read_csv(directory / "scorer_broken.csv")
        if scorer.broken_.empty:
            scorer.broken_ = pd.DataFrame(columns=["run", "step", "why"])
        scorer.broken_["run"] = scorer.broken_["run"].astype(str)
        scorer._null_cache = {}
        scorer._null_z = {}
        # saved by this version; an older save is computed now (same values)
        scorer.reference_z_ = z_cache if len(z_cache) == len(scorer.loo_models_) else {}
        if not scorer.reference_z_:
            scorer.reference_z_ = scorer._whole_run_z()
        scorer.reference_performance_ = perf_cache
        if len(perf_cache) != len(scorer.loo_models_):
            scorer.reference_performance_ = scorer._whole_run_performance()
        scorer.calibration_ = None
        if "calibration" in meta and "cal.curves" in arrays:
            try:
                scorer.calibration_ = AnyLookCalibration.from_saved(meta["calibration"], arrays)
            except (KeyError, TypeError, ValueError) as err:
                raise ScoringError(f"{directory / 'scorer.npz'}: calibration: {err}") from err
        if scorer.calibration_ is None:  # saved before the calibrated decision: computed now
            scorer.calibration_ = scorer._fit_calibration()
        rows = len(scorer.reference_)
        complete = len(path_cache) == len(scorer.loo_models_) + 1
        if complete and all(v.shape == (rows,) for v in path_cache.values()):
            scorer.reference_paths_ = path_cache
        else:
            scorer.reference_paths_ = scorer._whole_run_paths()
        return scorer


def _fit_without(
    template: PhaseModel, reference: pd.DataFrame, run: str
) -> tuple[PhaseModel, list[str]]:
    """A clone of ``template`` fitted without ``run`` (fewer states when a short horizon
    does not support K), and the phase model's warnings it raised (in a worker process
    too), which the caller logs once."""
    part = reference[reference["run"] != run]
    k = template.n_states
    with _phase_warnings() as caught:
        for states in range(k, 0, -1):  # a short horizon may not support K states
            try:
                return clone(template).set_params(n_states=states).fit(part), caught
            except PhaseInputError as err:
                if states == 1:  # too little left (one checkpoint a run): no path signals
                    log.info("no phase model without %s: %s", run, err)
                    return None, caught
    raise AssertionError("unreachable")


def _cut(saved: tuple[np.ndarray, np.ndarray], cut: int, columns: list[int]):
    """A saved whole-run ``(steps, z)`` cut at ``cut`` and sliced to ``columns`` (None
    when no checkpoint is left)."""
    steps, z = saved
    keep = steps <= cut
    return (steps[keep], z[keep][:, columns].astype(float)) if keep.any() else None


def _states_by_row(reference: pd.DataFrame, paths: pd.DataFrame) -> np.ndarray:
    """``paths``' states aligned with ``reference``'s rows (-1 where a row has none)."""
    index = pd.MultiIndex.from_frame(reference[["run", "step"]])
    states = paths.set_index(["run", "step"])["state"]
    return states.reindex(index).fillna(-1).to_numpy(np.int16)


def _safe_predict(model: PhaseModel | None, table: pd.DataFrame) -> pd.DataFrame:
    if model is None:
        return pd.DataFrame(columns=["run", "step", "state"])
    try:
        return model.decode(table)
    except PhaseInputError:
        return pd.DataFrame(columns=["run", "step", "state"])


COLUMNS = [
    "run",
    "risk",
    "flagged",
    "p_value",
    "p_conformal",
    *SIGNALS,
    *(f"{s}_z" for s in SIGNALS),
    *(f"p_{s}" for s in SIGNALS),
    "first_flag_step",
    "horizon_step",
    "n_checkpoints",
    "explanation",
]


def _frame(rows: list[dict]) -> pd.DataFrame:
    out = pd.DataFrame(rows, columns=COLUMNS)
    out["first_flag_step"] = out["first_flag_step"].astype("Int64")
    out["flagged"] = out["flagged"].astype(bool)
    return out.sort_values(["risk", "run"], ascending=[False, True], kind="stable").reset_index(
        drop=True
    )


__all__ = ["RiskScorer", "broken_rows", "deviation_evidence", "scoring_features"]
