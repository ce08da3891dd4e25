"""Evidence calibrated feature by feature, and a flag whose false-alarm rate holds per
run over every look.

From a run's per-checkpoint z-scores to a p-value, top to bottom:

1. **Evidence per feature** (:func:`evidence_curves`). Each column's persistent,
   clipped evidence (|z| for the deviation, the signed "worse" z for a performance
   column, 0 where it is better) is turned into its *running maximum* over the run's
   checkpoints so far, on a ``log1p`` scale: ``L[t, f]``. A running maximum never
   falls, so what a run has shown stays shown.
2. **Calibrated per feature and step** (:meth:`AnyLookCalibration.looks`). ``L[t, f]``
   is compared with the reference runs' own running maxima of *that* feature at the
   same step (their value at their last checkpoint at or before ``t``):
   ``u[t, f] = (L[t, f] - median_s L_s[t, f]) / scale_f``, ``scale_f`` the feature's
   the larger of the residuals' pooled 1.4826 MAD and what its most extreme reference
   run implies (:func:`feature_scale`). A feature whose healthy runs routinely reach
   |z| = 20 has a large scale and weighs little; one whose healthy runs never pass 3
   weighs a lot. A column's scale is at least the median of its siblings' (the same
   statistic in other layers and roles, :func:`sibling_floor`).
3. **Combined** as ``V[t] = max_f u[t, f]`` (one strong clean feature is enough;
   hundreds of noisy ones cannot add up to a flag) and ``W[t] = max_{t' <= t} V[t']``:
   the run's statistic after each look, non-decreasing.
4. **One threshold for the whole life.** Each reference run's whole-life ``W`` is
   computed the same way, leave-one-run-out (its curves against the other runs'). A run
   is flagged at look ``t`` when ``p(W[t]) <= alpha`` with ``p`` the tail of the
   reference runs' whole-life ``W``. Because ``W`` never falls and the threshold does not
   move, "flagged at some look up to the end of its life" is the same event as
   "flagged at its last look", so one test per run covers all of its looks: the
   probability that a healthy run is flagged at *any* checkpoint at which it is scored
   is the level of that one test, under the assumption that the new run is
   exchangeable with the reference runs (trained by the same recipe, seeds differ) and
   is checked no longer than the reference runs lasted. Backtest, ``score --until-step``,
   the online monitor and the callback all read ``W`` at their last checkpoint, so they
   give the same answer for the same checkpoints.
5. **A tail that is checked** (:attr:`AnyLookCalibration.self_check_`). With ``n``
   reference runs the distribution-free (conformal) p-value cannot go below
   ``1 / (n + 1)`` - 0.1 with 9 runs - so the p-value is a Student-t tail on the
   reference's ``W`` (robust median and MAD, ``0.37 (n - 1)`` degrees of freedom, the
   predictive ``sqrt(1 + 1/n)``). At fit the rule is checked on the reference itself:
   each reference run is scored leave-one-run-out against the others' ``W`` exactly as a
   new run is; when more than ``alpha`` of them are flagged the tail's scale is widened
   (x1.25, x1.5, x2, ... x8) until at most ``alpha`` are - and when none does, the
   p-value falls back to the conformal rank. There are two checks: for **new runs**
   every reference run counts (a new run is exchangeable with the reference as it is,
   its far-out runs included); for the **backtest** (reference runs scored against the
   others) runs beyond Tukey's far-out fence are left out (the reference holds the runs
   the backtest should find). The realised rates, their SEs and the widenings are saved
   and shown by ``polymap describe``.

>>> rng = np.random.default_rng(0)
>>> curves = {f"r{i}": (np.arange(10), np.abs(rng.normal(size=(10, 3)))) for i in range(12)}
>>> cal = AnyLookCalibration(alpha=0.05).fit(
...     {r: evidence_curves(s, z, np.zeros((10, 0)), 8.0, 3) for r, (s, z) in curves.items()},
...     ["a", "b", "c"])
>>> cal.self_check_["rate"] <= 0.05
True
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from polymap.robust import MAD_SCALE, median_mad

# a feature's pooled scale (log1p units) is at least this: a column whose reference
# running maxima are all equal (all clipped at z_clip, all 0) is not infinitely precise
SCALE_FLOOR = 0.1
# the widening factors tried, in order, when the self-check realises more than alpha
WIDENING = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
# the upper quartile of the standard normal: (q75 - median) / this is an SD
UPPER_QUARTILE = 0.6745
# Tukey's far-out fence (Q3 + 3 IQR): reference runs beyond it are outliers the rule
# should flag, not evidence about the healthy runs' tail, and are left out of the self-check
FAR_OUT = 3.0
# a step's location needs this many reference runs with a checkpoint at or before it
MIN_RUNS_AT_STEP = 3


def persistent(values: np.ndarray, window: int) -> np.ndarray:
    """Each checkpoint's value as far as it lasted: the minimum over it and the
    ``window - 1`` checkpoints before it (0 before a run has that many), along axis 0.

    >>> persistent(np.array([0.0, 9.0, 9.0, 1.0, 9.0]), 2).tolist()
    [0.0, 0.0, 9.0, 1.0, 1.0]
    >>> persistent(np.array([5.0, 5.0]), 3).tolist()     # shorter than the window
    [0.0, 0.0]
    """
    values = np.asarray(values, dtype=float)
    out = values.copy()
    for lag in range(1, max(1, window)):
        if lag >= len(values):  # no checkpoint that far back: 0 everywhere
            return np.zeros_like(values)
        shifted = np.concatenate([np.zeros((lag, *values.shape[1:])), values[:-lag]])
        out = np.minimum(out, shifted)
    return out


def feature_scale(residuals: np.ndarray) -> np.ndarray:
    """Each feature's scale from the reference runs' residuals ``L - location`` (runs x
    steps x features): the larger of

    - the bulk: 1.4826 MAD of the residuals pooled over runs and steps, and
    - the excursions: each run's largest residual (how far above the typical run it
      ever went), spread as ``(upper quartile - median) / 0.6745`` over the runs - a
      column in which healthy runs often jump far (a power-law fit early in training)
      gets the scale those jumps imply, not the scale of its quiet majority, while a
      few outlying runs in the reference (a backtest's planted runs) do not set it;

    at least :data:`SCALE_FLOOR`.

    >>> r = np.zeros((9, 1, 2)); r[:, 0, 0] = np.linspace(-1, 1, 9)
    >>> r[:, 0, 1] = [0, 0, 0, 0, 0, 1, 2, 3, 40]     # jumps in 4 runs of 9
    >>> feature_scale(r).round(2).tolist()
    [0.74, 2.97]
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bulk = MAD_SCALE * np.nanmedian(np.abs(residuals).reshape(-1, residuals.shape[2]), axis=0)
        excursion = np.nanmax(residuals, axis=1)  # runs x features
        q75, q50 = np.nanpercentile(excursion, [75, 50], axis=0)
        spread = (q75 - q50) / UPPER_QUARTILE
    scale = np.fmax(np.nan_to_num(bulk, nan=0.0), np.nan_to_num(spread, nan=0.0))
    return np.maximum(scale, SCALE_FLOOR)


def sibling_key(feature: str) -> str:
    """Columns that measure the same thing in other layers or roles: the feature set and
    the statistic's name (``spectral.layer3.attn_qkv.alpha`` -> ``spectral.alpha``).

    >>> sibling_key("spectral.layer3.attn_qkv.alpha"), sibling_key("evals_native.loss (worse)")
    ('spectral.alpha', 'evals_native.loss (worse)')
    """
    head, _, rest = feature.partition(".")
    return f"{head}.{rest.rpartition('.')[2]}" if rest else head


def sibling_floor(scale: np.ndarray, features: list[str]) -> np.ndarray:
    """Each column's scale, at least the median scale of its siblings
    (:func:`sibling_key`). Leave-one-run-out, a noisy column in which only the scored run
    happened to jump looks clean; its siblings in other layers show how such a statistic
    behaves in healthy runs (a power-law fit that jumps at steps 2-4 does so in every
    layer). A column without siblings keeps its own scale.

    >>> sibling_floor(np.array([0.1, 1.0, 2.0, 0.1]), ["s.a.x", "s.b.x", "s.c.x", "w.a.y"]).tolist()
    [1.0, 1.0, 2.0, 0.1]
    """
    keys = [sibling_key(f) for f in features]
    out = scale.copy()
    for key in set(keys):
        members = [j for j, k in enumerate(keys) if k == key]
        if len(members) > 1:
            out[members] = np.maximum(scale[members], np.median(scale[members]))
    return out


def evidence_curves(
    steps: np.ndarray,
    deviation: np.ndarray,
    performance: np.ndarray,
    z_clip: float,
    persistence: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A run's per-feature evidence curves ``(steps, L)``: ``L[t, f] = log1p`` of the
    running maximum over checkpoints ``<= t`` of the persistent (minimum over the last
    ``persistence`` checkpoints) evidence clipped to ``[0, z_clip]``; the deviation's
    columns (|z|) first, then the performance's (signed, positive = worse).

    >>> s, L = evidence_curves(np.array([1, 2, 3, 4]), np.array([[1.0], [5.0], [5.0], [0.0]]),
    ...                        np.zeros((4, 0)), 8.0, 2)
    >>> np.expm1(L[:, 0]).round(6).tolist()
    [0.0, 1.0, 5.0, 5.0]
    """
    evidence = np.hstack([np.abs(deviation), performance]) if performance.size else deviation
    evidence = np.clip(np.nan_to_num(np.asarray(evidence, dtype=float)), 0.0, z_clip)
    lasting = persistent(evidence, persistence)
    if not len(lasting):
        return np.asarray(steps, dtype=np.int64), lasting
    return np.asarray(steps, dtype=np.int64), np.log1p(np.maximum.accumulate(lasting, axis=0))


def _t_tail(x: float, pool: np.ndarray, widen: float = 1.0) -> float:
    """``P(T > (x - median) / (widen x max(MAD, floor) x sqrt(1 + 1/n)))`` for Student's t
    with ``0.37 (n - 1)`` degrees of freedom (at least 2; the MAD of n values is as
    informative as a standard deviation of about 37% as many): the predictive tail of one
    more run, its spread widened by the self-check.

    >>> round(_t_tail(3.0, np.array([0.0, 1.0, 2.0, 1.0, 1.5])), 3)
    0.066
    """
    from scipy.stats import t

    if len(pool) < 2 or not math.isfinite(x):
        return 1.0
    median, mad = median_mad(pool)
    z = (x - median) / max(mad, SCALE_FLOOR)
    df = max(2.0, 0.37 * (len(pool) - 1))
    return float(t.sf(z / widen / math.sqrt(1 + 1 / len(pool)), df))


class AnyLookCalibration:
    """The reference side of the calibrated decision (see the module docs).

    Attributes (after :meth:`fit`)
    ------------------------------
    grid_ : int array, the reference's checkpoint steps (sorted union)
    own_ : bool array (runs x grid), where each reference run has a checkpoint
    curves_ : float array (runs x grid x features), each reference run's ``L`` on the
        grid (its value at its last checkpoint at or before each step; NaN before its first)
    runs_ : list of str
    whole_life_ : dict run -> its whole-life ``W``, leave-one-run-out
    widen_ : float, the tail's widening for new runs after the self-check (1: none; inf:
        the conformal rank decides)
    widen_backtest_ : float, the same for reference runs scored against the others
    self_check_ : dict with ``n``, ``flagged``, ``rate``, ``se``, ``alpha``, ``widen``,
        ``conformal_floor``, ``runs_needed`` (for a distribution-free flag at alpha) of
        the new-run check, and ``backtest``: the backtest's check (with ``far_out``,
        ``fence``)
    """

    def __init__(self, alpha: float = 0.05):
        self.alpha = alpha

    def fit(self, curves: dict[str, tuple[np.ndarray, np.ndarray]], features: list[str]):
        """``curves``: run -> ``(steps, L)`` of :func:`evidence_curves` (each reference run
        against the *other* reference runs); ``features``: the names of ``L``'s columns."""
        self.features_ = list(features)
        self.runs_ = [r for r, (s, L) in curves.items() if len(s)]
        steps = [np.asarray(curves[r][0]) for r in self.runs_]
        self.grid_ = np.unique(np.concatenate(steps)) if steps else np.zeros(0, np.int64)
        self.curves_ = np.full((len(self.runs_), len(self.grid_), len(self.features_)), np.nan)
        self.own_ = np.zeros((len(self.runs_), len(self.grid_)), dtype=bool)
        for i, r in enumerate(self.runs_):
            s, L = curves[r]
            self.curves_[i] = self._on_grid(np.asarray(s), L)
            self.own_[i] = np.isin(self.grid_, s)
        return self._calibrate()

    def _calibrate(self):
        """The whole-life W of every reference run (leave-one-run-out) and the self-check."""
        self._stats: dict = {}
        self.whole_life_ = {}
        for i, r in enumerate(self.runs_):
            W, _, _ = self.looks(self.grid_[self.own_[i]], self.curves_[i][self.own_[i]], r)
            self.whole_life_[r] = float(W[-1]) if len(W) else math.nan
        self._self_check()
        return self

    def restricted(self, columns: list[int]) -> AnyLookCalibration:
        """The same reference with only ``columns`` of its features (a target table that
        lacks some): location, scale, whole-life W and the self-check recomputed."""
        out = AnyLookCalibration(alpha=self.alpha)
        out.features_ = [self.features_[j] for j in columns]
        out.runs_, out.grid_, out.own_ = self.runs_, self.grid_, self.own_
        out.curves_ = self.curves_[:, :, columns]
        return out._calibrate()

    def at_alpha(self, alpha: float) -> AnyLookCalibration:
        """This calibration with the self-check (and widening) redone for ``alpha``."""
        if alpha == self.alpha:
            return self
        out = AnyLookCalibration(alpha=alpha)
        out.features_, out.runs_, out.grid_ = self.features_, self.runs_, self.grid_
        out.own_, out.curves_ = self.own_, self.curves_
        out._stats, out.whole_life_ = self._stats, self.whole_life_
        out._self_check()
        return out

    # -- the reference's per-step location and per-feature scale ---------------------
    def _on_grid(self, steps: np.ndarray, L: np.ndarray) -> np.ndarray:
        """``L`` (a running maximum: a step function) read at every grid step."""
        at = np.searchsorted(steps, self.grid_, side="right") - 1
        out = np.where((at >= 0)[:, None], L[np.maximum(at, 0)], np.nan)
        return out

    def _location_scale(self, exclude: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Per grid step and feature the median of the reference runs' ``L`` (NaN where
        fewer than :data:`MIN_RUNS_AT_STEP` runs have a checkpoint), and per feature its
        scale (:func:`feature_scale`); without run ``exclude``. Cached."""
        if exclude in self._stats:
            return self._stats[exclude]
        left_out = exclude if isinstance(exclude, frozenset) else {exclude}
        keep = [i for i, r in enumerate(self.runs_) if r not in left_out]
        block = self.curves_[keep]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            location = np.nanmedian(block, axis=0)
            count = np.isfinite(block).sum(axis=0)
            location[count < MIN_RUNS_AT_STEP] = np.nan
        scale = sibling_floor(feature_scale(block - location[None]), self.features_)
        self._stats[exclude] = (location, scale)
        return location, scale

    def looks(
        self, steps: np.ndarray, L: np.ndarray, exclude: str | None = None, columns=None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A run's statistic after each of its checkpoints: ``(W, V, u)`` with ``u`` the
        calibrated per-feature values (checkpoints x features), ``V`` their maximum per
        checkpoint and ``W`` its running maximum. ``exclude``: a reference run left out of
        the reference side (the run itself, when a reference run is scored).
        ``columns``: indices of the features to use (default all)."""
        steps = np.asarray(steps)
        if not len(steps) or not len(self.grid_):
            empty = np.zeros(0)
            return empty, empty, np.zeros((0, L.shape[1] if L.ndim == 2 else 0))
        location, scale = self._location_scale(exclude)
        at = np.searchsorted(self.grid_, steps, side="right") - 1
        before = at < 0
        loc = location[np.maximum(at, 0)]
        loc[before] = np.nan
        u = (L - loc) / scale[None]
        if columns is not None:
            u = u[:, columns]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            V = np.nanmax(np.where(np.isfinite(u), u, np.nan), axis=1) if u.shape[1] else None
        if V is None:
            V = np.full(len(steps), np.nan)
        V = np.where(np.isfinite(V), V, -np.inf)
        W = np.maximum.accumulate(V)
        W = np.where(np.isfinite(W), W, np.nan)
        return W, V, u

    # -- the decision --------------------------------------------------------------------
    def pool(self, exclude: str | frozenset | None = None) -> np.ndarray:
        """The reference runs' whole-life ``W`` (without ``exclude``: a run, or a set of
        runs), finite only."""
        left_out = exclude if isinstance(exclude, frozenset) else {exclude}
        values = [w for r, w in self.whole_life_.items() if r not in left_out]
        values = np.asarray(values, dtype=float)
        return values[np.isfinite(values)]

    def widen_for(self, exclude: str | None) -> float:
        """The widening of the mode: a reference run scored against the others (a
        backtest replay, ``exclude`` its name) or a new run (``exclude`` None)."""
        return self.widen_ if exclude is None else self.widen_backtest_

    def p_value(self, W: float, exclude: str | None = None) -> float:
        """The one-sided p-value of a run whose statistic is ``W``: the widened t tail of
        its mode (:meth:`widen_for`), or the conformal rank when that mode's self-check
        found no widening that holds."""
        widen = self.widen_for(exclude)
        if math.isinf(widen):
            return self.conformal(W, exclude)
        return _t_tail(W, self.pool(exclude), widen)

    def conformal(self, W: float, exclude: str | None = None) -> float:
        """``(1 + #{reference W >= W}) / (n + 1)``: distribution-free, never below
        ``1 / (n + 1)``."""
        pool = self.pool(exclude)
        if not math.isfinite(W):
            return 1.0
        return (1 + int((pool >= W).sum())) / (len(pool) + 1)

    def _self_check(self) -> None:
        """Each reference run scored against the others' whole-life W as a run of that
        mode would be: the realised any-look false-alarm rate; the tail widened until it
        is <= alpha. Two checks, one per mode:

        - **new runs** (``self_check_``, ``widen_``): every reference run counts. The
          guarantee for a new run is exchangeability with the reference *as it is*: a
          reference run far from the others is part of that population (a healthy
          population with two modes has such runs), so its flag is a false alarm. Each
          run is scored without itself *and its nearest reference run*
          (:meth:`_without_relatives`), as a new run without a twin in the reference is;
        - **backtest** (``self_check_["backtest"]``, ``widen_backtest_``): runs beyond
          Tukey's far-out fence of the reference's W (``Q3 + 3 IQR``: 4.7 SD at the
          normal, distribution-free) are left out. A backtest's reference holds the very
          runs it is asked to find; they say nothing about the healthy runs' tail.
        """
        values = np.array([self.whole_life_[r] for r in self.runs_], dtype=float)
        finite = values[np.isfinite(values)]
        fence = math.inf
        if len(finite) >= 4:
            q1, q3 = np.percentile(finite, [25, 75])
            fence = q3 + FAR_OUT * (q3 - q1)
        scored = [r for r, w in zip(self.runs_, values, strict=True) if math.isfinite(w)]
        outside = [r for r in scored if self.whole_life_[r] > fence]
        self.widen_, self.self_check_ = self._check(scored, self._without_relatives(scored))
        backtest_runs = [r for r in scored if r not in outside]
        self.widen_backtest_, backtest = self._check(
            backtest_runs, {r: (self.whole_life_[r], r) for r in backtest_runs}
        )
        backtest.update(far_out=outside, fence=fence if math.isfinite(fence) else None)
        self.self_check_["backtest"] = backtest

    def _without_relatives(self, runs: list[str]) -> dict[str, tuple[float, frozenset]]:
        """For the new-run check: each run's whole-life W against the reference without
        it *and its nearest reference run* (the smallest mean |L| difference over steps
        and features), and that left-out pair. Runs that share a data order, a config
        or a node are closer to each other than to a new run; leaving one run out keeps
        its twin in the reference and makes the check see every run as ordinary."""
        index = {r: i for i, r in enumerate(self.runs_)}
        out = {}
        for r in runs:
            i = index[r]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                distance = np.nanmean(np.abs(self.curves_ - self.curves_[i][None]), axis=(1, 2))
            distance[i] = np.inf
            distance = np.where(np.isfinite(distance), distance, np.inf)
            left_out = frozenset({r, self.runs_[int(np.argmin(distance))]})
            own = self.own_[i]
            W, _, _ = self.looks(self.grid_[own], self.curves_[i][own], left_out)
            out[r] = (float(W[-1]) if len(W) else math.nan, left_out)
        return out

    def _check(self, runs: list[str], scored: dict) -> tuple[float, dict]:
        """The smallest widening (:data:`WIDENING`; inf: conformal) under which at most
        ``alpha`` of ``runs`` are flagged, each run's ``(W, left out)`` in ``scored``
        compared with the pool without the left-out runs; the check's record."""

        def flagged_at(widen: float) -> list[str]:
            out = []
            for r in runs:
                W, left_out = scored[r]
                if not math.isfinite(W):
                    continue
                if math.isinf(widen):
                    pool = self.pool(left_out)
                    p = (1 + int((pool >= W).sum())) / (len(pool) + 1)
                else:
                    p = _t_tail(W, self.pool(left_out), widen)
                if p <= self.alpha:
                    out.append(r)
            return out

        first = flagged_at(1.0)
        for widen in (*WIDENING, math.inf):  # inf: no widening holds, the rank alone
            flagged = flagged_at(widen)
            if len(flagged) <= self.alpha * len(runs):
                break
        n = len(runs)
        rate = len(flagged) / n if n else math.nan
        level = max(rate, self.alpha) if n else math.nan
        return widen, {
            "n": n,
            "alpha": self.alpha,
            "flagged_before_widening": len(first),
            "flagged": len(flagged),
            "rate": rate,
            "se": math.sqrt(level * (1 - level) / n) if n else math.nan,
            "widen": None if math.isinf(widen) else widen,
            "conformal_floor": 1 / (len(self.runs_) + 1),
            "runs_needed": max(0, math.ceil(1 / self.alpha) - 1),
        }

    def summary(self) -> str:
        """One paragraph for ``polymap describe`` and the log."""
        return self_check_text(self.self_check_)

    # -- persistence ---------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"cal.grid": self.grid_, "cal.curves": self.curves_, "cal.own": self.own_}

    def to_meta(self) -> dict:
        return {
            "alpha": self.alpha,
            "runs": self.runs_,
            "features": self.features_,
            "whole_life": self.whole_life_,
            "self_check": self.self_check_,
        }

    @classmethod
    def from_saved(cls, meta: dict, arrays: dict[str, np.ndarray]) -> AnyLookCalibration:
        out = cls(alpha=float(meta["alpha"]))
        out.runs_ = [str(r) for r in meta["runs"]]
        out.features_ = [str(f) for f in meta["features"]]
        out.grid_ = np.asarray(arrays["cal.grid"], dtype=np.int64)
        out.curves_ = np.asarray(arrays["cal.curves"], dtype=float)
        out.own_ = np.asarray(arrays["cal.own"], dtype=bool)
        expected = (len(out.runs_), len(out.grid_), len(out.features_))
        if out.curves_.shape != expected or out.own_.shape != expected[:2]:
            raise ValueError(f"cal.curves has shape {out.curves_.shape}, expected {expected}")
        out.whole_life_ = {
            str(r): (math.nan if w is None else float(w)) for r, w in meta["whole_life"].items()
        }
        out.self_check_ = dict(meta["self_check"])

        def widen(check: dict) -> float:
            return math.inf if check["widen"] is None else float(check["widen"])

        out.widen_ = widen(out.self_check_)
        out.widen_backtest_ = widen(out.self_check_["backtest"])
        out._stats = {}
        return out


