"""Experiment (not adopted): a separate one-sided "performance" signal for RiskScorer.

The probe's loss and token accuracy (``evals_native``), z-scored against the other runs
like the deviation, counted only in the worse direction, made persistent (3
checkpoints), max over the two, aggregated by ``lasting_mean``; its p-value is the t tail
on the log against the other runs' values (as the deviation's), and ``flagged`` is
Tarone-Bonferroni over deviation, performance and path. Run on the zoo of
``bench_scorer.py`` (build it first); prints precision/recall at 25% and the healthy runs
flagged per horizon, old rule against new. Writes ``benchmarks/out/performance_signal.csv``.

    python benchmarks/bench_performance_signal.py     # ~6 min on 2 cores
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scorer as b  # noqa: E402

from polymap.scoring import RiskScorer, horizon_step  # noqa: E402
from polymap.scoring.labels import _guess_higher_is_better  # noqa: E402
from polymap.scoring.scorer import _tail, _tarone, feature_z, lasting_mean, persistent  # noqa: E402

warnings.simplefilter("ignore")
HERE = Path(__file__).resolve().parent
PERF = ["evals_native.loss", "evals_native.token_acc"]


def perf_signal(table, run, cut):
    t = table[(table.run == run) & (table.step <= cut)]
    o = table[table.run != run]
    if t.empty:
        return math.nan
    steps, z = feature_z(t, o, PERF)  # |z|
    # signed: recompute sign from raw values vs peer median
    tt = t.sort_values("step").set_index("step")
    signed = np.zeros_like(z)
    for j, f in enumerate(PERF):
        med = o.groupby("step")[f].median().reindex(steps).interpolate().to_numpy()
        worse = (tt.loc[steps, f].to_numpy() - med) * (-1 if _guess_higher_is_better(f) else 1)
        signed[:, j] = np.where(worse > 0, z[:, j], 0.0)
    ev = persistent(np.minimum(signed, 8.0), 3).max(axis=1)
    return lasting_mean(ev)


def decide(scores, table, cut, alpha=0.05):
    runs = list(scores.index)
    perf = {r: perf_signal(table, r, cut) for r in runs}
    out = {}
    for r in runs:
        pool = np.array([perf[q] for q in runs if q != r and np.isfinite(perf[q])])
        v = perf[r]
        if not np.isfinite(v) or len(pool) < 2:
            p_perf = 1.0
        else:
            _, p_perf = _tail(math.log(max(v, 1e-6)), np.log(np.maximum(pool, 1e-6)), 0.5)
        tests = {
            "deviation": (scores.loc[r, "p_deviation"], 0.0),
            "performance": (p_perf, 0.0),
            "path": (scores.loc[r, "p_path"], 1 / (len(runs))),
        }
        p, m = _tarone(tests, alpha)
        out[r] = (p, p <= alpha, p_perf)
    return out


def main() -> int:
    root = sorted((HERE / "out").glob("zoo-*"))[-1]
    cfg = json.loads((root / "config.json").read_text())
    rows = []
    for defect, strength in b.cases(cfg):
        table, logs, labels = b.load_case(root, cfg, defect, strength)
        sc = RiskScorer(random_state=0, n_jobs=2).fit(table)
        lab = labels.set_index("run")
        for h in b.HORIZONS:
            cut = horizon_step(table, h, None)
            scores = sc.score_reference(horizon=h).set_index("run")
            d = decide(scores, table, cut)
            y = lab.loc[scores.index, "unstable"].astype(bool)
            healthy = ~lab.loc[scores.index, "planted"].astype(bool) & ~y
            f_old = scores["flagged"].astype(bool)
            f_new = pd.Series({r: d[r][1] for r in scores.index})
            for name, f in (("old", f_old), ("new", f_new)):
                tp = int((f & y).sum())
                rows.append(
                    dict(
                        case=f"{defect}-{strength:g}",
                        h=h,
                        method=name,
                        flagged=int(f.sum()),
                        recall=tp / max(1, y.sum()),
                        precision=tp / f.sum() if f.sum() else math.nan,
                        healthy_flagged=int((f & healthy).sum()),
                        healthy=int(healthy.sum()),
                    )
                )
        print(defect, strength, "done", flush=True)
    for name, table, _ in b.healthy_suites(root, cfg):
        sc = RiskScorer(random_state=0, n_jobs=2).fit(table)
        for h in b.HORIZONS:
            cut = horizon_step(table, h, None)
            scores = sc.score_reference(horizon=h).set_index("run")
            d = decide(scores, table, cut)
            rows.append(
                dict(
                    case=name,
                    h=h,
                    method="old",
                    flagged=int(scores.flagged.sum()),
                    healthy=len(scores),
                    healthy_flagged=int(scores.flagged.sum()),
                )
            )
            n = sum(v[1] for v in d.values())
            rows.append(
                dict(
                    case=name, h=h, method="new", flagged=n, healthy=len(scores), healthy_flagged=n
                )
            )
    r = pd.DataFrame(rows)
    r.to_csv(HERE / "out" / "performance_signal.csv", index=False)
    print(
        r[r.h == 0.25]
        .pivot_table(index="case", columns="method", values=["recall", "precision"])
        .round(2)
        .to_string()
    )
    print(r.groupby(["method", "h"])[["healthy_flagged", "healthy"]].sum())

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
