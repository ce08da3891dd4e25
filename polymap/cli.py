"""The ``polymap`` command line: parses, calls the Python API, prints.

Exit codes: 0 success, 1 some items failed (a summary is printed), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from polymap.atomic import write_csv
from polymap.errors import PolymapError, UsageError
from polymap.executors import executors

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _extract(args: argparse.Namespace) -> int:
    from polymap.extraction import extract

    table = extract(
        args.sources,
        out=args.out,
        features=args.features,
        steps=args.steps,
        device=args.device,
        jobs=args.jobs,
        delete_after=args.delete_after,
        progress=not args.quiet,
        probe=_probe_spec(args),
        executor=args.executor,
        address=args.address,
        gpus_per_task=args.gpus_per_task,
        retries=args.retries,
        max_on_disk=args.max_on_disk,
    )
    return _report(table, args.out)


def _probe_spec(args: argparse.Namespace):
    from polymap.features.probe import ProbeSpec

    return ProbeSpec(
        sequences=_positive_int(str(args.probe_sequences), "--probe-sequences"),
        eval_sequences=_positive_int(str(args.probe_eval_sequences), "--probe-eval-sequences"),
        length=_positive_int(str(args.probe_length), "--probe-length"),
        tokens=args.probe_tokens,
        text=args.probe_text,
    )


def _evals_ingest(args: argparse.Namespace) -> int:
    from polymap.evals import ingest
    from polymap.table import write_table

    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a directory; give EVALS.parquet")
    table, report = ingest(args.paths, manifest=args.manifest, stderr=args.stderr)
    for line in report.duplicates:
        print(f"duplicate: {line}")
    for file, reason in report.problems:
        print(f"skipped: {file}: {reason}")
    if table.empty:
        print(f"no usable results in {report.files} file(s); nothing written", file=sys.stderr)
        return EXIT_FAILED
    write_table(table, args.out)
    columns = [c for c in table.columns if c.startswith("eval.")]
    print(
        f"{args.out}: {len(table)} checkpoint(s) of {table['run'].nunique()} run(s), "
        f"{len(columns)} eval column(s) from {report.files} file(s)"
    )
    return EXIT_OK if report.ok else EXIT_FAILED


def _evals_run(args: argparse.Namespace) -> int:
    from polymap.evals.harness import run_harness

    report = run_harness(
        args.sources,
        tasks=args.tasks,
        out=args.out,
        include_path=args.include_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        steps=args.steps,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(
        f"{args.out}: {len(report.written)} results file(s) written, "
        f"{report.skipped} checkpoint(s) already done, {len(report.failed)} failed"
    )
    for ref, reason in report.failed:
        print(f"  {ref}: {reason}")
    return EXIT_FAILED if report.failed else EXIT_OK


def _evals_task(args: argparse.Namespace) -> int:
    from polymap.evals.tasks import write_last_word_task

    folder = write_last_word_task(args.out, corpus=args.corpus, name=args.name)
    print(f"{folder}: task {args.name} (use --include-path {folder})")
    return EXIT_OK


def _merge(args: argparse.Namespace) -> int:
    from polymap.table import merge_tables, read_table, write_table

    merged = merge_tables([read_table(p) for p in args.tables], how=args.how)
    write_table(merged, args.out)
    print(f"{args.out}: {len(merged)} checkpoint(s) of {merged['run'].nunique()} run(s)")
    return EXIT_OK


def _report(table, out) -> int:
    bad = table[table["status"] != "ok"]
    runs = table["run"].nunique()
    print(f"{out}: {len(table)} checkpoint(s) of {runs} run(s), {table.shape[1]} columns")
    if bad.empty:
        return EXIT_OK
    print(f"{len(bad)} checkpoint(s) not ok:")
    for rec in bad.itertuples():
        print(f"  {rec.run} step {rec.step}: {rec.status}: {rec.error}")
    return EXIT_FAILED if (bad["status"] != "warning").any() else EXIT_OK


def _features(args: argparse.Namespace) -> int:
    from polymap.features import DEFAULT_FEATURE_SETS, feature_sets

    for name, cls in feature_sets().items():
        default = " (default)" if name in DEFAULT_FEATURE_SETS else ""
        print(f"{name}{default}")
        for key, text in cls.documentation.items():
            print(f"  {key:<40} {text}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from polymap.pipeline import run_demo, summary_text

    summary = run_demo(args.out, seeds=args.n_seeds, steps=args.train_steps, jobs=args.jobs,
                       lm_eval=not args.no_lm_eval)  # fmt: skip
    print()
    print(summary_text(summary))
    return _report(summary["table"], Path(args.out) / "features.parquet")


def _export(args: argparse.Namespace) -> int:
    from polymap.export import export

    files = export(
        args.model_dir,
        args.out,
        scores=args.scores,
        labels=args.labels,
        metric=args.metric,
        formats=args.format,
        table=args.table,
        backtest=args.backtest,
        highlight_run=args.highlight,
        step_scale=args.step_scale,
        renderer=args.renderer,
    )
    print(f"{args.out}: {len(files)} file(s): {', '.join(p.name for p in files)}")
    return EXIT_OK


def _suite(args: argparse.Namespace) -> int:
    from polymap.suite import build

    if args.list_defects:
        from polymap.suite.defects import DEFECTS

        for defect in DEFECTS.values():
            print(defect.describe())
        return EXIT_OK
    if not args.out:
        raise UsageError("suite needs --out DIR (or --list-defects)")
    manifest = build(
        args.out,
        sizes=args.sizes,
        seeds=args.seeds,
        steps=args.train_steps,
        corpus=args.corpus,
        vary=args.vary,
        unstable=args.unstable,
        jobs=args.jobs,
        device=args.device,
        progress=not args.quiet,
        defect=args.defect,
    )
    runs = manifest["runs"]
    print(f"{args.out}: {len(runs)} run(s)")
    for r in runs:
        planted = f"planted {r.get('defect') or ''}:{r.get('strength')} " if r["planted"] else ""
        tags = planted + ("UNSTABLE" if r["unstable"] else "")
        onset = f" onset step {r['onset_step']}" if r["unstable"] else ""
        print(f"  {r['run']:<16} {tags.strip() or 'stable'}{onset}")
    return EXIT_OK


def _fit(args: argparse.Namespace) -> int:
    from polymap.phases import describe, fit_model_dir
    from polymap.table import read_table

    states = args.states if args.states == "auto" else _positive_int(args.states, "--states")
    if args.pool_by and args.group_by:
        raise UsageError("--pool-by and --group-by: pool the groups into one scorer, or fit one "
                         "per group, not both")  # fmt: skip
    models = fit_model_dir(
        read_table(args.features_table),
        args.out,
        group_by=args.group_by,
        n_states=states,
        restarts=args.restarts,
        covariance=args.covariance,
        features=args.features,
        log_transform=args.log,
        scale=args.scale,
        n_jobs=args.jobs,
        random_state=args.seed,
        progress=not args.quiet,
    )
    from polymap.scoring import RiskScorer, ScoringError
    from polymap.scoring.pooling import PoolingError

    table = read_table(args.features_table)
    status = EXIT_OK
    for name, model in models.items():
        label = f"[{name}] " if name else ""
        print(f"{label}K={model.n_states_}: {model.reason_}")
        part = table if not name else table[table[args.group_by].astype(str) == name]
        try:
            RiskScorer(
                phase_model=model, performance=args.performance, n_jobs=args.jobs,
                random_state=args.seed, progress=not args.quiet, pool_by=args.pool_by,
                features=args.score_features,
            ).fit(part).save(Path(args.out) / name)  # fmt: skip
        except PoolingError as err:  # asked for, refused: the map is written, no scorer
            print(f"{label}no scorer saved: {err}", file=sys.stderr)
            status = EXIT_FAILED
        except ScoringError as err:
            print(f"{label}no scorer saved: {err}")
    print(f"wrote {args.out}")
    if not args.quiet:
        print()
        print(describe(args.out))
    return status


def _describe(args: argparse.Namespace) -> int:
    from polymap.phases import describe
    from polymap.scoring.calibration import describe_scorer

    print(describe(args.model_dir))
    scorer = describe_scorer(args.model_dir)
    if scorer:
        print(scorer)
    return EXIT_OK


def _read_any_table(path: str, metric: str = "val_loss"):
    """A Parquet/CSV table, or a runs directory (its eval logs for ``val_loss``, else its
    train logs)."""
    import pandas as pd

    from polymap.suite import run_logs

    p = Path(path)
    if p.is_dir():
        return run_logs(p, "eval" if metric == "val_loss" else "train")
    if not p.exists():
        raise PolymapError(f"TABLE {p}: no such file or directory")
    try:
        if p.suffix == ".csv":
            return pd.read_csv(p)
        return pd.read_parquet(p)  # any table: label metrics need not be feature columns
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise PolymapError(f"TABLE {p}: unreadable ({type(err).__name__}: {err})") from err


def _scorer(model_dir: str, features, alpha: float, seed: int, progress: bool = True):
    """The RiskScorer saved in MODEL_DIR when its reference is ``features``'s runs; else
    one fitted on ``features`` with MODEL_DIR's phase model (its features, covariance,
    scaling, K)."""
    from polymap.phases import PhaseModel
    from polymap.scoring import RiskScorer

    if not Path(model_dir).is_dir():
        raise UsageError(f"--model {model_dir}: no such model directory (polymap fit writes one)")
    try:
        scorer = RiskScorer.load(model_dir)
    except ValueError as err:
        if "no scorer.json" not in str(err):
            raise
        scorer = None
    runs = set(features["run"].astype(str)) if features is not None else None
    if scorer is not None and (
        runs is None or runs == set(scorer.reference_["run"]) | set(scorer.broken_["run"])
    ):
        return scorer.set_params(alpha=alpha, progress=progress)
    if features is None:
        raise UsageError(
            f"{model_dir} has no saved scorer (fitted before polymap saved one): give "
            "FEATURES.parquet to fit one with its map, or refit with `polymap fit`"
        )
    return RiskScorer(
        phase_model=PhaseModel.load(model_dir), alpha=alpha, random_state=seed,
        progress=progress,
    ).fit(features)  # fmt: skip


def _score(args: argparse.Namespace) -> int:
    import pandas as pd

    from polymap.scoring import score_paths

    if args.paths:
        scores = score_paths(pd.read_csv(args.paths), args.until_step)
    else:
        if not args.model:
            raise UsageError("score needs --model MODEL_DIR (or --paths)")
        from polymap.table import read_table

        reference = read_table(args.features_table) if args.features_table else None
        group_by = args.group_by or _grouped(args.model)
        if group_by:
            if args.targets:
                raise UsageError("--targets with --group-by: score each group's targets "
                                 "with --model MODEL_DIR/<value>")  # fmt: skip
            from polymap.scoring.backtest import score_groups

            scorers = _group_scorers(args.model, reference, group_by, args.alpha, args.seed)
            scores = score_groups(
                scorers, group_by, horizon=args.horizon, until_step=args.until_step
            )
            _write_scores(scores, args.out)
            return EXIT_OK
        scorer = _scorer(args.model, reference, args.alpha, args.seed, not args.quiet)
        if args.targets:
            scores = scorer.score(
                read_table(args.targets), horizon=args.horizon, until_step=args.until_step
            )
        else:
            scores = scorer.score_reference(horizon=args.horizon, until_step=args.until_step)
    _write_scores(scores, args.out)
    return EXIT_OK


def _write_scores(scores, out: str) -> None:
    write_csv(scores, out)
    columns = ("run", "risk", "flagged", "p_value", "first_flag_step")
    shown = [c for c in columns if c in scores]
    print(scores[shown].to_string(index=False))
    print(f"wrote {out}")


def _grouped(model_dir: str | None) -> str | None:
    """The ``group_by`` column of a grouped MODEL_DIR (``fit --group-by``), else None."""
    from polymap.phases.model_dir import read_groups

    spec = read_groups(model_dir) if model_dir else None
    return None if spec is None else spec["group_by"]


def _group_scorers(model_dir: str, features, group_by: str, alpha: float, seed: int):
    """One scorer per group: a grouped MODEL_DIR's saved ones (refitted on the group's
    runs of ``features`` when they differ), or, for a plain MODEL_DIR, one fitted per
    group with its map's configuration."""
    from polymap.phases import PhaseModel
    from polymap.scoring.backtest import group_scorers

    if features is None:
        raise UsageError("--group-by needs FEATURES.parquet (the runs to group)")
    if group_by not in features.columns:
        raise UsageError(f"--group-by {group_by!r}: no such column in the features table")
    given = {}
    if _grouped(model_dir):
        from polymap.phases.model_dir import group_dir

        for value, part in features.groupby(group_by, sort=True):
            folder = group_dir(model_dir, value)  # a hostile value is an error, not a path
            if folder.is_dir():
                given[str(value)] = _scorer(str(folder), part, alpha, seed)
        return group_scorers(features, group_by, given, alpha=alpha, random_state=seed)
    template = PhaseModel(**PhaseModel.load(model_dir).get_params())
    return group_scorers(
        features, group_by, None, phase_model=template, alpha=alpha, random_state=seed
    )


