"""``polymap backtest``: does the early score predict the later labels?

For each horizon the reference runs are scored leave-one-run-out from their checkpoints
up to that horizon only (:meth:`RiskScorer.score_reference`), and the risk is compared
with the labels (``run, unstable, onset_step``): AUROC and average precision
(scikit-learn), precision and recall of ``flagged``, and for every flagged unstable run
the lead time ``onset_step - first flag step`` (the first checkpoint whose persistent
deviation is twice the reference's typical one, else the horizon step). Writes
``DIR/backtest.csv``, ``DIR/scores_h<horizon>.csv`` and ``DIR/backtest.png``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from polymap.atomic import atomic_file, write_csv
from polymap.scoring.score import ScoringError
from polymap.scoring.scorer import RiskScorer
from polymap.table import as_table

log = logging.getLogger(__name__)


def read_labels(labels: pd.DataFrame | str | Path, runs: list[str]) -> pd.DataFrame:
    """Validate a labels table against the runs of the features table."""
    if not isinstance(labels, pd.DataFrame):
        try:
            labels = pd.read_csv(labels)
        except FileNotFoundError:
            raise ScoringError(f"--labels {labels}: no such file") from None
        except (ValueError, OSError, UnicodeDecodeError) as err:  # empty, not a CSV
            raise ScoringError(f"--labels {labels}: unreadable ({err})") from err
    missing = {"run", "unstable"} - set(labels.columns)
    if missing:
        raise ScoringError(f"labels lack column(s) {sorted(missing)}")
    labels = labels.copy()
    labels["run"] = labels["run"].astype(str)
    labels["unstable"] = labels["unstable"].astype(str).str.lower().isin(["true", "1", "yes"])
    unknown = sorted(set(labels["run"]) - set(runs))
    if unknown:
        raise ScoringError(f"labels name run(s) not in the features table: {unknown[:5]}")
    if labels["unstable"].all() or not labels["unstable"].any():
        raise ScoringError(
            "labels need both stable and unstable runs to measure prediction "
            f"({int(labels['unstable'].sum())} of {len(labels)} unstable)"
        )
    return labels


def group_scorers(
    features: pd.DataFrame,
    group_by: str,
    scorers: dict[str, RiskScorer] | None = None,
    **params,
) -> dict[str, RiskScorer]:
    """One fitted :class:`RiskScorer` per value of ``group_by`` (like with like: a 70M
    run against 70M runs): ``scorers[value]`` when given (a grouped MODEL_DIR's), else
    ``RiskScorer(**params)`` fitted on the group. A group of fewer than 3 runs has no
    reference: it is skipped with a warning (its runs are not scored)."""
    if group_by not in features.columns:
        raise ScoringError(f"--group-by {group_by!r}: no such column in the features table")
    out = {}
    for value, part in features.groupby(group_by, sort=True):
        key = str(value)
        if scorers is not None and key in scorers:
            out[key] = scorers[key]
            continue
        try:
            out[key] = RiskScorer(**params).fit(part)
        except ScoringError as err:
            log.warning("%s=%s not scored: %s", group_by, key, err)
    if not out:
        raise ScoringError(f"no {group_by} group has the 3 runs a reference needs")
    return out


def score_groups(scorers: dict[str, RiskScorer], group_by: str | None, **cut) -> pd.DataFrame:
    """Every group's reference runs scored leave-one-run-out at the horizon (``cut``:
    ``horizon=`` or ``until_step=``), one table (a ``group_by`` column when grouped),
    ordered by risk: calibrated p-values compare across groups."""
    parts = []
    for key, scorer in scorers.items():
        scores = scorer.score_reference(**cut)
        parts.append(scores.assign(**{group_by: key}) if group_by else scores)
    scores = pd.concat(parts, ignore_index=True)
    return scores.sort_values(["risk", "run"], ascending=[False, True], kind="stable").reset_index(
        drop=True
    )


def backtest(
    features: pd.DataFrame | str | Path,
    labels: pd.DataFrame | str | Path,
    horizons: tuple[float, ...] = (0.1, 0.25, 0.5),
    out: str | Path | None = None,
    scorer: RiskScorer | dict[str, RiskScorer] | None = None,
    phase_model=None,
    alpha: float = 0.05,
    random_state: int = 0,
    n_jobs: int = 1,
    progress: bool = False,
    group_by: str | None = None,
) -> pd.DataFrame:
    """One row per horizon: ``horizon, horizon_step, auroc, average_precision,
    n_flagged, true_positives, false_positives, precision, recall, median_lead_steps``.

    ``scorer``: a fitted :class:`RiskScorer` whose reference is ``features`` (as
    ``polymap fit`` saves one); else one is fitted with ``phase_model`` (a PhaseModel,
    fitted or not; default: K selected). ``group_by``: each group of runs is scored
    against its own runs only (``scorer`` may then be a dict value -> scorer, e.g. from
    a grouped MODEL_DIR) and the measures are computed over all groups' runs together.
    """
    from sklearn.base import clone
    from sklearn.metrics import average_precision_score, roc_auc_score
    from tqdm.auto import tqdm

    features = as_table(features)
    runs = sorted(features["run"].astype(str).unique())
    labels = read_labels(labels, runs)
    params = dict(alpha=alpha, random_state=random_state, n_jobs=n_jobs, progress=progress)
    if group_by is not None:
        given = scorer if isinstance(scorer, dict) else None
        model = clone(phase_model) if phase_model is not None else None
        scorers = group_scorers(features, group_by, given, phase_model=model, **params)
    else:
        if scorer is None:
            scorer = RiskScorer(phase_model=phase_model, **params).fit(features)
        scorers = {"": scorer}
    rows = []
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for h in tqdm(horizons, desc="backtest", unit="horizon", disable=not progress):
        scores = score_groups(scorers, group_by, horizon=h)
        merged = scores.merge(labels, on="run", how="inner")
        if merged["unstable"].all() or not merged["unstable"].any():
            raise ScoringError(
                f"the scored runs ({len(merged)}) are all labelled the same: nothing to "
                "measure prediction with"
            )
        y, risk = merged["unstable"].to_numpy(bool), merged["risk"].to_numpy(float)
        flagged = merged["flagged"].to_numpy(bool)
        leads = []
        for rec in merged[merged["flagged"] & merged["unstable"]].itertuples():
            flag = rec.first_flag_step
            flag = rec.horizon_step if flag is None or pd.isna(flag) else flag
            if "onset_step" in merged.columns and not pd.isna(rec.onset_step):
                leads.append(float(rec.onset_step) - float(flag))
        tp = int((flagged & y).sum())
        rows.append(
            {
                "horizon": h,
                "n_runs": len(merged),
                "n_unstable": int(y.sum()),
                "horizon_step": int(scores["horizon_step"].median()),
                "auroc": float(roc_auc_score(y, risk)),
                "average_precision": float(average_precision_score(y, risk)),
                "n_flagged": int(flagged.sum()),
                "true_positives": tp,
                "false_positives": int((flagged & ~y).sum()),
                "precision": tp / flagged.sum() if flagged.sum() else math.nan,
                "recall": tp / y.sum(),
                "median_lead_steps": float(np.median(leads)) if leads else math.nan,
            }
        )
        if out is not None:
            write_csv(scores, out / f"scores_h{h:g}.csv")
    table = pd.DataFrame(rows)
    if out is not None:
        write_csv(table, out / "backtest.csv")
        _plot(table, out / "backtest.png")
    return table


def plot_backtest(table: pd.DataFrame, ax=None):
    """AUROC and average precision of the early risk per horizon, with their chance
    levels (0.5; the share of unstable runs) and the median lead time at each point.
    Draws into ``ax`` (a matplotlib Axes) when given; returns the Figure.

    >>> fig = plot_backtest(backtest(features, "labels.csv"))      # doctest: +SKIP
    """
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    if ax is None:
        fig = Figure(figsize=(6.4, 3.6), dpi=120, layout="constrained")
        ax = fig.subplots()
    fig = ax.figure
    h = table["horizon"].to_numpy(float)
    ax.plot(h, table["auroc"], "o-", color="#0072B2", ms=7, lw=1.6, label="AUROC", zorder=3)
    if "average_precision" in table.columns:
        ax.plot(h, table["average_precision"], "s--", color="#D55E00", ms=9, mfc="none",
                mew=1.8, lw=1.4, label="average precision", zorder=4)  # fmt: skip
    ax.axhline(0.5, color="#0072B2", lw=0.8, ls=":", label="AUROC chance (0.5)")
    if {"n_unstable", "n_runs"} <= set(table.columns) and len(table):
        base = float(table["n_unstable"].iloc[0]) / max(1.0, float(table["n_runs"].iloc[0]))
        ax.axhline(base, color="#D55E00", lw=0.8, ls=":", label=f"AP chance ({base:.2f})")
    if "median_lead_steps" in table.columns:
        for x, y, lead in zip(h, table["auroc"], table["median_lead_steps"], strict=True):
            if np.isfinite(lead):
                ax.annotate(f"lead {lead:.0f} steps", (x, y), xytext=(0, -14),
                            textcoords="offset points", ha="center", fontsize=7,
                            color="0.3")  # fmt: skip
    ax.set_xlabel("horizon (fraction of training seen)")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.08)
    ax.set_xticks(h, [f"{v:g}" for v in h])
    ax.set_title("Does the early score predict later instability?", fontsize=10)
    ax.legend(loc="lower right", fontsize=7, frameon=False)
    return fig


def _plot(table: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as tmp:
        plot_backtest(table).savefig(tmp)
