"""The first scorer (v1), kept as the scorer benchmark's baseline, and the path signal.

:class:`polymap.scoring.RiskScorer` is polymap's scorer (calibrated p-values, bounded
evidence, saved with the map); ``score_runs`` below is the previous one (mean of three
signal z-scores, ``combined >= 3``), which ``benchmarks/bench_scorer.py`` runs side by side.

Reference = a FeatureTable of runs (+ the K of a fitted PhaseModel). A target is a
reference run (scored **leave-one-run-out**: the phase model, its scaler, the consensus
paths and the feature bands are all rebuilt without it, so no run vouches for itself) or a
new, possibly partial run. When the reference runs score each other (backtests), every
run is cut at the horizon first, as at the moment all of them reached it: no checkpoint
after the horizon reaches any model, band or pool (tested). New targets are cut at the
horizon and compared with the whole reference. Short horizons that cannot support K
states use the largest K that is not degenerate.

Signals (each also reported on its own):

1. ``path``: the target's Viterbi path against the other runs' paths at the same steps:
   the share of its checkpoints in a state other than the modal one, plus the share spent
   in *rare* states (visited by fewer than half the other runs), plus how early or late it
   entered the shared states (see :func:`path_divergence`);
2. ``likelihood``: mean per-checkpoint log-likelihood (forward algorithm) of the target
   under the model without it (reported as its negative, so higher = more anomalous);
3. ``deviation``: per checkpoint, robust z-scores of every feature against the other runs
   at the same step (median and 1.4826 MAD, reference curves interpolated in log step;
   the MAD is floored at 5% of the feature's inter-quartile range over the reference (its
   standard deviation when that range is 0) and, where the table has a ``<feature>_stderr``
   column (lm-eval standard errors), at the target value's own standard error, so
   a feature whose runs agree to many digits, like an early bias median, cannot explode),
   aggregated as the mean of the 5 largest |z|; the run's value is the mean over its
   checkpoints. The top features and steps are kept as the explanation.

Combination: each signal becomes a robust z against the same signal of the reference runs
(each of those computed leave-one-out too; spreads floored per signal, see
``SIGNAL_FLOORS``); ``combined`` is the mean of the three
(negative parts clipped at 0); ``risk = combined / (combined + 3)`` in [0, 1);
``flagged`` when ``combined >= 3`` (risk >= 0.5). ``first_deviation_step`` is the first
checkpoint whose deviation aggregate reaches ``DEVIATION_Z`` (5).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from polymap.errors import PolymapError
from polymap.phases import PhaseModel
from polymap.phases.preprocess import PhaseInputError, usable_rows
from polymap.robust import median_mad

log = logging.getLogger(__name__)
DEVIATION_Z = 5.0
TOP_K = 5
FLAG_Z = 3.0
SIGNALS = ("path", "likelihood", "deviation")


class ScoringError(PolymapError, ValueError):
    """Inputs the scorer cannot use; says why."""


def horizon_step(reference: pd.DataFrame, horizon: float | None, until_step: int | None) -> int:
    """The last step that may be used: ``until_step``, or ``horizon`` x the median final
    step of the reference runs."""
    if until_step is not None:
        return int(until_step)
    if horizon is None:
        return int(reference["step"].max())
    if not 0 < horizon <= 1:
        raise ScoringError(f"horizon={horizon} must be in (0, 1]")
    length = float(reference.groupby("run")["step"].max().median())
    return int(math.floor(horizon * length))


# Smallest spread used for each signal's robust z (in the signal's units): one checkpoint
# in twenty off the consensus path, 0.1 nats per checkpoint, half a z of deviation.
SIGNAL_FLOORS = {"path": 0.05, "likelihood": 0.1, "deviation": 0.5}


def _robust(values: np.ndarray, floor: float) -> tuple[float, float]:
    median, mad = median_mad(values)
    if not math.isfinite(median):
        return 0.0, 1.0
    return median, max(mad, floor)


def feature_deviation(
    target: pd.DataFrame, others: pd.DataFrame, features: list[str]
) -> tuple[float, pd.DataFrame]:
    """Mean over the target's checkpoints of the top-k robust |z| against ``others``;
    returns it and the per-checkpoint table (step, value, top features)."""
    from polymap.scoring.scorer import feature_z  # the same z as RiskScorer's

    steps, z = feature_z(target, others, features)
    rows = []
    for t in range(len(steps)):
        top = np.argsort(-z[t])[:TOP_K]
        rows.append(
            {
                "step": int(steps[t]),
                "value": float(z[t, top].mean()),
                "top": [(features[i], float(z[t, i])) for i in top[:3]],
            }
        )
    per = pd.DataFrame(rows, columns=["step", "value", "top"])
    return (float(per["value"].mean()) if len(per) else math.nan), per


def path_divergence(target_path: pd.DataFrame, other_paths: pd.DataFrame) -> float:
    """Disagreement of a path with the other runs' paths, in three parts that add up:
    the share of checkpoints off the modal state at the same step, the share spent in
    rare states (visited by fewer than half of the other runs), and the transition
    timing: the mean distance, in log(1 + step), between the target's entry into each
    state and the other runs' median entry, as a fraction of log(1 + last step)."""
    per, timing = path_disagreement(target_path, other_paths)
    return float(per.mean()) + timing if len(per) else math.nan


