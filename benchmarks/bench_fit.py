"""Model selection cost: 50 runs x 154 checkpoints x 40 features, K = 1..8, 5 restarts.

The table is sampled from a known 5-state left-to-right Gaussian HMM (PolyPythias-sized:
50 runs, Pythia's 154 checkpoints). ``PhaseModel(n_states="auto")`` fits every
(K, restart) on all runs plus once per run-level fold (5 folds): 8 x 5 x 6 = 240 EM fits.
Timed side by side in one process: joblib with ``--jobs`` workers against one worker.

Usage::

    python benchmarks/bench_fit.py [--jobs 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score


def synthetic(n_runs=50, n_steps=154, d=40, k=5, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * 2.0
    rows, truth = [], []
    for r in range(n_runs):
        state = 0
        for t in range(n_steps):
            if t and state < k - 1 and rng.random() > 0.96:
                state += 1
            x = means[state] + rng.normal(size=d)
            rows.append([f"run{r:02d}", t, *x])
            truth.append(state)
    cols = ["run", "step"] + [f"syn.f{j:02d}" for j in range(d)]
    return pd.DataFrame(rows, columns=cols), np.array(truth)


def main() -> None:
    from polymap.phases import PhaseModel

    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table, truth = synthetic()
    times: dict[str, list[float]] = {"serial (1 worker)": [], f"joblib ({args.jobs} workers)": []}
    for _ in range(args.repeats):
        for label, jobs in (("serial (1 worker)", 1), (f"joblib ({args.jobs} workers)", args.jobs)):
            start = time.perf_counter()
            model = PhaseModel(restarts=5, random_state=0, n_jobs=jobs).fit(table)
            times[label].append(time.perf_counter() - start)
    ari = adjusted_rand_score(truth, model.predict(table)["state"])
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; table 50 runs x 154 checkpoints x 40 features; "
        f"K=1..8, 5 restarts, 5 run-level folds; repeats {args.repeats}\n"
    )
    print("| selection | median s | ratio |")
    print("|---|---|---|")
    base = statistics.median(times["serial (1 worker)"])
    for label, values in times.items():
        med = statistics.median(values)
        print(f"| {label} | {med:.1f} | {base / med:.2f}x |")
    print(
        f"\nchosen K = {model.n_states_} (true 5), adjusted Rand index {ari:.3f}; "
        f"degenerate fits {model.n_degenerate_}, not converged {model.n_not_converged_}"
    )


if __name__ == "__main__":
    main()
