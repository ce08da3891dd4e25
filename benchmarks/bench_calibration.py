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

from polymap.nulls import FAMILIES, GROUP_KINDS, draw, draw_groups

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
    family: str,
    study: int,
    runs: int,
    alphas: tuple[float, ...],
    states: int,
    rescore: bool = False,
    pool: int = 0,
    kind: str = "affine",
) -> list[dict]:
    from polymap.phases import PhaseModel
    from polymap.scoring import RiskScorer
    from polymap.scoring.pooling import PoolingError

    logging.disable(logging.WARNING)
    rng = np.random.default_rng(10_000 + study)
    if pool:  # groups pooled by the scorer (draw_groups), half of each group new runs
        table = draw_groups(family, groups=pool, n_runs=2 * runs, seed=study, kind=kind)
        reference_runs, new_runs = [], []
        for _, part in table.groupby("model"):
            names = sorted(part["run"].unique(), key=lambda r: int(r.split("-run")[1]))
            reference_runs += names[:runs]
            new_runs += names[runs:]
        backtest_table = table[table["run"].isin(reference_runs)]
        features = None
    elif family == "pythia":
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

    def scorer(pooled: bool = bool(pool)):
        model = PhaseModel(n_states=states, restarts=1, random_state=study, features=features)
        return RiskScorer(
            phase_model=model,
            alpha=alphas[0],
            features=features,
            random_state=study,
            pool_by="model" if pooled else None,
        )

    new_table = table[table["run"].isin(new_runs)]
    try:
        fitted = scorer().fit(backtest_table)
    except PoolingError:  # refused at the first alpha: counted, nothing flagged
        return [
            {"family": family, "mode": mode, "alpha": alphas[0], "study": study, "run": run,
             "any look": False, "refused": True}
            for mode in ("backtest", "new runs")
            for run in (reference_runs if mode == "backtest" else new_runs)
        ]  # fmt: skip
    backtest = fitted
    if family == "pythia":  # the reference must not hold the new runs
        fitted = scorer().fit(table[table["run"].isin(reference_runs)])
    for alpha in alphas:  # one fit; the calibration is redone per alpha (at_alpha)
        fitted.set_params(alpha=alpha)
        backtest.set_params(alpha=alpha)
        out += _flags(family, study, alpha, fitted, backtest, new_table, length, rescore)
    if pool:
        alone = scorer(pooled=False).fit(_first_group(backtest_table))
        target = _planted(_first_group(new_table), _first_group(backtest_table), length)
        for name, fitted_scorer in (("pooled", fitted), ("own group", alone)):
            for alpha in alphas:
                scores = fitted_scorer.set_params(alpha=alpha).score(target).set_index("run")
                record = {"family": family, "mode": f"planted: vs {name}", "alpha": alpha,
                          "study": study, "run": "planted", "refused": False}  # fmt: skip
                record.update(_looks(scores, length)["planted"])
                record["p_value"] = float(scores.loc["planted", "p_value"])
                out.append(record)
    return out


# a planted run's lasting shift, in its group's between-run SDs of that feature
PLANTED_SHIFT = 12.0


def _first_group(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["model"] == sorted(table["model"].unique())[0]]


def _planted(new_runs: pd.DataFrame, reference: pd.DataFrame, length: float) -> pd.DataFrame:
    """Power under pooling: a new run of the first group with one feature shifted by
    :data:`PLANTED_SHIFT` of its group's between-run SDs from 25% of training on."""
    run = sorted(new_runs["run"].unique())[0]
    target = new_runs[new_runs["run"] == run].copy()
    feature = "null.f0"
    spread = float(reference.groupby("step")[feature].std().median())
    target.loc[target["step"] >= 0.25 * length, feature] += PLANTED_SHIFT * spread
    return target.assign(run="planted")


def _looks(scores: pd.DataFrame, length: float) -> dict[str, dict[str, bool]]:
    """Per run: flagged at each look (its first flag at or before it) and at any look."""
    out = {}
    for run, row in scores.iterrows():
        first = row["first_flag_step"]
        flags = {
            f"{look:g}": bool(row["flagged"] and pd.notna(first) and first <= look * length)
            for look in LOOKS
        }
        flags["any look"] = any(flags.values())
        out[run] = flags
    return out


def _flags(family, study, alpha, fitted, backtest, new_table, length, rescore) -> list[dict]:
    """Per run: flagged at each look and at any look, at the scorers' current alpha."""
    out = []
    calibration = getattr(fitted, "calibration_", None)
    widen = calibration.at_alpha(alpha).widen_ if calibration is not None else 1.0
    for mode, score in (
        ("backtest", lambda **cut: backtest.score_reference(**cut)),
        ("new runs", lambda **cut: fitted.score(new_table, **cut)),
    ):
        if rescore:  # every look scored on its own (a rule without the any-look property)
            looks = {f"{look:g}": score(until_step=int(look * length)) for look in LOOKS}
            flagged = {k: v.set_index("run")["flagged"] for k, v in looks.items()}
        else:
            per_run = _looks(score().set_index("run"), length)
            flagged = {
                f"{look:g}": pd.Series({r: f[f"{look:g}"] for r, f in per_run.items()}, dtype=bool)
                for look in LOOKS
            }
        for run in sorted(flagged["1"].index):
            record = {"family": family, "mode": mode, "alpha": alpha, "study": study, "run": run}
            record.update({k: bool(v.get(run, False)) for k, v in flagged.items()})
            record["any look"] = any(record[f"{look:g}"] for look in LOOKS)
            record["widen"] = widen
            record["refused"] = False
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
    parser.add_argument(
        "--alpha", default="0.05", help="comma list: each study is fitted once, scored at each"
    )
    parser.add_argument("--states", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="per-run flags (CSV)")
    parser.add_argument(
        "--pool",
        type=int,
        default=0,
        metavar="G",
        help="G groups of --runs reference runs each, pooled (RiskScorer(pool_by=...)); "
        "the pooling check runs at the first --alpha",
    )
    parser.add_argument(
        "--group-kind",
        default="affine",
        choices=GROUP_KINDS,
        help="with --pool: how the groups differ (polymap.nulls.draw_groups)",
    )
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
    alphas = tuple(float(a) for a in args.alpha.split(","))
    spec = (args.runs, alphas, args.states, args.rescore, args.pool, args.group_kind)
    jobs = [(f, s, *spec) for f in families for s in range(args.studies)]
    start = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        records = [r for rows in pool.map(_study, *zip(*jobs, strict=True)) for r in rows]
    flags = pd.DataFrame(records)
    if args.out:
        flags.to_csv(args.out, index=False)
    columns = [f"{look:g}" for look in LOOKS] + ["any look"]
    table = flags.groupby(["alpha", "family", "mode"], sort=False).agg(
        runs=("run", "size"),
        **{c: (c, _rate) for c in columns},
        widened=("widen", lambda w: f"{(w > 1).mean():.2f}"),
        refused=("refused", lambda r: f"{r.mean():.2f}"),
    )
    if "p_value" in flags.columns:  # the planted runs' p-values, pooled or alone
        planted = flags[flags["mode"].str.startswith("planted")]
        table["median p (planted)"] = planted.groupby(["alpha", "family", "mode"])[
            "p_value"
        ].median()
    print(
        f"alpha {args.alpha}; {args.runs} reference runs per study, {args.studies} studies per "
        f"family ({time.time() - start:.0f} s); flagged fraction ± binomial SE at each look "
        "(fraction of training) and at any look; 'widened': studies whose self-check widened "
        "the tail"
    )
    print(table.to_markdown())
    return flags


if __name__ == "__main__":
    main()