def self_check_text(check: dict) -> str:
    """The self-checks (:attr:`AnyLookCalibration.self_check_`) in words."""
    text = "self-check, new runs: " + _one_check(check)
    backtest = check.get("backtest")
    if backtest:
        text += "; backtest: " + _one_check(backtest)
        if backtest.get("far_out"):
            text += f", {len(backtest['far_out'])} far-out run(s) left out: " + ", ".join(
                backtest["far_out"]
            )
    if check["conformal_floor"] > check["alpha"]:
        runs = round(1 / check["conformal_floor"]) - 1
        text += (
            f". With {runs} reference runs a distribution-free p-value cannot go below "
            f"{check['conformal_floor']:.3f} > alpha: flags rest on the checked t tail; "
            f"{check['runs_needed']} runs make the rank alone enough"
        )
    return text + "."


def _one_check(c: dict) -> str:
    text = (
        f"{c['flagged']} of {c['n']} reference runs flagged leave-one-run-out at alpha "
        f"{c['alpha']:g} over all their looks (rate {c['rate']:.3f}, SE {c['se']:.3f})"
    )
    if c["widen"] is None:
        text += (
            f", the t tail flagged {c['flagged_before_widening']} and no widening up to "
            f"x{WIDENING[-1]:g} held: the rank among the reference runs decides (conformal)"
        )
    elif c["widen"] > 1:
        text += (
            f", the t tail flagged {c['flagged_before_widening']} and was widened x{c['widen']:g}"
        )
    return text