def path_disagreement(
    target_path: pd.DataFrame, other_paths: pd.DataFrame
) -> tuple[np.ndarray, float]:
    """Per checkpoint of ``target_path`` (in its order): 1 if off the other runs' modal
    state at the nearest step (in log step) plus 1 if in a rare state; and the timing
    term of :func:`path_divergence`."""
    if target_path.empty or other_paths.empty:
        return np.zeros(0), 0.0
    n_other = other_paths["run"].nunique()
    visits = other_paths.groupby("state")["run"].nunique()
    rare = {s for s, n in visits.items() if n < 0.5 * n_other}
    # the modal state per step (ties: the lowest state), counted with numpy
    steps, at = np.unique(other_paths["step"].to_numpy(), return_inverse=True)
    states = other_paths["state"].to_numpy(int)
    counts = np.zeros((len(steps), states.max() + 1))
    np.add.at(counts, (at, states), 1)
    modal = counts.argmax(axis=1)
    own_steps = np.log1p(target_path["step"].to_numpy(float))
    nearest = np.abs(np.log1p(steps)[None, :] - own_steps[:, None]).argmin(axis=1)
    seen = set(visits.index)
    per = [
        int(state != modal[i]) + int(state in rare or state not in seen)
        for state, i in zip(target_path["state"].to_numpy(int), nearest, strict=True)
    ]
    entries = other_paths.groupby(["run", "state"])["step"].min().groupby("state").median()
    own = target_path.groupby("state")["step"].min()
    span = math.log1p(max(float(target_path["step"].max()), 1.0))
    shifts = [
        abs(math.log1p(own[s]) - math.log1p(entries[s])) / span
        for s in own.index
        if s in entries.index and s not in rare
    ]
    return np.asarray(per, dtype=float), (float(np.mean(shifts)) if shifts else 0.0)


@dataclass
class _Signals:
    path: float
    likelihood: float
    deviation: float
    first_deviation_step: int | None
    explanation: str


def _signals(
    model: PhaseModel,
    target: pd.DataFrame,
    others: pd.DataFrame,
    features: list[str],
    others_paths: pd.DataFrame,
) -> _Signals:
    if target.empty:
        return _Signals(math.nan, math.nan, math.nan, None, "no checkpoint before the horizon")
    per_ckpt = model.score_checkpoints(target)
    likelihood = -float(per_ckpt["loglik"].mean())
    path = path_divergence(model.decode(target), others_paths)
    deviation, per = feature_deviation(target, others, features)
    hits = per[per["value"] >= DEVIATION_Z]
    first = int(hits["step"].iloc[0]) if len(hits) else None
    if len(per):
        worst = per.loc[per["value"].idxmax()]
        top = ", ".join(f"{f} z={z:.0f}" for f, z in worst["top"])
        explanation = f"largest deviation at step {worst['step']}: {top}"
    else:
        explanation = "no comparable reference checkpoints"
    return _Signals(path, likelihood, deviation, first, explanation)