def _label(args: argparse.Namespace) -> int:
    from polymap.scoring import label_runs
    from polymap.scoring.labels import check_label_params

    direction = {"auto": None, "higher": True, "lower": False}[args.better]
    spike = {"auto": "auto", "off": None}.get(args.spike)
    if spike is None and args.spike != "off":
        try:
            spike = float(args.spike)
        except ValueError:
            raise UsageError(
                f"--spike {args.spike!r}: expected a number, 'off' or 'auto'"
            ) from None
    min_gap = args.min_gap
    check_label_params(min_gap, spike, args.lasting)  # flags before any reading
    table = _read_any_table(args.table, args.metric)
    if Path(args.table).is_dir() and args.metric == "val_loss":
        # a suite's runs: the suite's own rule (its manifest's labels) unless overridden
        from polymap.suite import BAND_FLOOR, RISE_THRESHOLD

        min_gap = BAND_FLOOR if min_gap is None else min_gap
        spike = RISE_THRESHOLD if args.spike == "auto" else spike
        direction = False if direction is None else direction
        print(f"a suite's validation loss: the suite's rule (gap {min_gap:g} nats, rise "
              f"{spike if spike is not None else 'off'}, {args.lasting} checkpoints)")  # fmt: skip
    labels = label_runs(
        table,
        args.metric,
        after_step=args.after_step,
        higher_is_better=direction,
        min_gap=min_gap,
        lasting=args.lasting,
        spike=spike,
        group_by=args.group_by,
    )
    write_csv(labels, args.out)
    print(labels.to_string(index=False))
    print(f"wrote {args.out}: {int(labels['unstable'].sum())} of {len(labels)} unstable")
    return EXIT_OK


