"""Scoring cost: fit + leave-one-run-out scoring at 3 horizons, 50 runs x 154 checkpoints
x 40 features (the ``bench_fit.py`` table, a known 5-state HMM).

Side by side in one process, K = 5 given (selection is ``bench_fit.py``'s subject):

- **v1** (``score_runs``, the previous scorer): per horizon, 50 leave-one-run-out
  ``PhaseModel`` fits with 2 restarts and default settings, signals, z-scores; serial.
- **RiskScorer** (``n_jobs`` workers): the map fitted once (5 restarts), 50 whole-run
  leave-one-out clones (what ``polymap fit`` saves), then per horizon 50 clones fitted on
  the reference cut at the horizon (the strict backtest) and the calibrated decision.
- **first online score**: ``RiskScorer.load`` + ``score()`` of one new run - what the
  Trainer callback pays at its first save (no refit), against the first call of the v1
  path (which fitted its leave-one-out models then).

Usage::

    python benchmarks/bench_score.py [--jobs 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings

from bench_fit import synthetic

HORIZONS = (0.1, 0.25, 0.5)


def run_v1(table) -> float:
    from polymap.scoring import score_runs

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for h in HORIZONS:
            score_runs(table, 5, horizon=h)
    return time.perf_counter() - start


def run_v2(table, jobs: int) -> tuple[float, object]:
    from polymap.phases import PhaseModel
    from polymap.scoring import RiskScorer

    start = time.perf_counter()
    model = PhaseModel(n_states=5, restarts=5, random_state=0, n_jobs=jobs).fit(table)
    scorer = RiskScorer(phase_model=model, n_jobs=jobs).fit(table)
    for h in HORIZONS:
        scorer.score_reference(horizon=h)
    return time.perf_counter() - start, scorer


def first_online(scorer, table) -> tuple[float, float]:
    from polymap.scoring import RiskScorer, score_runs

    new = table[table["run"] == "run07"].assign(run="live")
    reference = table[table["run"] != "run07"]
    with tempfile.TemporaryDirectory() as tmp:
        scorer.save(tmp)
        start = time.perf_counter()
        RiskScorer.load(tmp).score(new, until_step=40)
        loaded = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score_runs(reference, 5, targets=new, until_step=40)
    return loaded, time.perf_counter() - start


def online_on_demo(demo: str, repeats: int) -> None:
    """On ``polymap demo``'s outputs: one checkpoint's extraction (the demo's feature
    sets) against the first online score with the saved scorer (load included)."""
    from pathlib import Path

    from polymap.checkpoints import CheckpointRef
    from polymap.extraction import extract_checkpoint
    from polymap.pipeline import DEMO_FEATURES
    from polymap.scoring import RiskScorer

    root = Path(demo)
    run = sorted((root / "suite").glob("nano-seed*"))[0]
    steps = sorted(int(p.name[4:]) for p in run.glob("step*"))
    extract_times, score_times = [], []
    for _ in range(repeats):
        rows = []
        for step in steps[:12]:
            start = time.perf_counter()
            row = extract_checkpoint(
                CheckpointRef("live", step, str(run / f"step{step}")), DEMO_FEATURES, "cpu"
            )
            extract_times.append(time.perf_counter() - start)
            rows.append(row)
        import pandas as pd

        start = time.perf_counter()
        RiskScorer.load(root / "model").score(pd.DataFrame(rows), until_step=steps[11])
        score_times.append(time.perf_counter() - start)
    e, s = statistics.median(extract_times), statistics.median(score_times)
    print(f"\n{demo}: one checkpoint's extraction ({DEMO_FEATURES}) {e:.2f} s; first online")
    print(f"score with the saved scorer (load + score 12 checkpoints) {s:.2f} s = {s / e:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", default=None, help="a polymap demo output folder")
    args = parser.parse_args()
    if args.demo:
        online_on_demo(args.demo, args.repeats)
        return
    table, _ = synthetic()
    v1, v2, online_v2, online_v1 = [], [], [], []
    for i in range(args.repeats):
        v1.append(run_v1(table))
        seconds, scorer = run_v2(table, args.jobs)
        v2.append(seconds)
        loaded, refit = first_online(scorer, table)
        online_v2.append(loaded)
        online_v1.append(refit)
        print(f"repeat {i + 1}: v1 {v1[-1]:.1f} s, RiskScorer {v2[-1]:.1f} s, first online "
              f"{online_v1[-1]:.2f} / {online_v2[-1]:.2f} s", flush=True)  # fmt: skip
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; 50 runs x 154 checkpoints x 40 features, K=5, "
        f"horizons {HORIZONS}; repeats {args.repeats}, medians\n"
    )
    print("| what | median s | ratio |")
    print("|---|---|---|")
    a, b = statistics.median(v1), statistics.median(v2)
    print(f"| v1 score_runs at 3 horizons (serial) | {a:.1f} | 1.0x |")
    print(f"| RiskScorer fit + 3 strict backtests ({args.jobs} workers) | {b:.1f} | {a / b:.2f}x |")
    c, d = statistics.median(online_v1), statistics.median(online_v2)
    print(f"| first online score, v1 (fits leave-one-out models) | {c:.2f} | 1.0x |")
    print(f"| first online score, RiskScorer.load + score | {d:.2f} | {c / d:.1f}x |")


if __name__ == "__main__":
    main()
