"""The scorer's false-alarm rate on healthy-only runs nobody tuned on.

For each null family (:mod:`polymap.nulls`, and the published Pythia eval trajectories
when ``../shared/data`` is present), ``--studies`` independent studies: each draws
``2 x --runs`` healthy runs from one process, fits ``RiskScorer`` on the first half and

- **backtest**: scores every reference run leave-one-run-out
  (``score_reference``), as ``polymap score`` does without ``--targets``;
- **new runs**: scores the second half as new runs against the saved scorer
  (``score``), as ``score --targets`` and the online monitor do.

A run is flagged *at a look* (a fraction of the 60k-step training) when its
``first_flag_step`` is at or before that step, and *at any look* when it is flagged at
its last checkpoint (its statistic never falls, so the two are the same event; the
tests check that ``score --until-step`` agrees with ``first_flag_step`` at every
checkpoint). Reported per family and mode: the flagged fraction at each look and at any
look, with its binomial SE, and the nominal ``alpha``.

Pythia: 16 published runs; each study scores a random 10 of them leave-one-run-out
(backtest) or fits on 8 and scores the other 8 (new runs), so the studies overlap: its
rows are a check on real data, not 200 independent runs.

    python benchmarks/bench_calibration.py --studies 25 --jobs 2
    python benchmarks/bench_calibration.py --families random_walk --studies 25  # held out
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from polymap.nulls import FAMILIES, draw

LOOKS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
PYTHIA = Path(__file__).resolve().parents[1] / "../shared/data/pythia-evals/pythia-v1"
CORE = ("arc_easy", "arc_challenge", "lambada_openai", "logiqa", "piqa", "sciq", "winogrande",
        "wsc")  # fmt: skip


def _pythia_table() -> pd.DataFrame:
    from polymap.evals import ingest

    table, _ = ingest(PYTHIA, stderr=True)
    keep = [f"eval.{t}.acc" for t in CORE]
    keep += [f"{c}_stderr" for c in keep]
    return table[["run", "step", *keep]]


def _study(
    family: str, study: int, runs: int, alpha: float, states: int, rescore: bool = False
) -> list[dict]:
    from polymap.phases import PhaseModel
    from polymap.scoring import RiskScorer

    logging.disable(logging.WARNING)
    rng = np.random.default_rng(10_000 + study)
    if family == "pythia":
        table = _pythia_table()
        names = rng.permutation(sorted(table["run"].unique()))
        half = min(runs, len(names) // 2)
        backtest_runs, reference_runs, new_runs = names[:runs], names[:half], names[half:]
        features = [f"eval.{t}.acc" for t in CORE]
        backtest_table = table[table["run"].isin(backtest_runs)]
    else:
        table = draw(family, n_runs=2 * runs, seed=study)
        names = sorted(table["run"].unique(), key=lambda r: int(r[3:]))
        reference_runs, new_runs = names[:runs], names[runs:]
        backtest_table = table[table["run"].isin(reference_runs)]
        features = None
    length = float(table.groupby("run")["step"].max().median())
    out = []

    def scorer():
        model = PhaseModel(n_states=states, restarts=1, random_state=study, features=features)
        return RiskScorer(phase_model=model, alpha=alpha, features=features, random_state=study)

    new_table = table[table["run"].isin(new_runs)]
    fitted = scorer().fit(backtest_table)
    backtest = fitted
    if family == "pythia":  # the reference must not hold the new runs
        fitted = scorer().fit(table[table["run"].isin(reference_runs)])
    widen = getattr(fitted, "calibration_", None)
    widen = widen.widen_ if widen is not None else 1.0
    for mode, score in (
        ("backtest", lambda **cut: backtest.score_reference(**cut)),
        ("new runs", lambda **cut: fitted.score(new_table, **cut)),
    ):
        if rescore:  # every look scored on its own (a rule without the any-look property)
            looks = {f"{look:g}": score(until_step=int(look * length)) for look in LOOKS}
            flagged = {k: v.set_index("run")["flagged"] for k, v in looks.items()}
        else:
            whole = score().set_index("run")
            first = whole["first_flag_step"]
            flagged = {
                f"{look:g}": whole["flagged"] & first.notna() & (first <= look * length)
                for look in LOOKS
            }
        for run in sorted(flagged["1"].index):
            record = {"family": family, "mode": mode, "study": study, "run": run}
            record.update({k: bool(v.get(run, False)) for k, v in flagged.items()})
            record["any look"] = any(record[f"{look:g}"] for look in LOOKS)
            record["widen"] = widen
            out.append(record)
    return out


def _rate(flags: pd.Series) -> str:
    n = len(flags)
    rate = float(flags.mean())
    se = math.sqrt(max(rate, 1e-9) * (1 - rate) / n) if n else math.nan
    return f"{rate:.3f} ± {se:.3f}"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join([*FAMILIES, "pythia"]))
    parser.add_argument("--studies", type=int, default=25)
    parser.add_argument("--runs", type=int, default=10, help="reference runs per study")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--states", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="per-run flags (CSV)")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score each look on its own (slower; for rules whose first_flag_step is not "
        "the any-look decision, such as polymap's before the calibrated rule)",
    )
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    if "pythia" in families and not PYTHIA.is_dir():
        print(f"skipping pythia: {PYTHIA} not present", file=sys.stderr)
        families.remove("pythia")
    spec = (args.runs, args.alpha, args.states, args.rescore)
    jobs = [(f, s, *spec) for f in families for s in range(args.studies)]
    start = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        records = [r for rows in pool.map(_study, *zip(*jobs, strict=True)) for r in rows]
    flags = pd.DataFrame(records)
    if args.out:
        flags.to_csv(args.out, index=False)
    columns = [f"{look:g}" for look in LOOKS] + ["any look"]
    table = flags.groupby(["family", "mode"], sort=False).agg(
        runs=("run", "size"),
        **{c: (c, _rate) for c in columns},
        widened=("widen", lambda w: f"{(w > 1).mean():.2f}"),
    )
    print(
        f"alpha {args.alpha}, {args.runs} reference runs per study, {args.studies} studies per "
        f"family ({time.time() - start:.0f} s); flagged fraction ± binomial SE at each look "
        "(fraction of training) and at any look; 'widened': studies whose self-check widened "
        "the tail"
    )
    print(table.to_markdown())
    return flags


if __name__ == "__main__":
    main()
