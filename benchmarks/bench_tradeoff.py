"""Recall against false alarms: the scorer's trade-off curve across ``alpha``.

Power side (the instability zoo of ``bench_scorer.py``, reused from its cache): each
case is fitted once and backtested at ``--horizon`` (25% of training) at every alpha of
``--alpha``; recall is the fraction of runs measured unstable (the suite's one
instability rule) that are flagged by then, and the zoo's healthy runs flagged are
counted beside it.

False-alarm side: the per-run CSV written by ``bench_calibration.py --alpha A,B,... --out
F`` (healthy-only null families; a run counts as a false alarm when it is flagged at any
look), passed as ``--nulls F``. Both are printed as one markdown table, one row per alpha.

    python benchmarks/bench_calibration.py --studies 25 --alpha 0.01,0.05,0.1,0.2 \\
        --out benchmarks/out/tradeoff/nulls.csv
    python benchmarks/bench_tradeoff.py --healthy 12 --nulls benchmarks/out/tradeoff/nulls.csv \\
        --nulls benchmarks/out/tradeoff/nulls-heldout.csv \\
        --cases lr_schedule-3,adam_eps-3.25,weight_decay-2,data_repeat-0.4,precision-6
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scorer import HERE, build_zoo, case_name, cases, config, load_case  # noqa: E402


def zoo_curve(root: Path, cfg: dict, chosen: set[str], alphas, horizon: float, jobs: int):
    """One row per case and alpha: unstable runs flagged by ``horizon``, healthy flagged."""
    from polymap.scoring import RiskScorer

    rows = []
    for defect, strength in cases(cfg):
        name = case_name(defect, strength)
        if name not in chosen:
            continue
        table, _logs, labels = load_case(root, cfg, defect, strength)
        lab = labels.set_index("run")
        t = time.perf_counter()
        scorer = RiskScorer(alpha=alphas[0], n_jobs=jobs, random_state=0).fit(table)
        for alpha in alphas:
            scores = scorer.set_params(alpha=alpha).score_reference(horizon=horizon)
            scores = scores.set_index("run")
            unstable = lab.loc[scores.index, "unstable"].to_numpy(bool)
            healthy = ~unstable & ~lab.loc[scores.index, "planted"].to_numpy(bool)
            flagged = scores["flagged"].to_numpy(bool)
            rows.append(
                {
                    "case": name,
                    "alpha": alpha,
                    "unstable": int(unstable.sum()),
                    "unstable flagged": int((flagged & unstable).sum()),
                    "healthy": int(healthy.sum()),
                    "healthy flagged": int((flagged & healthy).sum()),
                }
            )
        print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def _fraction(k: int, n: int) -> str:
    rate = k / n if n else math.nan
    se = math.sqrt(max(rate, 1e-9) * (1 - rate) / n) if n else math.nan
    return f"{k}/{n} = {rate:.3f} ± {se:.3f}"


def _null_columns(nulls: pd.DataFrame, alpha: float, label: str) -> dict:
    """The nulls' any-look false-alarm rate at ``alpha``: pooled, and the worst family x mode."""
    null = nulls[np.isclose(nulls["alpha"], alpha)]
    if not len(null):
        return {}
    rates = null.groupby(["family", "mode"])["any look"].mean()
    worst = rates.idxmax()
    n_worst = int((null["family"].eq(worst[0]) & null["mode"].eq(worst[1])).sum())
    return {
        f"{label}: any-look FA, both modes": _fraction(int(null["any look"].sum()), len(null)),
        f"{label}: worst family x mode": f"{rates.max():.3f} ({worst[0]}, {worst[1]}, n={n_worst})",
    }


def curve_table(zoo: pd.DataFrame, nulls: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per alpha: each null set's any-look false-alarm rate (pooled and the
    worst family x mode) beside the zoo's recall and healthy runs flagged."""
    rows = []
    for alpha, part in zoo.groupby("alpha"):
        row = {"alpha": alpha}
        for label, table in nulls.items():
            row.update(_null_columns(table, alpha, label))
        row["zoo: unstable flagged by 25%"] = _fraction(
            int(part["unstable flagged"].sum()), int(part["unstable"].sum())
        )
        row["zoo: healthy flagged by 25%"] = _fraction(
            int(part["healthy flagged"].sum()), int(part["healthy"].sum())
        )
        rows.append(row)
    return pd.DataFrame(rows).fillna("-")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--healthy", type=int, default=60, help="as bench_scorer.py")
    parser.add_argument("--planted", type=int, default=3, help="as bench_scorer.py")
    parser.add_argument("--cases", default="", help="comma list of DEFECT-STRENGTH")
    parser.add_argument("--alpha", default="0.01,0.05,0.1,0.2")
    parser.add_argument("--horizon", type=float, default=0.25)
    parser.add_argument(
        "--nulls", type=Path, action="append", default=[],
        help="bench_calibration.py --out CSV (repeat: the development families, then the "
        "held-out ones); labelled by file name",
    )  # fmt: skip
    parser.add_argument("--zoo", type=Path, default=None, help="reuse a zoo.csv of a run before")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "tradeoff")
    args = parser.parse_args(argv)
    alphas = tuple(float(a) for a in args.alpha.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.zoo is not None:
        zoo = pd.read_csv(args.zoo)
    else:
        cfg = config(args)
        root = build_zoo(cfg, args.jobs)
        zoo = zoo_curve(root, cfg, set(args.cases.split(",")), alphas, args.horizon, args.jobs)
        zoo.to_csv(args.out / "zoo.csv", index=False)
    nulls = {path.stem: pd.read_csv(path) for path in args.nulls}
    table = curve_table(zoo, nulls)
    (args.out / "curve.md").write_text(table.to_markdown(index=False) + "\n")
    print(table.to_markdown(index=False))
    return table


if __name__ == "__main__":
    main()
