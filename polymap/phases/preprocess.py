"""From a FeatureTable to the matrix the phase model sees: select, transform, scale.

- **Selection**: feature sets (``"hu2023"``) or explicit columns; by default ``hu2023``
  when the table has it, else every feature column. Columns that are constant or have
  non-finite values in the reference table are dropped with a warning; rows that still
  have a missing value, or whose ``status`` is ``failed``, are dropped with a warning.
- **Log transform** (``log_transform=True``): columns positive everywhere whose largest
  value is over 10x their smallest get ``log``; the list is stored with the model.
- **Scaling**: ``"global"`` (default): a robust scaler (median / inter-quartile range)
  fitted on the reference runs together and stored with the model, so a new or partial
  run is scored on the same scale; ``"per-run"``: each run z-scored on its own
  trajectory, as the published training maps do (for comparison only: it erases level
  differences and cannot handle a run still in progress).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from polymap.errors import PolymapError
from polymap.table import feature_columns

log = logging.getLogger(__name__)
SCALES = ("global", "per-run")


class PhaseInputError(PolymapError, ValueError):
    """A table the phase model cannot use; says why."""


UNCERTAINTY_SUFFIX = "_stderr"


def select_columns(table: pd.DataFrame, features: str | list[str] | None) -> list[str]:
    """Columns named by ``features``: set names (``hu2023``), column names, or None."""
    available = feature_columns(table)
    if not available:
        raise PhaseInputError("the table has no feature columns (<set>.<name>)")
    # standard errors (``eval.*_stderr``) describe a measurement, not the training state:
    # they are chosen only when named one by one
    states = [c for c in available if not c.endswith(UNCERTAINTY_SUFFIX)]
    if features is None:
        chosen = [c for c in states if c.startswith("hu2023.")] or states
        return [c for c in chosen if c != "hu2023.nonfinite_fraction"]
    names = [f.strip() for f in features.split(",")] if isinstance(features, str) else features
    chosen: list[str] = []
    for name in names:
        if name in available:
            chosen.append(name)
            continue
        in_set = [c for c in states if c.startswith(name + ".")]
        if not in_set:
            raise PhaseInputError(f"feature or set {name!r} not in the table")
        chosen.extend(in_set)
    return list(dict.fromkeys(chosen))


@dataclass
class Preprocessor:
    """Fitted selection + transform + scaling (see module docs)."""

    features: list[str]
    log_features: list[str] = field(default_factory=list)
    scale: str = "global"
    center_: np.ndarray | None = None
    scale_: np.ndarray | None = None

    @classmethod
    def fit(
        cls,
        table: pd.DataFrame,
        features: str | list[str] | None = None,
        log_transform: bool = False,
        scale: str = "global",
    ) -> Preprocessor:
        if scale not in SCALES:
            raise PhaseInputError(f"scale={scale!r} is not one of {SCALES}")
        table = usable_rows(table)
        columns = select_columns(table, features)
        values = table[columns].to_numpy(dtype=float)
        keep = []
        for j, column in enumerate(columns):
            col = values[:, j]
            finite = np.isfinite(col)
            if finite.sum() < 0.5 * len(col):
                log.warning("dropping feature %s: mostly missing or non-finite", column)
            elif np.nanmax(col[finite]) == np.nanmin(col[finite]):
                log.warning("dropping feature %s: constant", column)
            else:
                keep.append(column)
        if not keep:
            raise PhaseInputError(f"no usable feature among {len(columns)} selected")
        logs = []
        if log_transform:
            for column in keep:
                col = table[column].to_numpy(dtype=float)
                col = col[np.isfinite(col)]
                if (col > 0).all() and col.max() > 10 * col.min():
                    logs.append(column)
        pre = cls(keep, logs, scale)
        raw = pre._transform_raw(table)
        if scale == "global":
            center = np.nanmedian(raw, axis=0)
            q75, q25 = np.nanpercentile(raw, [75, 25], axis=0)
            spread = q75 - q25
            fallback = np.nanstd(raw, axis=0)
            spread = np.where(spread > 0, spread, np.where(fallback > 0, fallback, 1.0))
            pre.center_, pre.scale_ = center, spread
        return pre

    def _transform_raw(self, table: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.features if c not in table.columns]
        if missing:
            raise PhaseInputError(
                f"{len(missing)} feature(s) the model was fitted on are missing from the "
                f"table, e.g. {missing[:5]}"
            )
        raw = table[self.features].to_numpy(dtype=float).copy()
        for j, column in enumerate(self.features):
            if column in self.log_features:
                with np.errstate(invalid="ignore", divide="ignore"):
                    raw[:, j] = np.log(raw[:, j])
        return raw

    def transform(self, table: pd.DataFrame) -> np.ndarray:
        """The scaled matrix for ``table`` (rows in table order)."""
        raw = self._transform_raw(table)
        if self.scale == "global":
            return (raw - self.center_) / self.scale_
        out = np.empty_like(raw)
        for _, index in table.groupby("run", sort=False).indices.items():
            block = raw[index]
            std = block.std(axis=0)
            out[index] = (block - block.mean(axis=0)) / np.where(std > 0, std, 1.0)
        return out

    def to_dict(self) -> dict:
        return {"features": self.features, "log_features": self.log_features, "scale": self.scale}


def usable_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by (run, step), without failed checkpoints; duplicates are an error."""
    if table.empty:
        raise PhaseInputError("the table is empty")
    for key in ("run", "step"):
        if key not in table.columns:
            raise PhaseInputError(f"the table has no {key!r} column")
    dup = table[["run", "step"]].duplicated(keep=False)  # not .duplicated(subset): O(columns)
    if dup.any():
        pairs = table.loc[dup, ["run", "step"]].drop_duplicates().head(5).values.tolist()
        raise PhaseInputError(f"duplicate (run, step) rows, e.g. {pairs}")
    if "status" in table.columns:
        failed = table["status"] == "failed"
        if failed.any():
            log.warning("ignoring %d failed checkpoint row(s)", int(failed.sum()))
            table = table[~failed]
    return table.sort_values(["run", "step"], kind="stable").reset_index(drop=True)


def complete_rows(table: pd.DataFrame, matrix: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Drop rows with any non-finite value (warned), keeping table and matrix aligned."""
    ok = np.isfinite(matrix).all(axis=1)
    if not ok.all():
        bad = table.loc[~ok, ["run", "step"]].head(5).values.tolist()
        log.warning("dropping %d row(s) with missing feature values, e.g. %s", (~ok).sum(), bad)
    return table[ok].reset_index(drop=True), matrix[ok]
