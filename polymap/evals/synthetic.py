"""Synthetic eval-score tables with real binomial measurement noise (tests, benchmarks).

Each task's accuracy at a checkpoint is ``Binomial(n_items, p) / n_items`` with the
``acc_stderr`` lm-eval would report (``sqrt(acc (1 - acc) / (n - 1))``), so the noise the
rules must respect is the one real evals have.

>>> t = eval_trajectories(runs=2, tasks=1, seed=0)
>>> sorted(t.columns)
['eval.t0.acc', 'eval.t0.acc_stderr', 'run', 'step']
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

STEPS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 3000, 5000, 10000, 20000, 40000, 80000)
CHANCE = 0.25
LEARNED = 0.6


def binomial_se(p: float, n_items: int) -> float:
    """One accuracy measurement's standard error at true accuracy ``p``."""
    return float(np.sqrt(p * (1 - p) / n_items))


def phased_accuracy(
    step: int, noise_shift: float = 0.0, late_shift: float | None = None, n_items: int = 400
) -> float:
    """True accuracy of a Pythia-like run: chance until step 512 (shifted by
    ``noise_shift`` measurement SEs at steps 64-512: a difference within the noise when
    small), 0.6 from step 1000, plus ``late_shift`` SEs from step 20000 (a third state)."""
    if step < 1000:
        shift = noise_shift if 64 <= step <= 512 else 0.0
        return CHANCE + shift * binomial_se(CHANCE, n_items)
    if late_shift is not None and step >= 20000:
        return LEARNED + late_shift * binomial_se(LEARNED, n_items)
    return LEARNED


def eval_trajectories(
    runs: int = 10,
    tasks: int = 4,
    n_items: int = 400,
    steps: tuple[int, ...] = STEPS,
    accuracy: Callable[[str, int], float] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """``run, step, eval.t<j>.acc, eval.t<j>.acc_stderr``: every task of run ``r<i>`` at
    true accuracy ``accuracy(run, step)`` (default :func:`phased_accuracy`), measured on
    ``n_items`` items."""
    rng = np.random.default_rng(seed)
    accuracy = accuracy or (lambda run, step: phased_accuracy(step, n_items=n_items))
    rows = []
    for r in range(runs):
        run = f"r{r}"
        for step in steps:
            p = float(np.clip(accuracy(run, step), 0.0, 1.0))
            acc = rng.binomial(n_items, p, size=tasks) / n_items
            row = {"run": run, "step": int(step)}
            for j in range(tasks):
                row[f"eval.t{j}.acc"] = acc[j]
                row[f"eval.t{j}.acc_stderr"] = float(np.sqrt(acc[j] * (1 - acc[j]) / (n_items - 1)))
            rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["binomial_se", "eval_trajectories", "phased_accuracy"]
