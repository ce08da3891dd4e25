"""More reference, honestly: runs of several groups (model sizes, data orders) pooled into
one reference after per-group standardisation, only when a measured check says the
groups are exchangeable enough.

With 10 seeds the calibrated flag cannot reach p-values below ``1/11`` without a tail
model; PolyPythias has 5 sizes x 10 seeds, and a run of one size compared with all 49
others would have a conformal floor of ``1/50 = 0.02``. Sizes differ in every weight
statistic, so they cannot be pooled as they are. :class:`GroupStandardiser` maps every
run's features to "how far from its own group's typical run, in its group's units":

- **location**: per group, feature and step, the median over the group's runs (curves
  interpolated in ``log1p(step)``), leaving the run itself out for the reference runs
  (so a reference run is standardised exactly as a new run of that group is);
- **scale**: per group and feature, 1.4826 MAD of those residuals pooled over the
  group's runs and steps (the typical spread between runs of that group).

Whether that is enough is measured, not assumed (:func:`check_exchangeable`): each group
in turn is left out, a scorer is fitted on the other groups' standardised runs, and the
left-out group's runs are scored as new runs at the scorer's ``alpha``. If the groups are
exchangeable after standardisation, each run is flagged with probability at most
``alpha``; the realised rate over all runs and its binomial SE are saved with the scorer
and shown by ``polymap describe``, and pooling is refused (:class:`PoolingError`) when
the rate exceeds ``alpha + 2 SE`` - fit one scorer per group instead
(``polymap fit --group-by``).

>>> import pandas as pd
>>> t = pd.DataFrame({"run": ["a1", "a1", "a2", "a2", "a3", "a3"], "step": [1, 2] * 3,
...                   "size": ["s"] * 6, "x": [1.0, 2.0, 1.2, 2.2, 0.8, 1.8]})
>>> std = GroupStandardiser("size").fit(t, ["x"])
>>> std.transform(t.iloc[:2])["x"].round(2).tolist()       # a1 is the group's median run
[0.0, 0.0]
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from polymap.phases.preprocess import UNCERTAINTY_SUFFIX
from polymap.robust import MAD_SCALE
from polymap.scoring.curves import interpolate_run
from polymap.scoring.score import ScoringError

# a group needs this many runs: the leave-one-run-out location of a reference run is a
# median of at least two others
MIN_GROUP_RUNS = 3


class PoolingError(ScoringError):
    """The groups' runs are not exchangeable after per-group standardisation."""


