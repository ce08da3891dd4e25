"""The ``polymap`` command line: parses, calls the Python API, prints.

Exit codes: 0 success, 1 some items failed (a summary is printed), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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
    )
    return _report(table, args.out)


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
    from transformers.utils import logging as hf_logging

    from polymap.extraction import extract
    from polymap.synthetic import make_tiny_run

    hf_logging.disable_progress_bar()

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    runs = out / "runs"
    for seed in range(args.seeds):
        run = runs / f"seed{seed}"
        if not (run / "step16").exists():
            print(f"training tiny GPT-NeoX run {run} ...", flush=True)
            make_tiny_run(run, steps=(0, 1, 2, 4, 8, 16), seed=seed, hidden=64, layers=2)
    features = out / "features.parquet"
    table = extract(runs, out=features, progress=True)
    cols = ["run", "step", "hu2023.lambda_max", "weights.attn_qkv.rel_dist"]
    print(table[[c for c in cols if c in table.columns]].to_string(index=False))
    return _report(table, features)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polymap", description="Map training runs and flag the ones that will go wrong."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="extract per-checkpoint features into a Parquet table")
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
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    p.add_argument(
        "--delete-after", action="store_true", help="delete hub downloads after extracting each"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_extract)

    p = sub.add_parser("features", help="list the feature sets and what each feature means")
    p.set_defaults(func=_features)

    p = sub.add_parser("demo", help="the whole pipeline on tiny built-in runs")
    p.add_argument("--out", default="demo-out", help="output directory")
    p.add_argument("--seeds", type=int, default=3, help="number of tiny runs")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from polymap.checkpoints import SourceError
    from polymap.table import TableError, TableLockedError

    try:
        return args.func(args)
    except (SourceError, TableError, TableLockedError, ValueError) as err:
        print(f"polymap {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
