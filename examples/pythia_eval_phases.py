"""Training phases of the 16 Pythia runs from their published lm-eval scores alone.

Reads the published per-checkpoint evaluations (0.3-era lm-eval JSON, the repository
layout ``pythia-v1/<run>/<zero-shot|five-shot>/<short>_step<N>.json``) with their standard
errors, and

1. fits a Gaussian HMM over the zero-shot accuracy trajectories of the eight main tasks
   (K by held-out likelihood, then the measurement-noise rule: states must differ by more
   than the evals' standard errors), prints the training map and where each run first
   leaves its starting state;
2. labels each task's accuracy with ``polymap label``'s rule, each model size against its
   own runs (``group_by="size"``: the standard and deduplicated run of each size);
3. scores every run's outlier risk from its checkpoints up to step 3000 (the early window
   in which PolyPythias saw outlier seeds leave the common path).

    python examples/pythia_eval_phases.py ../shared/data/pythia-evals/pythia-v1 --out pythia-map

Writes OUT/evals.parquet, OUT/model/ (a MODEL_DIR for ``polymap describe/export``),
OUT/labels.csv and OUT/scores.csv.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from polymap.evals import ingest
from polymap.phases import describe, fit_model_dir
from polymap.scoring import RiskScorer, label_runs
from polymap.table import write_table

TASKS = ("arc_easy", "arc_challenge", "lambada_openai", "logiqa", "piqa", "sciq", "winogrande",
         "wsc")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evals", type=Path, help="the pythia-v1 folder of results JSON")
    parser.add_argument("--out", type=Path, default=Path("pythia-map"))
    parser.add_argument("--until-step", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    table, report = ingest(args.evals, stderr=True)  # stderrs floor the deviation signal
    print(f"{report.files} files -> {len(table)} checkpoints of {table['run'].nunique()} runs")
    for file, reason in report.problems:
        print(f"  skipped {file}: {reason}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_table(table, args.out / "evals.parquet")

    # the model size, from the run name: like with like (70m with 70m-deduped)
    table = table.assign(size=table["run"].str.extract(r"pythia-([\d.]+[mb])", expand=False))

    columns = [f"eval.{task}.acc" for task in TASKS]
    model = fit_model_dir(table, args.out / "model", features=columns, random_state=args.seed)[""]
    print(describe(args.out / "model"))
    paths = model.predict(table)
    first = paths.groupby("run")["state"].transform("first")
    left = paths[paths["state"] != first].groupby("run")["step"].min()
    starts = sorted(paths.groupby("run")["state"].first().unique().tolist())
    print(f"\nevery run starts in state {starts};")
    print(f"first step in another state: {left.value_counts().sort_index().to_dict()} (step: runs)")

    logging.getLogger("polymap.scoring.labels").setLevel(logging.ERROR)  # said below
    labels = pd.concat(
        [label_runs(table, column, group_by="size").assign(metric=column) for column in columns],
        ignore_index=True,
    )
    labels.to_csv(args.out / "labels.csv", index=False)
    unstable = labels[labels["unstable"]]
    print(f"\nlabels (each size against its own two runs: no band, so only a loss-style "
          f"spike or a non-finite value could mark one): {len(unstable)} of {len(labels)} "
          "run x task trajectories unstable")  # fmt: skip
    if len(unstable):
        print(unstable.to_string(index=False))

    scorer = RiskScorer(phase_model=model, features=columns, random_state=args.seed)
    scores = scorer.fit(table).score_reference(until_step=args.until_step)
    scores.to_csv(args.out / "scores.csv", index=False)
    print(f"\nrisk from checkpoints up to step {args.until_step}:")
    print(scores[["run", "risk", "flagged", "p_value", "explanation"]].to_string(index=False))


if __name__ == "__main__":
    main()