def score_runs(
    reference: pd.DataFrame,
    n_states,
    targets: pd.DataFrame | None = None,
    horizon: float | None = None,
    until_step: int | None = None,
    features: str | list[str] | None = None,
    random_state: int = 0,
    restarts: int = 2,
    cache: dict | None = None,
) -> pd.DataFrame:
    """Score ``targets`` (default: every reference run, leave-one-run-out).

    ``cache`` (a dict kept by the caller) reuses the leave-one-out models and the
    reference runs' signals between calls with the same reference (online scoring).

    ``n_states``: K as an int, a fitted :class:`PhaseModel`, or a MODEL_DIR path (its
    K and features are used). This is the first scorer, kept as the benchmarks'
    baseline; :class:`polymap.scoring.RiskScorer` is the one to use.

    Returns SCORES: ``run, risk, flagged, combined, path, likelihood, deviation,
    path_z, likelihood_z, deviation_z, first_deviation_step, horizon_step,
    n_checkpoints, explanation``.
    """
    if isinstance(n_states, (str, Path)):
        n_states = PhaseModel.load(n_states)
    if isinstance(n_states, PhaseModel):
        features = features if features is not None else n_states.preprocessor_.features
        n_states = int(n_states.n_states_)
    if isinstance(n_states, bool) or not isinstance(n_states, (int, np.integer)) or n_states < 1:
        raise ScoringError(f"n_states={n_states!r}: give K, a fitted PhaseModel or a MODEL_DIR")
    reference = usable_rows(reference)
    runs = reference["run"].unique().tolist()
    if len(runs) < 3:
        raise ScoringError(f"the reference has {len(runs)} run(s); scoring needs at least 3")
    cut = horizon_step(reference, horizon, until_step)
    if targets is None:
        # Backtest mode: the reference runs score each other as at the time of the
        # horizon, so no checkpoint after it reaches any model, band or pool.
        reference = reference[reference["step"] <= cut]
    cache = {} if cache is None else cache
    models: dict = cache.setdefault("models", {})

    def model_without(run: str | None) -> PhaseModel:
        key = (run, cut if targets is None else None)
        if key not in models:
            part = reference if run is None else reference[reference["run"] != run]
            for k in range(n_states, 0, -1):  # short horizons may not support K states
                try:
                    models[key] = PhaseModel(
                        n_states=k,
                        restarts=restarts,
                        features=features,
                        random_state=random_state,
                    ).fit(part)
                    break
                except PhaseInputError:
                    if k == 1:
                        raise
            if models[key].n_states_ < n_states:
                log.info(
                    "K=%d at step %d (K=%d is degenerate there)",
                    models[key].n_states_,
                    cut,
                    n_states,
                )
        return models[key]

    def signals_for(run: str | None, target: pd.DataFrame) -> _Signals:
        model = model_without(run)
        others = reference if run is None else reference[reference["run"] != run]
        others_cut = others[others["step"] <= cut]
        feats = model.preprocessor_.features
        missing = [f for f in feats if f not in target.columns]
        if missing:
            raise ScoringError(f"target lacks reference feature(s) {missing[:5]}")
        return _signals(
            model, target[target["step"] <= cut], others_cut, feats, model.decode(others_cut)
        )

    ref_cache = cache.setdefault("reference_signals", {})
    if cut not in ref_cache:
        ref_cache[cut] = {run: signals_for(run, reference[reference["run"] == run]) for run in runs}
    ref_signals = ref_cache[cut]
    if targets is None:
        target_signals = ref_signals
    else:
        targets = usable_rows(targets)
        target_signals = {}
        for run, grp in targets.groupby("run", sort=True):
            exclude = run if run in runs else None
            target_signals[run] = signals_for(exclude, grp)
    rows = []
    for run, sig in target_signals.items():
        row = {"run": run}
        zs = []
        for name in SIGNALS:
            value = getattr(sig, name)
            pool = np.array([getattr(s, name) for r, s in ref_signals.items() if r != run])
            median, spread = _robust(pool, SIGNAL_FLOORS[name])
            z = (value - median) / spread if math.isfinite(value) else 0.0
            row[name], row[f"{name}_z"] = value, z
            zs.append(max(0.0, z))
        combined = float(np.mean(zs))
        rows_of = reference if targets is None else targets
        n = int(((rows_of["run"] == run) & (rows_of["step"] <= cut)).sum())
        if n == 0:
            combined = 0.0
        row.update(
            risk=combined / (combined + FLAG_Z),
            flagged=combined >= FLAG_Z,
            combined=combined,
            first_deviation_step=sig.first_deviation_step,
            horizon_step=cut,
            n_checkpoints=n,
            explanation=sig.explanation,
        )
        rows.append(row)
    columns = [
        "run",
        "risk",
        "flagged",
        "combined",
        *SIGNALS,
        *(f"{s}_z" for s in SIGNALS),
        "first_deviation_step",
        "horizon_step",
        "n_checkpoints",
        "explanation",
    ]
    out = pd.DataFrame(rows)[columns]
    out["first_deviation_step"] = out["first_deviation_step"].astype("Int64")
    return out.sort_values("risk", ascending=False, kind="stable").reset_index(drop=True)


def score_paths(paths: pd.DataFrame, until_step: int | None = None) -> pd.DataFrame:
    """Score state paths made elsewhere (``run, step, state``) with the path signal
    alone, each run against the other runs' paths (leave-one-run-out)."""
    missing = {"run", "step", "state"} - set(paths.columns)
    if missing:
        raise ScoringError(f"paths lack column(s) {sorted(missing)}")
    paths = paths.copy()
    paths["run"] = paths["run"].astype(str)
    if until_step is not None:
        paths = paths[paths["step"] <= until_step]
    runs = sorted(paths["run"].unique())
    if len(runs) < 3:
        raise ScoringError(f"{len(runs)} run(s) in the paths; scoring needs at least 3")
    values = {
        run: path_divergence(paths[paths["run"] == run], paths[paths["run"] != run]) for run in runs
    }
    rows = []
    for run, value in values.items():
        pool = np.array([v for r, v in values.items() if r != run])
        median, spread = _robust(pool, SIGNAL_FLOORS["path"])
        z = (value - median) / spread if math.isfinite(value) else 0.0
        combined = max(0.0, z)
        rows.append(
            {
                "run": run,
                "risk": combined / (combined + FLAG_Z),
                "flagged": combined >= FLAG_Z,
                "path": value,
                "path_z": z,
            }
        )
    out = pd.DataFrame(rows)
    return out.sort_values("risk", ascending=False, kind="stable").reset_index(drop=True)


__all__ = ["ScoringError", "horizon_step", "score_paths", "score_runs"]