def _backtest(args: argparse.Namespace) -> int:
    from polymap.scoring import backtest
    from polymap.table import read_table

    try:  # flags first: a usage error before any reading
        horizons = tuple(_fraction(high_open=False)(h) for h in args.horizons.split(","))
    except argparse.ArgumentTypeError as err:
        raise UsageError(
            f"--horizons {args.horizons!r}: expected fractions in (0, 1] like 0.1,0.25 ({err})"
        ) from None
    features = read_table(args.features_table)
    group_by = args.group_by or (_grouped(args.model) if args.model else None)
    if group_by and args.model:
        scorers = _group_scorers(args.model, features, group_by, args.alpha, args.seed)
        table = backtest(
            features, args.labels, horizons, args.out, scorer=scorers, group_by=group_by,
            progress=not args.quiet,
        )  # fmt: skip
    elif group_by:
        table = backtest(
            features, args.labels, horizons, args.out, alpha=args.alpha,
            random_state=args.seed, n_jobs=-1, progress=not args.quiet, group_by=group_by,
        )  # fmt: skip
    elif args.model:
        scorer = _scorer(args.model, features, args.alpha, args.seed, not args.quiet)
        table = backtest(
            features, args.labels, horizons, args.out, scorer=scorer, progress=not args.quiet
        )
    else:
        table = backtest(
            features, args.labels, horizons, args.out, alpha=args.alpha,
            random_state=args.seed, n_jobs=-1, progress=not args.quiet,
        )  # fmt: skip
    print(table.to_string(index=False))
    print(f"wrote {args.out}/backtest.csv and backtest.png")
    return EXIT_OK


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected 'auto' or a positive integer") from None
    if value < 1:
        raise UsageError(f"{flag} {value}: must be at least 1")
    return value


