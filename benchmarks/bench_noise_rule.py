"""Error rates of the measurement-noise rule of model selection (polymap.phases.noise).

Synthetic eval tables with real binomial noise (``polymap.evals.synthetic``: 10 runs, 4
tasks of 400 items, 18 Pythia-like checkpoints; chance until step 512, 0.6 from step
1000), two experiments, ``--seeds`` tables each, K in 1..5 by held-out likelihood alone
and with the rule (c = 3.54 SE for 4 features), side by side:

- **noise split**: steps 64-512 shifted by s SEs in every task (s below c: the same
  phase within the measurement noise). Truth: 2 states. Error: K > 2.
- **real state**: from step 20000 every task shifted by s SEs. Truth: 3 states when the
  shift is real; the rule is meant to drop shifts below c and keep larger ones.

    python benchmarks/bench_noise_rule.py --seeds 20     # ~10 min on 2 cores

Writes benchmarks/out/noise_rule.csv and prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def run(seeds: int) -> pd.DataFrame:
    from polymap.evals.synthetic import eval_trajectories, phased_accuracy
    from polymap.phases import PhaseModel

    rows = []
    cases = [("noise split", s, None) for s in (0.0, 1.0, 2.0, 3.0)]
    cases += [("real state", None, s) for s in (2.0, 4.0, 6.0, 8.0)]
    for kind, noise, late in cases:
        for seed in range(seeds):

            def accuracy(run, step, noise=noise, late=late):
                return phased_accuracy(step, noise_shift=noise or 0.0, late_shift=late)

            table = eval_trajectories(accuracy=accuracy, seed=seed)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = PhaseModel(states_range=(1, 2, 3, 4, 5), restarts=2, random_state=seed)
                model.fit(table)
            rows.append(
                {
                    "experiment": kind,
                    "shift_se": noise if noise is not None else late,
                    "seed": seed,
                    "k_likelihood": model.n_states_likelihood_,
                    "k_rule": model.n_states_,
                    "seconds": time.perf_counter() - start,
                }
            )
        print(f"{kind} {noise if noise is not None else late}: done", flush=True)
    return pd.DataFrame(rows)


def summary(results: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (kind, shift), grp in results.groupby(["experiment", "shift_se"]):
        truth = 2 if kind == "noise split" else 3
        out.append(
            {
                "experiment": kind,
                "shift (SE, every task)": shift,
                "tables": len(grp),
                "K = truth, likelihood": f"{(grp['k_likelihood'] == truth).mean():.2f}",
                "K = truth, with the rule": f"{(grp['k_rule'] == truth).mean():.2f}",
                "K > 2, likelihood": f"{(grp['k_likelihood'] > 2).mean():.2f}",
                "K > 2, with the rule": f"{(grp['k_rule'] > 2).mean():.2f}",
            }
        )
    return pd.DataFrame(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args(argv)
    results = run(args.seeds)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    results.to_csv(out / "noise_rule.csv", index=False)
    print(summary(results).to_markdown(index=False))
    print(f"\nmedian fit {np.median(results['seconds']):.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
