"""Fit Gaussian HMMs over all runs and choose the number of states.

For every K in the range and every restart r (seed ``random_state + 1000 K + r``):

- the runs are split into folds *by run* (whole runs held out, never single
  checkpoints); the model is fitted on the other folds and the log-likelihood per
  checkpoint of each held-out run is measured (``heldout_ll``: median over runs);
- the same restart is fitted on all runs for ``train_ll`` (per checkpoint), BIC and AIC.

A fit *converged* when the log-likelihood history stopped improving by more than ``tol``
per checkpoint before ``n_iter`` ran out (hmmlearn's ``monitor_.converged`` is also true when the
iterations run out, so it is not trusted). A fit is *degenerate* when a probability is
NaN or a state gets (almost) no posterior mass; degenerate fits are discarded and counted.

Rule (``states="auto"``): for each K take the restart with the best held-out
log-likelihood; the chosen K is the smallest whose held-out log-likelihood is within one
robust standard error of the best K's, comparing the two run by run (see
:func:`choose_k`; the one-standard-error rule: prefer the simpler map when the data
cannot tell them apart). With fewer than two runs there is no
run-level validation and K minimises BIC instead (a warning says so).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from polymap.phases.preprocess import PhaseInputError
from polymap.robust import median_se

log = logging.getLogger(__name__)
EMPTY_STATE_MASS = 1e-3  # fraction of checkpoints below which a state counts as empty


@dataclass
class FitResult:
    k: int
    restart: int
    seed: int
    model: object | None
    log_likelihood: float  # total, on the data it was scored on
    converged: bool
    degenerate: bool
    iterations: int


def n_parameters(k: int, d: int, covariance: str) -> int:
    """Free parameters of a Gaussian HMM (start, transitions, means, covariances)."""
    cov = k * d if covariance == "diag" else k * d * (d + 1) // 2
    return (k - 1) + k * (k - 1) + k * d + cov


def fit_hmm(
    X: np.ndarray,
    lengths: list[int],
    k: int,
    seed: int,
    covariance: str = "diag",
    n_iter: int = 200,
    tol: float = 1e-4,
) -> FitResult:
    """One seeded fit, judged for convergence and degeneracy."""
    from hmmlearn.hmm import GaussianHMM

    def attempt(implementation: str):
        model = GaussianHMM(
            n_components=k,
            covariance_type=covariance,
            n_iter=n_iter,
            tol=tol * len(X),  # hmmlearn's tol is on the total; ours is per checkpoint
            random_state=seed,
            min_covar=1e-3,
            implementation=implementation,
        )
        model.fit(X, lengths)
        model.implementation = "log"  # score and decode in log space: robust to outliers
        return model, float(model.score(X, lengths))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("hmmlearn").setLevel(logging.ERROR)
        try:
            try:  # the scaling forward-backward is faster; it underflows on far outliers
                model, total = attempt("scaling")
            except ValueError as err:
                if "underflow" not in str(err):
                    raise
                model, total = attempt("log")
        except (ValueError, np.linalg.LinAlgError, FloatingPointError) as err:
            log.debug("K=%d seed=%d failed: %s", k, seed, err)
            return FitResult(k, 0, seed, None, -math.inf, False, True, 0)
    monitor = model.monitor_
    history = list(monitor.history)
    improved = abs(history[-1] - history[-2]) if len(history) > 1 else math.inf
    converged = monitor.iter < n_iter or improved < tol * len(X)
    degenerate = not (
        np.isfinite(model.startprob_).all()
        and np.isfinite(model.transmat_).all()
        and np.isfinite(model.means_).all()
        and np.isfinite(total)
    )
    if not degenerate and k > 1:
        mass = model.predict_proba(X, lengths).sum(axis=0) / len(X)
        degenerate = bool((mass < EMPTY_STATE_MASS).any())
    return FitResult(k, 0, seed, model, total, converged, degenerate, monitor.iter)


def run_folds(n_runs: int, n_folds: int, seed: int) -> list[np.ndarray]:
    """Assign whole runs to folds (a seeded permutation)."""
    order = np.random.default_rng(seed).permutation(n_runs)
    return [order[i::n_folds] for i in range(n_folds)]


def _subset(X, lengths, run_ids):
    starts = np.cumsum([0] + lengths[:-1])
    parts = [X[starts[i] : starts[i] + lengths[i]] for i in run_ids]
    return np.concatenate(parts), [lengths[i] for i in run_ids]


def _evaluate(X, lengths, k, restart, seed, covariance, n_iter, tol, folds):
    full = fit_hmm(X, lengths, k, seed, covariance, n_iter, tol)
    full.restart = restart
    held = np.full(len(lengths), math.nan)  # per held-out run: log-likelihood / checkpoint
    for fold in folds:
        train_ids = [i for i in range(len(lengths)) if i not in set(fold.tolist())]
        Xtr, ltr = _subset(X, lengths, train_ids)
        if len(Xtr) < k:
            continue
        part = fit_hmm(Xtr, ltr, k, seed, covariance, n_iter, tol)
        if part.model is None or part.degenerate:
            continue
        for i in fold.tolist():
            Xte, lte = _subset(X, lengths, [i])
            held[i] = float(part.model.score(Xte, lte)) / len(Xte)
    return full, held


def select(
    X: np.ndarray,
    lengths: list[int],
    ks: list[int],
    restarts: int = 5,
    covariance: str = "diag",
    n_iter: int = 200,
    tol: float = 1e-4,
    n_folds: int = 3,
    random_state: int = 0,
    n_jobs: int = 1,
    progress: bool = False,
) -> tuple[list[dict], dict[int, FitResult]]:
    """Fit every (K, restart); return the selection rows and the best fit per K
    (``progress``: a bar over the fits as they finish)."""
    from tqdm.auto import tqdm

    n_runs = len(lengths)
    # n_folds < 2: no run-level validation (a forced K needs none; the scorer's
    # leave-one-run-out clones use it)
    cv = n_runs >= 2 and n_folds >= 2
    folds = run_folds(n_runs, min(n_folds, n_runs), random_state) if cv else []
    jobs = [(k, r, random_state + 1000 * k + r) for k in ks if k <= len(X) for r in range(restarts)]
    finished = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_evaluate)(X, lengths, k, r, seed, covariance, n_iter, tol, folds)
        for k, r, seed in jobs
    )
    bar = tqdm(total=len(jobs), desc="HMM fits (K x restart)", disable=not progress, leave=False)
    results = []
    for result in finished:  # in submission order, counted as they finish
        results.append(result)
        bar.update()
    bar.close()
    rows, best = [], {}
    d = X.shape[1]
    for (k, r, seed), (fit, held) in zip(jobs, results, strict=True):
        p = n_parameters(k, d, covariance)
        ll = fit.log_likelihood
        heldout = float(np.nanmedian(held)) if np.isfinite(held).any() else math.nan
        rows.append(
            {
                "k": k,
                "restart": r,
                "seed": seed,
                "train_ll": ll / len(X) if math.isfinite(ll) else math.nan,
                "heldout_ll": heldout,
                "heldout_runs": ";".join(f"{h:.6g}" for h in held),
                "bic": -2 * ll + p * math.log(len(X)) if math.isfinite(ll) else math.nan,
                "aic": -2 * ll + 2 * p if math.isfinite(ll) else math.nan,
                "converged": fit.converged,
                "degenerate": fit.degenerate,
                "iterations": fit.iterations,
                "chosen": False,
            }
        )
        if fit.model is not None and not fit.degenerate:
            current = best.get(k)
            if current is None or fit.log_likelihood > current.log_likelihood:
                best[k] = fit
    return rows, best


def _per_run(row: dict) -> np.ndarray:
    text = row.get("heldout_runs") or ""
    return np.array([float(v) for v in str(text).split(";") if v != ""], dtype=float)


def selection_statistic(rows) -> pd.DataFrame:
    """The one-standard-error rule's numbers, one row per K: ``k, heldout_ll`` (the best
    restart's median held-out log-likelihood per checkpoint), ``diff`` (median over runs
    of its paired difference to the best K), ``se`` (robust SE of that median:
    1.2533 * 1.4826 * MAD / sqrt(runs)), ``within`` (``diff >= -se``), ``n_runs``.
    ``rows``: the selection rows (a list of dicts or ``selection.csv``). What
    :func:`choose_k`, ``describe`` and the selection figure show."""
    frame = pd.DataFrame(rows)
    columns = ["k", "heldout_ll", "diff", "se", "within", "n_runs"]
    if frame.empty or "heldout_ll" not in frame:
        return pd.DataFrame(columns=columns)
    usable = frame[~frame["degenerate"].astype(bool) & np.isfinite(frame["heldout_ll"])]
    if usable.empty:
        return pd.DataFrame(columns=columns)
    best = usable.loc[usable.groupby("k")["heldout_ll"].idxmax()].sort_values("k")
    top_runs = _per_run(best.loc[best["heldout_ll"].idxmax()])
    out = []
    for rec in best.to_dict("records"):
        diff = _per_run(rec) - top_runs if len(_per_run(rec)) == len(top_runs) else np.array([])
        diff = diff[np.isfinite(diff)]
        median, se = median_se(diff)
        out.append({"k": int(rec["k"]), "heldout_ll": float(rec["heldout_ll"]), "diff": median,
                    "se": se, "within": bool(median >= -se) if len(diff) else False,
                    "n_runs": len(diff)})  # fmt: skip
    return pd.DataFrame(out, columns=columns)


def choose_k(rows: list[dict], best: dict[int, FitResult]) -> tuple[int, str]:
    """Apply the documented rule; returns (K, a sentence saying why).

    Each K is scored by the median over held-out runs of their log-likelihood per
    checkpoint, and compared with the best K run by run (paired): the chosen K is the
    smallest whose median paired difference is within one robust standard error
    (1.2533 * 1.4826 * MAD / sqrt(runs)) of zero (:func:`selection_statistic`). Medians
    keep a few outlier runs - exactly the runs polymap is meant to flag later - from
    deciding the map's size.
    """
    usable = [r for r in rows if not r["degenerate"] and r["k"] in best]
    if not usable:
        raise PhaseInputError("every fit was degenerate; try fewer states or other features")
    stats = selection_statistic(usable)
    if stats.empty:
        k = min(usable, key=lambda r: r["bic"])["k"]
        return k, f"K={k} minimises BIC (no run-level validation possible with one run)"
    top = stats.loc[stats["heldout_ll"].idxmax()]
    for rec in stats.itertuples():
        if rec.k == top["k"] or rec.within:
            return int(rec.k), (
                f"K={rec.k} is the smallest K whose held-out log-likelihood per checkpoint "
                f"(median over {rec.n_runs} runs held out whole: {rec.heldout_ll:.3f}) "
                f"is within one robust paired standard error ({rec.se:.3f}) of the best "
                f"(K={int(top['k'])}: {top['heldout_ll']:.3f})"
            )
    return int(top["k"]), f"K={int(top['k'])} has the best held-out log-likelihood"
