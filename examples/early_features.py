"""Do the richer feature sets move early for planted-unstable runs, and do they help the
scorer? On a ``polymap suite`` (default: the demo's), this

1. extracts ``shape, embedding, activations, gradients`` (and the demo's default sets) of
   every checkpoint;
2. draws four of them over training, planted-unstable runs in red
   (``OUT/early_features.png``);
3. backtests the early risk score at horizons 0.05, 0.1 and 0.25 with the default
   ``hu2023`` features, with the new sets alone, and with both, against the instability
   labels measured from the runs' own validation logs (``OUT/auroc.csv``).

``drift`` is left out of the backtest on purpose: it compares each checkpoint with the
run's *final* one, which an early warning cannot know.

    python examples/early_features.py demo-out/suite --out early
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import polymap  # noqa: E402
from polymap.scoring import RiskScorer, backtest  # noqa: E402
from polymap.suite import instability_labels, run_logs  # noqa: E402

NEW_SETS = "shape,embedding,activations,gradients"
PLOTTED = (
    ("activations.attn_logit_spread", "attention logit spread (max over layers)"),
    ("gradients.total_norm", "gradient norm on the probe batch"),
    ("shape.attn_qkv.kurtosis", "excess kurtosis of QKV weights"),
    ("embedding.in_cos_mean", "mean cosine of token embeddings"),
)
HORIZONS = (0.05, 0.1, 0.25)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", type=Path)
    parser.add_argument("--out", type=Path, default=Path("early"))
    parser.add_argument("--states", type=int, default=None, help="K (default: selected)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    table = polymap.extract(args.suite, out=args.out / "features.parquet",
                            features=f"hu2023,{NEW_SETS}")  # fmt: skip
    labels = instability_labels(run_logs(args.suite, "eval"))  # the suite's rule
    unstable = set(labels.loc[labels["unstable"], "run"])

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100, layout="constrained")
    for ax, (column, title) in zip(axes.flat, PLOTTED, strict=True):
        for run, grp in table.sort_values("step").groupby("run"):
            bad = run in unstable
            ax.plot(grp["step"], grp[column], color="crimson" if bad else "0.55",
                    lw=1.4 if bad else 0.8, zorder=3 if bad else 2)  # fmt: skip
        last = table["step"].max()
        for h in HORIZONS:
            ax.axvline(h * last, color="0.3", ls=":", lw=0.8)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(0, last)
        ax.set_title(f"{column}\n{title}", fontsize=9)
        ax.set_xlabel("step (dotted: horizons 5%, 10%, 25%)", fontsize=8)
    fig.suptitle("Early signals: planted-unstable runs (red) vs stable runs (grey)", fontsize=10)
    fig.savefig(args.out / "early_features.png")
    plt.close(fig)

    weights = ["hu2023"]
    new = NEW_SETS.split(",")
    rows = []
    for name, features in (("hu2023", weights), ("new sets", new), ("hu2023 + new", weights + new)):
        columns = [c for c in polymap.feature_columns(table) if c.split(".")[0] in features]
        # keep columns defined for every checkpoint (per-layer activations included)
        columns = [c for c in columns if table[c].notna().all() and np.isfinite(table[c]).all()]
        from polymap.phases import PhaseModel

        model = PhaseModel(features=columns, restarts=2, random_state=0,
                           n_states=args.states or "auto").fit(table)  # fmt: skip
        k = model.n_states_
        scorer = RiskScorer(phase_model=model, features=columns).fit(table)
        result = backtest(table, labels, HORIZONS, args.out / name.replace(" ", "_"),
                          scorer=scorer)  # fmt: skip
        for rec in result.itertuples():
            rows.append({"features": name, "n_features": len(columns), "K": k,
                         "horizon": rec.horizon, "auroc": rec.auroc,
                         "average_precision": rec.average_precision})  # fmt: skip
    out = pd.DataFrame(rows)
    out.to_csv(args.out / "auroc.csv", index=False)
    print(out.to_string(index=False))


if __name__ == "__main__":
    main()
