"""``PhaseModel``: latent training phases across runs, scikit-learn style.

The HMM is over *checkpoint order*: one observation per checkpoint, rows of each run
ordered by step, transitions between consecutive checkpoints whatever their spacing in
steps (Pythia's log-spaced early checkpoints and 1,000-step later ones count alike). A
state's step range and the transition counts in the training map are reported in steps
so this stays visible.

Examples
--------
>>> from polymap.phases import PhaseModel
>>> model = PhaseModel(n_states="auto", random_state=0).fit("features.parquet")  # doctest: +SKIP
>>> model.predict(table).head()                                                    # doctest: +SKIP
>>> model.save("model/"); PhaseModel.load("model/")                                # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from polymap.errors import UsageError
from polymap.phases.preprocess import (
    PhaseInputError,
    Preprocessor,
    complete_rows,
    usable_rows,
)
from polymap.phases.selection import choose_k, select
from polymap.table import as_table

log = logging.getLogger(__name__)
from polymap.phases.model_format import FORMAT, FORMAT_VERSION  # noqa: E402,F401 (re-export)

COVARIANCES = ("diag", "full")


def _aligned(frame: pd.DataFrame, result: pd.DataFrame) -> pd.DataFrame:
    """``result`` (keyed by run and step) in the rows and index of ``frame``."""
    keys = frame[["run", "step"]].astype({"run": str})
    out = keys.merge(result.astype({"run": str}), on=["run", "step"], how="left")
    out.index = frame.index
    return out


def _lengths(table: pd.DataFrame) -> list[int]:
    return table.groupby("run", sort=False).size().tolist()


class PhaseModel(BaseEstimator):
    """Gaussian HMM of training phases over all runs, with model selection.

    Parameters
    ----------
    n_states : "auto" or int
        ``"auto"`` selects K in ``states_range`` by run-level cross-validation (see
        :mod:`polymap.phases.selection`); an int forces K.
    states_range : tuple of int
        Candidate K for ``"auto"`` (default 1..8).
    restarts : int
        Seeded restarts per K.
    covariance : {"diag", "full"}
    features : str or list, optional
        Feature sets or columns (default: ``hu2023`` when present, else all).
    log_transform : bool
        Log positive heavy-tailed columns before scaling.
    scale : {"global", "per-run"}
    noise_merge : bool
        With ``"auto"`` K and a ``<feature>_stderr`` column for every feature (lm-eval
        scores): the largest K whose states differ by more than the measurement noise
        (:mod:`polymap.phases.noise`); ``n_states_likelihood_`` keeps the K before it.
    n_folds, n_iter, tol, n_jobs, random_state
        Cross-validation folds (by run; < 2 = no run-level validation), EM limits,
        joblib workers, seed. A scikit-learn estimator: ``sklearn.base.clone`` works.
    progress : bool
        A progress bar over the (K, restart) fits.

    Attributes
    ----------
    n_states_ : int
    n_states_likelihood_ : int (K chosen by held-out likelihood, before the noise rule)
    hmm_ : hmmlearn.hmm.GaussianHMM (canonical state order)
    preprocessor_ : Preprocessor
    selection_ : pandas.DataFrame
    reason_ : str
    """

    def __init__(
        self,
        *,
        n_states: str | int = "auto",
        states_range: tuple[int, ...] = tuple(range(1, 9)),
        restarts: int = 5,
        covariance: str = "diag",
        features: str | list[str] | None = None,
        log_transform: bool = False,
        scale: str = "global",
        n_folds: int = 5,
        n_iter: int = 200,
        tol: float = 1e-4,
        noise_merge: bool = True,
        n_jobs: int = 1,
        random_state: int = 0,
        progress: bool = False,
    ):
        self.n_states = n_states
        self.states_range = states_range
        self.restarts = restarts
        self.covariance = covariance
        self.features = features
        self.log_transform = log_transform
        self.scale = scale
        self.n_folds = n_folds
        self.n_iter = n_iter
        self.tol = tol
        self.noise_merge = noise_merge
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.progress = progress

    # -- fitting -----------------------------------------------------------------------
    def _validate(self) -> list[int]:
        if self.covariance not in COVARIANCES:
            raise UsageError(f"covariance={self.covariance!r} is not one of {COVARIANCES}")
        if self.n_states == "auto":
            ks = sorted({int(k) for k in self.states_range})
        elif isinstance(self.n_states, (int, np.integer)) and self.n_states >= 1:
            ks = [int(self.n_states)]
        else:
            raise UsageError(f"n_states={self.n_states!r} must be 'auto' or a positive int")
        if self.restarts < 1:
            raise UsageError(f"restarts={self.restarts} must be at least 1")
        return ks

    def fit(self, table: pd.DataFrame | str | Path) -> PhaseModel:
        """Fit on a FeatureTable (DataFrame or Parquet path); returns ``self``."""
        ks = self._validate()
        table = usable_rows(as_table(table))
        pre = Preprocessor.fit(table, self.features, self.log_transform, self.scale)
        table, X = complete_rows(table, pre.transform(table))
        lengths = _lengths(table)
        if len(X) == 0:
            raise PhaseInputError("no complete rows left to fit")
        if max(ks) > len(X) and self.n_states != "auto":
            raise PhaseInputError(
                f"n_states={max(ks)} but only {len(X)} checkpoint(s): need at least one per state"
            )
        ks = [k for k in ks if k <= len(X)]
        if len(lengths) < 2:
            log.warning("one run only: no run-level validation; K is chosen by BIC")
        if min(lengths) == 1:
            log.warning("some runs have a single checkpoint: they inform no transition")
        rows, best = select(
            X,
            lengths,
            ks,
            self.restarts,
            self.covariance,
            self.n_iter,
            self.tol,
            self.n_folds,
            self.random_state,
            self.n_jobs,
            progress=self.progress,
        )
        if len(ks) == 1:
            if ks[0] not in best:
                raise PhaseInputError(f"every fit with K={ks[0]} was degenerate")
            k, reason = ks[0], f"K={ks[0]} was forced (--states {ks[0]})"
        else:
            k, reason = choose_k(rows, best)
        self.n_states_likelihood_ = k
        if self.noise_merge and len(ks) > 1:
            k, reason = _within_noise(best, k, reason, rows, X, lengths, table, pre.features)
        chosen = best[k]
        for row in rows:
            row["chosen"] = row["k"] == k and row["seed"] == chosen.seed
        self.hmm_ = _canonical(chosen.model, X, lengths)
        self.preprocessor_ = pre
        self.n_states_ = k
        self.selection_ = pd.DataFrame(rows)
        self.reason_ = reason
        self.n_degenerate_ = int(self.selection_["degenerate"].sum())
        self.n_not_converged_ = int((~self.selection_["converged"]).sum())
        self.train_runs_ = table["run"].unique().tolist()
        self.train_table_ = table
        return self

    # -- inference ---------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "hmm_"):
            raise RuntimeError("this PhaseModel is not fitted yet; call fit() or load()")

    def _prepare(self, table) -> tuple[pd.DataFrame, np.ndarray, list[int]]:
        self._check_fitted()
        table = usable_rows(as_table(table))
        table, X = complete_rows(table, self.preprocessor_.transform(table))
        if len(X) == 0:
            raise PhaseInputError("no complete rows to predict")
        return table, X, _lengths(table)

    def decode(self, table: pd.DataFrame | str | Path) -> pd.DataFrame:
        """Viterbi paths of the complete rows, ordered by run and step: ``run, step,
        state`` (what the training map and the scorer use)."""
        table, X, lengths = self._prepare(table)
        _, states = self.hmm_.decode(X, lengths)
        return pd.DataFrame({"run": table["run"], "step": table["step"], "state": states})

    def posteriors(self, table: pd.DataFrame | str | Path) -> pd.DataFrame:
        """Posterior state probabilities of the complete rows, ordered by run and step:
        ``run, step, p0, p1, ...``."""
        table, X, lengths = self._prepare(table)
        post = self.hmm_.predict_proba(X, lengths)
        out = pd.DataFrame(post, columns=[f"p{i}" for i in range(post.shape[1])])
        out.insert(0, "step", table["step"].to_numpy())
        out.insert(0, "run", table["run"].to_numpy())
        return out

    def predict(self, table: pd.DataFrame | str | Path) -> pd.DataFrame:
        """Viterbi paths ``run, step, state``, one row per input row, aligned to the
        input's index (as scikit-learn's ``predict``); ``state`` is int64, or nullable
        ``Int64`` with ``<NA>`` where a row could not be decoded (a missing feature value)."""
        frame = as_table(table)
        out = _aligned(frame, self.decode(frame))
        # int64 states; the nullable Int64 only when some row has none
        return out.astype({"state": "Int64" if out["state"].isna().any() else "int64"})

    def predict_proba(self, table: pd.DataFrame | str | Path) -> pd.DataFrame:
        """Posterior state probabilities ``run, step, p0, p1, ...`` aligned to the
        input's index (NaN for a row that could not be decoded)."""
        frame = as_table(table)
        return _aligned(frame, self.posteriors(frame))

    def score(self, table: pd.DataFrame | str | Path) -> float:
        """Mean log-likelihood per checkpoint."""
        _, X, lengths = self._prepare(table)
        return float(self.hmm_.score(X, lengths)) / len(X)

    def score_checkpoints(
        self, table: pd.DataFrame | str | Path, clip: float | None = None
    ) -> pd.DataFrame:
        """Per-checkpoint ``log p(x_t | x_1..x_{t-1})`` of each run (the forward
        algorithm's normalisers; they sum to the run's log-likelihood). ``clip`` bounds
        each feature's influence (see :func:`emission_loglik`)."""
        table, X, lengths = self._prepare(table)
        out, start = [], 0
        for n in lengths:
            out.extend(forward_increments(self.hmm_, X[start : start + n], clip))
            start += n
        return pd.DataFrame({"run": table["run"], "step": table["step"], "loglik": out})

    # -- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write a MODEL_DIR: ``model.json`` + ``arrays.npz`` (no pickles),
        ``selection.csv`` and, for a model fitted in this session, the training map
        (``graph.json``, ``paths.csv``, ``posteriors.parquet``, ``table.parquet``), so
        ``polymap describe``, ``export`` and ``score`` accept it."""
        from polymap.phases.io import save_model
        from polymap.phases.model_dir import write_model_dir

        self._check_fitted()
        if hasattr(self, "train_table_"):
            return write_model_dir(self, self.train_table_, Path(directory))
        return save_model(self, Path(directory))

    @classmethod
    def load(cls, directory: str | Path) -> PhaseModel:
        from polymap.phases.io import load_model

        return load_model(cls, Path(directory))


def _within_noise(best, k, reason, rows, X, lengths, table, features) -> tuple[int, str]:
    """The largest K <= ``k`` whose states are pairwise distinguishable beyond the
    measurement noise (:mod:`polymap.phases.noise`); each K's closest pair is written
    into ``rows`` (``noise_separation``). Unchanged without stderr columns."""
    from polymap.phases.noise import critical_separation, min_separation, stderr_matrix

    stderr = stderr_matrix(table, features)
    if stderr is None:
        return k, reason
    values = table[features].to_numpy(float)
    c = critical_separation(len(features))
    chosen, closest = None, {}
    for kk in sorted((kk for kk in best if kk <= k), reverse=True):
        _, states = best[kk].model.decode(X, lengths)
        closest[kk] = min_separation(states, values, stderr)
        if chosen is None and closest[kk] >= c:
            chosen = kk
    for row in rows:
        fit = best.get(row["k"])
        row["noise_separation"] = closest.get(row["k"]) if fit and row["seed"] == fit.seed else None
    chosen = chosen if chosen is not None else min(closest)
    if chosen == k:
        return k, reason + (
            f"; its states differ by more than the measurement noise (closest pair "
            f"{closest[k]:.1f} SE >= {c:.2f})"
        )
    return chosen, (
        f"K={chosen} by the measurement-noise rule: every K from {chosen + 1} to {k} has two "
        f"states whose means differ by less than {c:.2f} standard errors in every feature "
        f"(closest pair at K={k}: {closest[k]:.1f} SE; at K={chosen}: {closest[chosen]:.1f} "
        f"SE). By held-out likelihood alone: {reason}"
    )


def _canonical(model, X: np.ndarray, lengths: list[int]):
    """Relabel states by the mean relative position of their first visit over runs
    (state 0 is where training starts); never-visited states go last by mean."""
    _, states = model.decode(X, lengths)
    k = model.n_components
    first = {s: [] for s in range(k)}
    start = 0
    for n in lengths:
        path = states[start : start + n]
        for s in range(k):
            hits = np.flatnonzero(path == s)
            if hits.size:
                first[s].append(hits[0] / max(1, n - 1))
        start += n
    key = [
        (np.mean(first[s]) if first[s] else math.inf, float(model.means_[s].sum()))
        for s in range(k)
    ]
    order = sorted(range(k), key=lambda s: key[s])
    return permute_states(model, order)


def permute_states(model, order: list[int]):
    """The same HMM with state ``order[i]`` renamed ``i`` (full covariances made exactly
    symmetric with eigenvalues at least the fit's ``min_covar``: :func:`covariance_floor`)."""
    order = np.asarray(order)
    diag = model.covariance_type == "diag"
    covars = model.covars_[order]
    model.startprob_ = model.startprob_[order]
    model.transmat_ = model.transmat_[np.ix_(order, order)]
    model.means_ = model.means_[order]
    if diag:
        model.covars_ = np.array([np.diag(c) for c in covars])
    else:
        model.covars_ = covariance_floor(covars, getattr(model, "min_covar", 1e-3))
    return model


def covariance_floor(covars: np.ndarray, floor: float) -> np.ndarray:
    """Full covariance matrices (K x D x D) made symmetric with every eigenvalue at least
    ``floor``: EM's M-step leaves a state that holds a few collinear checkpoints with a
    matrix that is numerically indefinite (hmmlearn then refuses it: "must be symmetric,
    positive-definite"); this is the regularisation hmmlearn's ``min_covar`` intends.

    >>> c = np.array([[[1.0, 1.0], [1.0, 1.0 - 1e-12]]])        # singular, not quite PSD
    >>> bool(np.linalg.eigvalsh(covariance_floor(c, 1e-3)).min() >= 1e-3 - 1e-12)
    True
    """
    out = []
    for c in np.asarray(covars, dtype=float):
        c = (c + c.T) / 2
        values, vectors = np.linalg.eigh(c)
        c = (vectors * np.maximum(values, floor)) @ vectors.T
        out.append((c + c.T) / 2)
    return np.array(out)


def emission_loglik(model, X: np.ndarray, clip: float | None = None) -> np.ndarray:
    """``log N(x_t; mu_k, Sigma_k)`` for every row and state, shape (n, K).

    ``clip``: bounded influence - each whitened residual (per feature for ``diag``, of the
    Cholesky-whitened vector for ``full``) counts at most ``clip`` standard deviations,
    so one wild feature cannot dominate a checkpoint's likelihood.
    """
    means = model.means_
    if model.covariance_type == "diag":
        var = np.array([np.diag(c) for c in model.covars_])  # (K, D)
        r2 = (X[:, None, :] - means[None, :, :]) ** 2 / var[None, :, :]
        logdet = np.log(2 * np.pi * var).sum(axis=1)
    else:
        r2 = np.empty((len(X), len(means), X.shape[1]))
        logdet = np.empty(len(means))
        for k, (m, c) in enumerate(zip(means, model.covars_, strict=True)):
            chol = np.linalg.cholesky(c + 1e-12 * np.eye(len(c)))
            white = np.linalg.solve(chol, (X - m).T).T
            r2[:, k, :] = white**2
            logdet[k] = X.shape[1] * np.log(2 * np.pi) + 2 * np.log(np.diag(chol)).sum()
    if clip is not None:
        r2 = np.minimum(r2, clip**2)
    return -0.5 * (logdet[None, :] + r2.sum(axis=2))


def forward_increments(model, X: np.ndarray, clip: float | None = None) -> np.ndarray:
    """``log p(x_t | x_<t)`` for t = 1..n under ``model`` (forward algorithm);
    ``clip`` bounds each feature's influence (see :func:`emission_loglik`)."""
    from scipy.special import logsumexp

    emissions = emission_loglik(model, X, clip)
    with np.errstate(divide="ignore"):
        log_start, log_trans = np.log(model.startprob_), np.log(model.transmat_)
    out = np.empty(len(X))
    alpha = log_start + emissions[0]
    for t in range(len(X)):
        if t:
            alpha = logsumexp(alpha[:, None] + log_trans, axis=0) + emissions[t]
        out[t] = logsumexp(alpha)
        alpha = alpha - out[t]
    return out
