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

import math
from pathlib import Path

import numpy as np
import pandas as pd

from polymap.scoring.score import ScoringError
from polymap.scoring.scorer import RiskScorer


def read_labels(labels: pd.DataFrame | str | Path, runs: list[str]) -> pd.DataFrame:
    """Validate a labels table against the runs of the features table."""
    if not isinstance(labels, pd.DataFrame):
        labels = pd.read_csv(labels)
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


def backtest(
    features: pd.DataFrame,
    labels: pd.DataFrame | str | Path,
    horizons: tuple[float, ...] = (0.1, 0.25, 0.5),
    out: str | Path | None = None,
    scorer: RiskScorer | None = None,
    phase_model=None,
    alpha: float = 0.05,
    random_state: int = 0,
    n_jobs: int = 1,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per horizon: ``horizon, horizon_step, auroc, average_precision,
    n_flagged, true_positives, false_positives, precision, recall, median_lead_steps``.

    ``scorer``: a fitted :class:`RiskScorer` whose reference is ``features`` (as
    ``polymap fit`` saves one); else one is fitted with ``phase_model`` (a PhaseModel,
    fitted or not; default: K selected).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score
    from tqdm.auto import tqdm

    runs = sorted(features["run"].astype(str).unique())
    labels = read_labels(labels, runs)
    if scorer is None:
        scorer = RiskScorer(
            phase_model=phase_model,
            alpha=alpha,
            random_state=random_state,
            n_jobs=n_jobs,
            progress=progress,
        ).fit(features)
    rows = []
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for h in tqdm(horizons, desc="backtest", unit="horizon", disable=not progress):
        scores = scorer.score_reference(horizon=h)
        merged = scores.merge(labels, on="run", how="inner")
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
                "horizon_step": int(scores["horizon_step"].iloc[0]),
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
            scores.to_csv(out / f"scores_h{h:g}.csv", index=False)
    table = pd.DataFrame(rows)
    if out is not None:
        table.to_csv(out / "backtest.csv", index=False)
        _plot(table, out / "backtest.png")
    return table


def _plot(table: pd.DataFrame, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    fig = Figure(figsize=(5, 3.2), dpi=120)
    ax = fig.subplots()
    ax.plot(table["horizon"], table["auroc"], "o-", label="AUROC")
    ax.plot(table["horizon"], table["average_precision"], "s--", label="average precision")
    ax.set_xlabel("horizon (fraction of training seen)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Does the early score predict later instability?")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