def describe_scorer(directory) -> str:
    """The saved scorer of a MODEL_DIR in words (its decision's columns, alpha and
    self-check), read from ``scorer.json`` alone; "" when there is none. A grouped
    MODEL_DIR (``groups.json``) gives one paragraph per group."""
    import json
    from pathlib import Path

    from polymap.phases.model_dir import group_dir, read_groups

    directory = Path(directory)
    spec = read_groups(directory)
    if spec is not None:
        parts = [(g, describe_scorer(group_dir(directory, g))) for g in spec["groups"]]
        return "\n".join(f"[{spec.get('group_by')} = {g}] {t}" for g, t in parts if t)
    path = directory / "scorer.json"
    if not path.exists():
        return ""
    meta = json.loads(path.read_text())
    calibration = meta.get("calibration") or {}
    params = meta.get("params", {})
    deviation = meta.get("features", [])
    performance = meta.get("performance_features", [])
    source = meta.get("features_source", "every feature column")
    lines = [
        f"Risk scorer: flags at alpha {params.get('alpha', 0.05):g} per run over all its looks; "
        f"deviation columns: {len(deviation)}, {source} ({_listed(deviation)}); "
        f"performance columns: {len(performance)} ({_listed(performance)})."
    ]
    if calibration.get("self_check"):
        lines.append(self_check_text(calibration["self_check"]))
    pooling = meta.get("pooling")
    if pooling and pooling.get("check"):
        check = pooling["check"]
        per = ", ".join(f"{g} {c['flagged']}/{c['runs']}" for g, c in check["groups"].items())
        lines.append(
            f"Pooled reference: {check['runs']} runs in {len(check['groups'])} groups by "
            f"{pooling['by']!r}, each standardised by its own group; leaving each group out, "
            f"{check['flagged']} of {check['runs']} runs were flagged as new runs "
            f"({check['rate']:.3f}, SE at alpha {check['se']:.3f}; {per})."
        )
    return "\n".join(lines)


def _listed(names: list[str], most: int = 6) -> str:
    if not names:
        return "none"
    return ", ".join(names[:most]) + (
        f", ... {len(names) - most} more" if len(names) > most else ""
    )


__all__ = [
    "AnyLookCalibration",
    "describe_scorer",
    "evidence_curves",
    "persistent",
    "self_check_text",
]
