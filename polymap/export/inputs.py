"""What an export draws from: a MODEL_DIR and, optionally, scores, labels and a backtest.

:func:`load_inputs` validates everything up front so that a bad argument fails before a
single file is written: a MODEL_DIR of another format or version, one without the
training map or table, scores or labels naming runs the model does not know, a metric
column that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from polymap.errors import PolymapError
from polymap.phases.preprocess import PhaseInputError


class ExportError(PolymapError, ValueError):
    """Inputs that cannot be exported; the message says which and why."""


@dataclass
class ExportInputs:
    """Everything the writers need, already checked."""

    model_dir: Path
    model: object  # PhaseModel
    graph: dict
    paths: pd.DataFrame  # run, step, state
    table: pd.DataFrame  # the training table
    describe: str
    metric: str | None
    scores: pd.DataFrame | None = None
    labels: pd.DataFrame | None = None
    backtest: pd.DataFrame | None = None

    @property
    def runs(self) -> list[str]:
        return sorted(self.paths["run"].unique())

    @property
    def flagged(self) -> set[str]:
        if self.scores is None or "flagged" not in self.scores:
            return set()
        return set(self.scores.loc[self.scores["flagged"].astype(bool), "run"])

    @property
    def unstable(self) -> set[str]:
        if self.labels is None:
            return set()
        return set(self.labels.loc[self.labels["unstable"].astype(bool), "run"])


def _read_csv(path, what: str, required: tuple[str, ...]) -> pd.DataFrame:
    """A CSV path, or a DataFrame as it is (from a notebook), with ``required`` columns."""
    if isinstance(path, pd.DataFrame):
        frame, path = path.copy(), f"({what} DataFrame)"
    else:
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"--{what} {path}: no such file")
        try:
            frame = pd.read_csv(path)
        except (ValueError, OSError) as err:
            raise ExportError(f"--{what} {path}: unreadable CSV ({err})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ExportError(f"--{what} {path}: missing column(s) {missing}")
    return frame


def _known_runs(frame: pd.DataFrame, runs: set[str], what: str, path) -> None:
    unknown = sorted(set(frame["run"].astype(str)) - runs)
    if unknown:
        raise ExportError(
            f"--{what} {path}: run(s) {unknown[:5]} are not in the model's training runs "
            f"({len(runs)} runs, e.g. {sorted(runs)[:3]}); score with this model's table"
        )


def default_metric(table: pd.DataFrame, features: list[str]) -> str | None:
    """The metric overlaid on timelines when none is asked for: a loss if there is one,
    else the model's first feature."""
    for column in ("evals_native.loss", "val_loss"):
        if column in table.columns and table[column].notna().any():
            return column
    return features[0] if features else None


def load_inputs(
    model_dir: str | Path,
    scores: str | Path | pd.DataFrame | None = None,
    labels: str | Path | pd.DataFrame | None = None,
    metric: str | None = None,
    table: str | Path | pd.DataFrame | None = None,
    backtest: str | Path | pd.DataFrame | None = None,
) -> ExportInputs:
    """Read and check a MODEL_DIR and the optional CSVs or DataFrames (see module docs):
    what every figure function of :mod:`polymap.export.figures` draws from.

    >>> inputs = load_inputs("model/", scores=scores_df, labels="labels.csv")  # doctest: +SKIP
    """
    from polymap.phases import PhaseModel, describe
    from polymap.phases.model_dir import read_graph, read_paths
    from polymap.table import as_table, read_table

    directory = Path(model_dir)
    if not directory.is_dir():
        raise ExportError(f"{directory}: not a directory (expected a MODEL_DIR from polymap fit)")
    if (directory / "groups.json").exists():
        raise ExportError(
            f"{directory}: a grouped MODEL_DIR (--group-by); export one group: {directory}/<value>"
        )
    try:
        model = PhaseModel.load(directory)
    except PhaseInputError as err:
        raise ExportError(str(err)) from err
    try:
        graph = read_graph(directory, model.n_states_)
        paths = read_paths(directory)
    except PhaseInputError as err:
        raise ExportError(str(err)) from err
    if table is not None:
        data = as_table(table)
    elif (directory / "table.parquet").exists():
        data = read_table(directory / "table.parquet")
    else:
        raise ExportError(
            f"{directory}: no table.parquet (MODEL_DIR from an older polymap); "
            "give the features with --table FEATURES.parquet"
        )
    data = data.merge(paths[["run", "step"]], on=["run", "step"], how="inner")
    if data.empty:
        raise ExportError("the table shares no (run, step) with the model's paths.csv")
    features = list(graph.get("features") or model.preprocessor_.features)
    if metric is None:
        metric = default_metric(data, features)
    elif metric not in data.columns:
        numeric = [c for c in data.columns if "." in c or c.endswith("loss")]
        raise ExportError(
            f"--metric {metric!r}: no such column; e.g. {numeric[:6]} "
            f"({len(numeric)} feature columns)"
        )
    runs = set(paths["run"].astype(str))
    inputs = ExportInputs(directory, model, graph, paths, data, describe(directory), metric)
    if scores is not None:
        inputs.scores = _read_csv(scores, "scores", ("run", "risk", "flagged"))
        _known_runs(inputs.scores, runs, "scores", scores)
    if labels is not None:
        inputs.labels = _read_csv(labels, "labels", ("run", "unstable"))
        _known_runs(inputs.labels, runs, "labels", labels)
    if backtest is not None:
        inputs.backtest = _read_csv(backtest, "backtest", ("horizon", "auroc"))
    return inputs