class GroupStandardiser:
    """Per-group location (per step) and scale (per feature) of a reference table.

    Parameters
    ----------
    by : str
        The column naming each run's group (``size``, ``data_order``...): constant
        within a run.
    """

    def __init__(self, by: str):
        self.by = by

    def _groups(self, table: pd.DataFrame) -> pd.Series:
        if self.by not in table.columns:
            raise ScoringError(f"pool_by={self.by!r}: no such column in the table")
        per_run = table.groupby("run")[self.by].nunique(dropna=False)
        mixed = per_run[per_run > 1].index.tolist()
        if mixed:
            raise ScoringError(
                f"pool_by={self.by!r} must be constant within a run; it is not in {mixed[:5]}"
            )
        return table.groupby("run")[self.by].first().astype(str)

    def fit(self, table: pd.DataFrame, features: list[str]) -> GroupStandardiser:
        """Learn each group's location curve and scales from ``table`` (the reference)."""
        self.features_ = list(features)
        group_of = self._groups(table)
        counts = group_of.value_counts()
        small = counts[counts < MIN_GROUP_RUNS]
        if len(small):
            raise ScoringError(
                f"pool_by={self.by!r}: group(s) {dict(small)} have fewer than "
                f"{MIN_GROUP_RUNS} runs; each group needs {MIN_GROUP_RUNS} to be standardised"
            )
        self.group_of_ = group_of.to_dict()
        self.steps_, self.location_, self.scale_ = {}, {}, {}
        for group in sorted(counts.index):
            part = table[table["run"].map(self.group_of_) == group]
            steps = np.sort(part["step"].unique()).astype(np.int64)
            curves = self._curves(part, steps)
            self.steps_[group] = steps
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self.location_[group] = np.nanmedian(curves, axis=0)
            residuals = np.concatenate(
                [self._loo_residual(part, run) for run in part["run"].unique()]
            )
            self.scale_[group] = _scale(residuals)
        return self

    def _curves(self, part: pd.DataFrame, steps: np.ndarray) -> np.ndarray:
        tx = np.log1p(steps.astype(float))
        runs = [g.sort_values("step") for _, g in part.groupby("run")]
        return np.stack([interpolate_run(tx, run, self.features_) for run in runs])

    def _loo_residual(self, part: pd.DataFrame, run: str) -> np.ndarray:
        """``run``'s values minus the median of its group's other runs, at its steps."""
        mine = part[part["run"] == run].sort_values("step")
        own = mine["step"].to_numpy(np.int64)
        others = self._curves(part[part["run"] != run], own)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return mine[self.features_].to_numpy(float) - np.nanmedian(others, axis=0)

    def transform(self, table: pd.DataFrame, leave_out: bool = False) -> pd.DataFrame:
        """``table`` with every feature (and its ``_stderr``) standardised by its run's
        group. ``leave_out=True`` (the reference itself): each run against its group's
        *other* runs. A run whose group the reference did not have is an error."""
        group_of = self._groups(table)
        unknown = sorted(set(group_of) - set(self.location_))
        if unknown:
            runs = [r for r, g in group_of.items() if g in unknown]
            raise ScoringError(
                f"run(s) {runs[:5]} have {self.by}={unknown[:5]}, a group the pooled reference "
                f"does not have (it has {sorted(self.location_)})"
            )
        out = table.copy()
        for run, rows in table.groupby("run"):
            rows = rows.sort_values("step")
            group = group_of[run]
            steps = rows["step"].to_numpy(np.int64)
            if leave_out and run in self.group_of_:
                part = table[table["run"].map(group_of) == group]
                values = self._loo_residual(part, run)
            else:
                values = rows[self.features_].to_numpy(float) - self._location(group, steps)
            scale = self.scale_[group]
            out.loc[rows.index, self.features_] = values / scale
            for j, f in enumerate(self.features_):
                column = f"{f}{UNCERTAINTY_SUFFIX}"
                if column in out.columns:
                    out.loc[rows.index, column] = rows[column].to_numpy(float) / scale[j]
        return out

    def _location(self, group: str, steps: np.ndarray) -> np.ndarray:
        """The group's median curve at ``steps`` (linear in ``log1p(step)``, held at
        its ends outside the reference's steps)."""
        grid = np.log1p(self.steps_[group].astype(float))
        tx = np.log1p(np.asarray(steps, dtype=float))
        location = self.location_[group]
        out = np.full((len(tx), location.shape[1]), np.nan)
        for j in range(location.shape[1]):
            ok = np.isfinite(location[:, j])
            if ok.any():
                out[:, j] = np.interp(tx, grid[ok], location[ok, j])
        return out

    # -- saved with the scorer (JSON + npz) -------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for i, group in enumerate(sorted(self.location_)):
            arrays[f"pool{i}.steps"] = self.steps_[group]
            arrays[f"pool{i}.location"] = self.location_[group]
            arrays[f"pool{i}.scale"] = self.scale_[group]
        return arrays

    def to_meta(self) -> dict:
        return {
            "by": self.by,
            "features": self.features_,
            "groups": sorted(self.location_),
            "group_of": self.group_of_,
        }

    @classmethod
    def from_saved(cls, meta: dict, arrays) -> GroupStandardiser:
        out = cls(meta["by"])
        out.features_ = list(meta["features"])
        out.group_of_ = dict(meta["group_of"])
        out.steps_, out.location_, out.scale_ = {}, {}, {}
        for i, group in enumerate(meta["groups"]):
            out.steps_[group] = np.asarray(arrays[f"pool{i}.steps"])
            out.location_[group] = np.asarray(arrays[f"pool{i}.location"])
            out.scale_[group] = np.asarray(arrays[f"pool{i}.scale"])
        return out


def _scale(residuals: np.ndarray) -> np.ndarray:
    """Per column 1.4826 MAD of the finite residuals; their SD where that is 0; 1 where
    both are (a constant column stays as it is)."""
    out = np.ones(residuals.shape[1])
    for j in range(residuals.shape[1]):
        x = residuals[:, j]
        x = x[np.isfinite(x)]
        if not len(x):
            continue
        mad = MAD_SCALE * float(np.median(np.abs(x - np.median(x))))
        sd = float(np.std(x))
        out[j] = mad if mad > 0 else (sd if sd > 0 else 1.0)
    return out


def check_exchangeable(scorer_factory, standardised: pd.DataFrame, by: str, alpha: float) -> dict:
    """Leave one group out: fit ``scorer_factory()`` on the other groups' standardised
    runs, score the group's runs as new runs; the fraction flagged over all runs, its
    binomial SE and the per-group counts. ``passed`` when the rate is at most
    ``alpha + 2 SE`` (SE at ``alpha``: a rate the test cannot tell from ``alpha``)."""
    groups = standardised.groupby("run")[by].first().astype(str)
    flagged, per_group = 0, {}
    for group in sorted(groups.unique()):
        inside = groups.index[groups == group]
        others = standardised[~standardised["run"].isin(inside)]
        if others["run"].nunique() < MIN_GROUP_RUNS:
            raise PoolingError(f"pool_by={by!r}: leaving out {group!r} leaves too few runs")
        scores = scorer_factory().fit(others).score(standardised[standardised["run"].isin(inside)])
        k = int(scores["flagged"].sum())
        flagged += k
        per_group[group] = {"runs": int(len(inside)), "flagged": k}
    n = int(len(groups))
    rate = flagged / n
    se = math.sqrt(alpha * (1 - alpha) / n)
    return {
        "alpha": alpha,
        "runs": n,
        "flagged": flagged,
        "rate": rate,
        "se": se,
        "passed": bool(rate <= alpha + 2 * se),
        "groups": per_group,
    }