GROUP_HELP = (
    "compare runs only within each value of this column (e.g. model: a 70M run against "
    "70M runs); a grouped MODEL_DIR (fit --group-by) implies it"
)


def _jobs(text: str) -> int:
    """``--jobs``: a positive number of workers, or -1 for all cores."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError(f"{value}: give a positive number, or -1 for all cores")
    return value if value > 0 else max(1, os.cpu_count() or 1)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _fraction(low_open: bool = True, high_open: bool = True):
    """A float in (0, 1), or (0, 1] with ``high_open=False``: an argparse type."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above = value > 0 if low_open else value >= 0
        below = value < 1 if high_open else value <= 1
        if not (above and below):
            span = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{value:g}: must be in {span}")
        return value

    parse.__name__ = "fraction"
    return parse


def _version() -> str:
    from polymap import __version__

    return __version__


_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument(
    "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details"
)
_COMMON.add_argument(
    "-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
    help="less output: no progress bars, no extra reports",
)  # fmt: skip


class _Deprecated(argparse.Action):
    """Stores the value; warns when the old spelling ``old`` was used (one flag name, one
    meaning across verbs: ``--steps`` filters checkpoints, ``--seeds`` lists seeds)."""

    def __init__(self, option_strings, dest, old: str, **kwargs):
        self.old = old
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == self.old:
            new = next(o for o in self.option_strings if o != self.old)
            print(
                f"polymap: {self.old} is deprecated here, use {new} (it will be removed in the "
                "next release)",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where there is a default worth showing (not None/False)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (
            action.help or ""
        ):
            return action.help
        return super()._get_help_string(action)


def _verb(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """A verb's parser: the global -v/-q also after the verb, defaults shown in --help."""
    return subparsers.add_parser(name, parents=[_COMMON], formatter_class=_DefaultsHelp, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polymap", description="Map training runs and flag the ones that will go wrong."
    )
    parser.add_argument("--version", action="version", version=f"polymap {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    parser.add_argument("-q", "--quiet", action="store_true", help="less output: no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _verb(sub, "extract", help="extract per-checkpoint features into a Parquet table")
    p.add_argument(
        "sources",
        nargs="+",
        help="runs dir, run dir, checkpoint dir, manifest.csv, hf://ORG/NAME[@REV,...], "
        "pythia:SIZE, polypythias:SIZE[:SEEDS]",
    )
    p.add_argument("--out", required=True, help="FEATURES.parquet (created or extended)")
    p.add_argument("--features", default=None, help="comma list (default hu2023,weights,spectral)")
    p.add_argument("--steps", default=None, help="all | eval | list/ranges like 0,1000-5000")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--jobs", type=_jobs, default=1, help="worker processes (--executor process)")
    p.add_argument(
        "--executor",
        default=None,
        choices=executors(),
        help="where checkpoints are extracted (default: process if --jobs > 1)",
    )
    p.add_argument("--address", default=None, help="Ray cluster: auto, HOST:PORT, ray://HOST:PORT")
    p.add_argument("--gpus-per-task", type=float, default=0, help="GPUs per Ray task")
    p.add_argument(
        "--retries", type=_at_least(0), default=2, help="retries of a task whose worker died"
    )
    p.add_argument(
        "--max-on-disk",
        type=_at_least(1),
        default=2,
        help="hub checkpoints on disk at once (with --delete-after)",
    )
    p.add_argument(
        "--delete-after", action="store_true", help="delete hub downloads after extracting each"
    )
    p.add_argument("--probe-text", default=None, help="probe text file (model-level sets)")
    p.add_argument("--probe-tokens", default=None, help="probe token ids (.npy or text ints)")
    p.add_argument(
        "--probe-sequences", type=_at_least(1), default=8,
        help="probe rows for statistics of model internals (activations, gradients, ...)",
    )  # fmt: skip
    p.add_argument(
        "--probe-eval-sequences", type=_at_least(1), default=64,
        help="probe rows for evals_native's loss and accuracy (a loss needs more tokens)",
    )  # fmt: skip
    p.add_argument("--probe-length", type=_at_least(1), default=128, help="tokens per probe row")
    p.set_defaults(func=_extract, out_kind="file")

    p = _verb(sub, "evals", help="lm-eval results: ingest files, run lm-eval, local tasks")
    evals = p.add_subparsers(dest="evals_command", required=True, metavar="ACTION")
    e = _verb(evals, "ingest", help="read lm-eval results JSON into EVALS.parquet")
    e.add_argument("paths", nargs="+", metavar="PATH", help="results files or folders")
    e.add_argument("--out", required=True, help="EVALS.parquet (a FeatureTable)")
    e.add_argument("--manifest", default=None, help="CSV path,run,step for files without them")
    e.add_argument(
        "--stderr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep <metric>_stderr columns (the measurement noise fit, label and score use)",
    )
    e.set_defaults(func=_evals_ingest, out_kind="file")
    e = _verb(evals, "run", help="run lm-eval on every checkpoint, write its results JSON")
    e.add_argument(
        "sources", nargs="+", metavar="SOURCE", help="runs folder, run, checkpoint or manifest"
    )
    e.add_argument("--tasks", required=True, help="comma list of lm-eval task names")
    e.add_argument("--out", required=True, help="output folder (OUT/<run>/step<N>/results_*)")
    e.add_argument("--include-path", action="append", default=None, help="local task folder")
    e.add_argument("--limit", type=float, default=None, help="examples per task (lm-eval)")
    e.add_argument(
        "--num-fewshot", type=_at_least(0), default=None, help="few-shot examples (task default)"
    )
    e.add_argument("--batch-size", type=_at_least(1), default=16, help="lm-eval batch size")
    e.add_argument("--steps", default=None, help="all | eval | list/ranges")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.add_argument("--seed", type=int, default=0, help="random seed")
    e.set_defaults(func=_evals_run, out_kind="dir")
    e = _verb(evals, "task", help="write a local LAMBADA-style lm-eval task from text")
    e.add_argument("--out", required=True, help="folder for <name>.yaml + <name>.jsonl")
    e.add_argument("--corpus", default=None, help="text file (default: the suite corpus)")
    e.add_argument("--name", default="suite_lastword", help="task name")
    e.set_defaults(func=_evals_task, out_kind="dir")

    p = _verb(sub, "merge", help="join FeatureTables on (run, step)")
    p.add_argument(
        "tables", nargs="+", metavar="TABLE.parquet", help="FeatureTables to join on (run, step)"
    )
    p.add_argument("--out", required=True, help="MERGED.parquet")
    p.add_argument("--how", default="outer", choices=["outer", "inner", "left"], help="join type")
    p.set_defaults(func=_merge, out_kind="file")

    p = _verb(sub, "fit", help="fit the HMM training map (latent phases) over all runs")
    p.add_argument("features_table", metavar="FEATURES.parquet", help="a FeatureTable")
    p.add_argument("--out", required=True, help="MODEL_DIR")
    p.add_argument("--states", default="auto", help="auto (select K in 1..8) or K")
    p.add_argument("--restarts", type=_at_least(1), default=5, help="seeded restarts per K")
    p.add_argument("--features", default=None, help="sets or columns (default hu2023)")
    p.add_argument("--group-by", default=None, help="fit one model per value of this column")
    p.add_argument(
        "--score-features",
        default=None,
        help="the risk scorer's deviation columns: sets, columns or 'all' (default: the map's "
        "--features when given, else every feature column)",
    )
    p.add_argument(
        "--pool-by",
        default=None,
        metavar="COLUMN",
        help="one scorer for all groups of COLUMN (sizes, data orders), each standardised by "
        "its own group, if a leave-one-group-out check finds them exchangeable (else exit 1)",
    )
    p.add_argument("--covariance", default="diag", choices=["diag", "full"], help="HMM covariance")
    p.add_argument(
        "--scale", default="global", choices=["global", "per-run"], help="feature scaling"
    )
    p.add_argument("--log", action="store_true", help="log positive heavy-tailed features")
    p.add_argument(
        "--performance", default="auto",
        help="the scorer's performance columns: auto (probe loss/accuracy, eval.* scores), "
        "none, or sets/columns",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--jobs", type=_jobs, default=-1, help="parallel fits (joblib; -1 = all cores)")
    p.set_defaults(func=_fit, out_kind="dir")

    p = _verb(sub, "describe", help="print a fitted training map")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="written by polymap fit")
    p.set_defaults(func=_describe)

    p = _verb(sub, "score", help="outlier risk of each run up to a horizon")
    p.add_argument(
        "features_table",
        metavar="FEATURES.parquet",
        nargs="?",
        help="reference runs (default: the MODEL_DIR's)",
    )
    p.add_argument("--model", help="MODEL_DIR from polymap fit (its saved scorer)")
    p.add_argument("--targets", help="score these runs (a FeatureTable) instead of the reference")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument(
        "--horizon",
        type=_fraction(high_open=False),
        default=None,
        help="fraction of training, e.g. 0.25 (default: whole runs)",
    )
    cut.add_argument(
        "--until-step", type=_at_least(0), default=None, help="last step that may be used"
    )
    p.add_argument("--paths", help="score external state paths (run,step,state CSV)")
    p.add_argument("--alpha", type=_fraction(), default=0.05, help="false-alarm rate of flagged")
    p.add_argument("--group-by", default=None, help=GROUP_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", required=True, help="SCORES.csv")
    p.set_defaults(func=_score, out_kind="file")

    p = _verb(sub, "label", help="mark runs that later became unstable")
    p.add_argument("table", metavar="TABLE", help="Parquet/CSV (run, step, metric) or suite dir")
    p.add_argument("--metric", required=True, help="column, e.g. val_loss or eval.lambada.acc")
    p.add_argument("--after-step", type=_at_least(0), default=None, help="only later steps count")
    p.add_argument(
        "--better",
        default="auto",
        choices=["auto", "higher", "lower"],
        help="which direction is better (auto: from the name)",
    )
    p.add_argument(
        "--min-gap", type=float, default=None,
        help="smallest gap below the band (default: 10%% of the metric's late-training change; "
        "a suite directory's val_loss: the suite's 0.03 nats)",
    )  # fmt: skip
    p.add_argument(
        "--spike", default="auto",
        help="rise above the run's own best that marks it: a number, 'off', or 'auto' "
        "(losses only, at the band's gap floor)",
    )  # fmt: skip
    p.add_argument(
        "--lasting", type=_at_least(1), default=3, help="consecutive checkpoints off the band"
    )
    p.add_argument("--group-by", default=None, help=GROUP_HELP)
    p.add_argument("--out", required=True, help="LABELS.csv")
    p.set_defaults(func=_label, out_kind="file")

    p = _verb(sub, "backtest", help="AUROC/AP/lead time of early risk against labels")
    p.add_argument("features_table", metavar="FEATURES.parquet", help="a FeatureTable")
    p.add_argument("--labels", required=True, help="LABELS.csv")
    p.add_argument("--model", help="MODEL_DIR (its saved scorer; else K is selected)")
    p.add_argument("--group-by", default=None, help=GROUP_HELP)
    p.add_argument("--horizons", default="0.1,0.25,0.5", help="fractions of training")
    p.add_argument("--alpha", type=_fraction(), default=0.05, help="false-alarm rate of flagged")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_backtest, out_kind="dir")

    p = _verb(sub, "suite", help="train a miniature Pythia-like multi-seed suite")
    p.add_argument("--out", default=None, help="suite directory")
    p.add_argument("--sizes", default="nano", help="comma list of pico, nano, micro")
    p.add_argument("--seeds", default="0-9", help="seed list/ranges, e.g. 0-9 or 1,3,5")
    p.add_argument(
        "--train-steps", "--steps", dest="train_steps", type=_at_least(1), default=400,
        action=_Deprecated, old="--steps", help="training steps per run",
    )  # fmt: skip
    p.add_argument("--corpus", default=None, help="text file (default: Python's doc topics)")
    p.add_argument(
        "--vary", default="seed", choices=["seed", "data", "init"], help="what the seed changes"
    )
    p.add_argument("--unstable", default="3,4", help="seeds to plant instability in ('' none)")
    p.add_argument(
        "--defect",
        default=None,
        help="NAME[:STRENGTH] planted in --unstable (lr_schedule:4)",
    )
    p.add_argument("--list-defects", action="store_true", help="print the defects and exit")
    p.add_argument("--jobs", type=_jobs, default=2, help="runs trained in parallel")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (training uses CPU)")
    p.set_defaults(func=_suite, out_kind="dir")

    p = _verb(sub, "features", help="list the feature sets and what each feature means")
    p.set_defaults(func=_features)

    p = _verb(sub, "demo", help="the whole pipeline on the built-in suite")
    p.add_argument("--out", default="demo-out", help="output directory")
    p.add_argument(
        "--n-seeds", "--seeds", dest="n_seeds", type=_at_least(3), default=10,
        action=_Deprecated, old="--seeds", help="number of seeds in the suite (0..N-1)",
    )  # fmt: skip
    p.add_argument(
        "--train-steps", "--steps", dest="train_steps", type=_at_least(1), default=400,
        action=_Deprecated, old="--steps", help="training steps per run",
    )  # fmt: skip
    p.add_argument("--jobs", type=_jobs, default=2, help="runs trained in parallel")
    p.add_argument("--no-lm-eval", action="store_true", help="skip the lm-eval stage")
    p.set_defaults(func=_demo, out_kind="dir")

    p = _verb(sub, "export", help="training-map graphs, figures and an HTML report")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="written by polymap fit")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--scores", default=None, help="SCORES.csv from polymap score")
    p.add_argument("--labels", default=None, help="LABELS.csv from polymap label")
    p.add_argument("--backtest", default=None, help="backtest.csv from polymap backtest")
    p.add_argument("--metric", default=None, help="column overlaid on the timelines")
    p.add_argument("--table", default=None, help="FEATURES.parquet (default: MODEL_DIR's)")
    p.add_argument("--format", default="dot,json,png,svg,html", help="comma list")
    p.add_argument("--highlight", default=None, help="run whose path is drawn in red")
    p.add_argument(
        "--step-scale",
        default="sqrt",
        choices=["sqrt", "log", "linear"],
        help="step axis of timelines",
    )
    p.add_argument(
        "--renderer",
        default="matplotlib",
        choices=["matplotlib", "graphviz", "auto"],
        help="training-map drawing",
    )
    p.set_defaults(func=_export, out_kind="dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``polymap`` command. Exit codes: 0 ok, 1 a data error (bad or missing input, an
    output that cannot be written, a run with failed checkpoints), 2 a usage error (bad
    flags), 130 interrupted; a bug shows its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from polymap.errors import PolymapError, UsageError
    from polymap.paths import OutputPathError, check_output

    def fail(message: str, code: int) -> int:
        print(f"polymap {args.command}: error: {message}", file=sys.stderr)
        return code

    try:
        out, kind = getattr(args, "out", None), getattr(args, "out_kind", None)
        if out is not None and kind is not None:
            check_output(out, kind)  # before any work: not after minutes of computing
        return args.func(args)
    except OutputPathError as err:
        return fail(f"--out {err}", EXIT_FAILED)
    except UsageError as err:
        return fail(str(err), EXIT_USAGE)
    except BrokenPipeError:  # `polymap features | head`: the reader has gone, stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except (PolymapError, OSError) as err:  # OSError: a missing input, a failed write
        return fail(str(err), EXIT_FAILED)
    except KeyboardInterrupt:
        print(f"polymap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
