"""Training phases of the 16 Pythia runs from their published lm-eval scores alone.

Reads the published per-checkpoint evaluations (0.3-era lm-eval JSON, the repository
layout ``pythia-v1/<run>/<zero-shot|five-shot>/<short>_step<N>.json``), fits a Gaussian
HMM over the zero-shot accuracy trajectories of the eight main tasks (K selected on
held-out runs), prints the training map, and scores every run's outlier risk from its
first checkpoints up to step 3000 (the early window in which PolyPythias saw outlier
seeds leave the common path).

    python examples/pythia_eval_phases.py ../shared/data/pythia-evals/pythia-v1 --out pythia-map

Writes OUT/evals.parquet, OUT/model/ (a MODEL_DIR for ``polymap describe/export``) and
OUT/scores.csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polymap.evals import ingest
from polymap.phases import describe, fit_model_dir
from polymap.scoring import RiskScorer
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

    columns = [f"eval.{task}.acc" for task in TASKS]
    model = fit_model_dir(table, args.out / "model", features=columns, random_state=args.seed)[""]
    print(describe(args.out / "model"))

    scorer = RiskScorer(phase_model=model, features=columns, random_state=args.seed)
    scores = scorer.fit(table).score_reference(until_step=args.until_step)
    scores.to_csv(args.out / "scores.csv", index=False)
    print(f"\nrisk from checkpoints up to step {args.until_step}:")
    print(scores[["run", "risk", "flagged", "p_value", "explanation"]].to_string(index=False))


if __name__ == "__main__":
    main()
