"""``polymap demo``: the whole pipeline on the built-in suite, in one call.

1. train the suite (10 nano seeds, seeds 3 and 4 with the planted schedule defect);
2. extract weight features and native evals (``evals_native``) of every checkpoint;
3. run real lm-eval (a LAMBADA-style task built from the suite corpus's held-out split)
   on a subset of checkpoints and ingest its results JSON;
4. fit the training map (K selected on held-out runs);
5. label instability from the runs' own validation logs, score every run at 25% of
   training;
6. backtest the early score against the labels at 10%, 25% and 50%;
7. export the training map, figures and ``report.html``.

Every stage reuses finished work on a second run (the suite's runs, the FeatureTable's
rows, lm-eval's results files).

>>> summary = run_demo("demo-out")                            # doctest: +SKIP
>>> summary["report"]                                         # doctest: +SKIP
PosixPath('demo-out/report/report.html')
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from polymap.atomic import write_csv
from polymap.errors import UsageError

DEMO_FEATURES = "hu2023,weights,spectral,evals_native"
HORIZON = 0.25
LM_EVAL_CHECKPOINTS = 8  # per run, spread over training
LM_EVAL_LIMIT = 100  # examples of the task per checkpoint


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, flush=True)


def _spread(steps: list[int], n: int) -> list[int]:
    """``n`` steps spread evenly over the list (first and last included)."""
    if len(steps) <= n:
        return steps
    return sorted({steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)})


MIN_SEEDS = 3


def run_demo(
    out: str | Path = "demo-out",
    seeds: int = 10,
    steps: int = 400,
    jobs: int = 2,
    quiet: bool = False,
    lm_eval: bool = True,
) -> dict:
    """Run the demo pipeline into ``out``; returns a summary dict (see module docs)."""
    from polymap.evals import ingest
    from polymap.evals.harness import run_harness
    from polymap.evals.tasks import DEFAULT_TASK, write_last_word_task
    from polymap.export import export
    from polymap.extraction import extract
    from polymap.phases import fit_model_dir
    from polymap.scoring import RiskScorer, ScoringError, backtest
    from polymap.suite import build, checkpoint_steps, instability_labels, run_logs
    from polymap.table import write_table

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if seeds < MIN_SEEDS:  # checked before minutes of training, not at the scoring stage
        raise UsageError(
            f"--n-seeds {seeds}: the demo needs at least {MIN_SEEDS} (each run is scored "
            "against the others: a reference needs 3 runs)"
        )
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        return now

    t = time.perf_counter()
    planted = "3,4" if seeds >= 5 else str(seeds - 1)
    _say(f"[1/7] training the built-in suite in {out / 'suite'} (finished runs are reused)", quiet)
    manifest = build(out / "suite", seeds=f"0-{seeds - 1}", steps=steps, unstable=planted,
                     jobs=jobs, progress=not quiet)  # fmt: skip
    t = lap("suite", t)

    _say(f"[2/7] extracting features ({DEMO_FEATURES}) of every checkpoint", quiet)
    features = out / "features.parquet"
    table = extract(out / "suite", out=features, features=DEMO_FEATURES, progress=not quiet)
    t = lap("extract", t)

    evals_path = None
    if lm_eval:
        _say("[3/7] running lm-eval (local last-word task) on checkpoints across training", quiet)
        tasks = write_last_word_task(out / "lm-eval" / "tasks")
        chosen = _spread(checkpoint_steps(steps), LM_EVAL_CHECKPOINTS)
        report = run_harness(
            out / "suite", DEFAULT_TASK, out / "lm-eval" / "results", include_path=tasks,
            steps=",".join(map(str, chosen)), limit=LM_EVAL_LIMIT, device="cpu",
            progress=not quiet,
        )  # fmt: skip
        for ref, reason in report.failed:
            _say(f"      lm-eval failed on {ref}: {reason}", quiet)
        evals, _ = ingest(out / "lm-eval" / "results")
        if not evals.empty:
            evals_path = write_table(evals, out / "evals.parquet")
    else:
        _say("[3/7] lm-eval skipped", quiet)
    t = lap("lm_eval", t)

    _say("[4/7] fitting the training map (HMM, K selected by run-level cross-validation)", quiet)
    (model,) = fit_model_dir(table, out / "model", n_jobs=-1, random_state=0).values()
    _say(f"      K={model.n_states_}: {model.reason_}", quiet)
    scorer = RiskScorer(phase_model=model, n_jobs=-1, progress=not quiet).fit(table)
    scorer.save(out / "model")
    t = lap("fit", t)

    _say(f"[5/7] labelling instability from the runs' eval logs; scoring at {HORIZON:.0%}", quiet)
    labels = instability_labels(run_logs(out / "suite", "eval"))  # the manifest's rule
    write_csv(labels, out / "labels.csv")
    scores = scorer.score_reference(horizon=HORIZON)
    write_csv(scores, out / "scores.csv")
    t = lap("score", t)

    _say("[6/7] backtesting the early score against the labels", quiet)
    result = None
    try:
        result = backtest(
            table, labels, (0.1, 0.25, 0.5), out / "backtest", scorer=scorer, progress=not quiet
        )
    except ScoringError as err:
        _say(f"      backtest skipped: {err}", quiet)
    t = lap("backtest", t)

    _say("[7/7] exporting the training map, figures and report.html", quiet)
    export(
        out / "model", out / "report", scores=out / "scores.csv", labels=out / "labels.csv",
        metric="evals_native.loss" if "evals_native.loss" in table.columns else None,
        backtest=out / "backtest" / "backtest.csv" if result is not None else None,
    )  # fmt: skip
    lap("export", t)
    timings["total"] = time.perf_counter() - started
    return {
        "out": out,
        "table": table,
        "model": model,
        "labels": labels,
        "scores": scores,
        "backtest": result,
        "planted": {r["run"] for r in manifest["runs"] if r["planted"]},
        "evals": evals_path,
        "report": out / "report" / "report.html",
        "timings": timings,
    }


def summary_text(summary: dict) -> str:
    """The demo's closing summary: K, flagged runs and their risk, AUROC, the report."""
    out, model = summary["out"], summary["model"]
    labels: pd.DataFrame = summary["labels"].set_index("run")
    scores: pd.DataFrame = summary["scores"]
    lines = [
        f"Training map: K={model.n_states_} states (see `polymap describe {out / 'model'}`)",
        f"Risk at {HORIZON:.0%} of training (step {int(scores['horizon_step'].iloc[0])}; "
        "flagged at p <= 0.05, the nominal false-alarm rate per run):",
    ]
    for rec in scores.itertuples():
        tags = ["planted"] if rec.run in summary["planted"] else []
        if rec.run in labels.index and labels.loc[rec.run, "unstable"]:
            tags.append(f"became unstable at step {labels.loc[rec.run, 'onset_step']}")
        flag = "FLAGGED" if rec.flagged else "       "
        lines.append(
            f"  {flag} {rec.run:<14} risk {rec.risk:.2f}  p {rec.p_value:.2g}  {', '.join(tags)}"
        )
    result = summary["backtest"]
    if result is not None:
        row = result[result["horizon"] == HORIZON].iloc[0]
        lines.append(
            f"Backtest at horizon {HORIZON}: AUROC {row['auroc']:.2f}, average precision "
            f"{row['average_precision']:.2f}, median lead {row['median_lead_steps']:.0f} steps"
        )
    if summary["evals"] is not None:
        lines.append(f"lm-eval scores: {summary['evals']}")
    lines.append(f"Report: {summary['report']}")
    timings = summary["timings"]
    minutes, seconds = divmod(timings["total"], 60)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
    lines.append(f"Done in {int(minutes)} min {seconds:.0f} s ({stages}). Outputs in {out}/")
    return "\n".join(lines)
