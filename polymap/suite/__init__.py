"""``polymap suite``: a miniature Pythia-like multi-seed training suite with ground truth.

Real GPT-NeoX models (transformers ``GPTNeoXConfig``: parallel residual, rotary 0.25,
untied embeddings) at miniature sizes (``pico``, ``nano``, ``micro``), trained with AdamW,
linear warmup and cosine decay to 10% of the peak, on real English text (Python's
documentation topics, or ``--corpus``) tokenised with a byte-level BPE trained on it.
Checkpoints on a Pythia-like schedule as ``DIR/<run>/step<N>/`` (safetensors + tokenizer),
with ``train_log.csv`` and ``eval_log.csv`` per run and ``DIR/manifest.json``.

Planted instabilities (``--unstable SEEDS [--defect NAME[:STRENGTH]]``): a zoo of defects
whose cause is present from step 0 (:mod:`polymap.suite.defects`; ``--list-defects``).
Without ``--defect`` the planted runs get ``lr_schedule:4``, a learning-rate schedule bug:
the cosine decay is configured with half the run as its period and a peak 4x the healthy
one (``lr_period=0.5``), as
when ``CosineAnnealingLR`` is given too small a ``T_max`` and keeps cycling. Early on the
larger steps move the weights further than in the healthy runs (a trajectory difference
but no loss penalty: planted runs are ahead at 25% of training); the rate then hits its
floor at mid-training and climbs back towards the high peak while the model's curvature
has grown, and the validation loss turns up in the second half and stays above the
healthy runs'. Whether a run became unstable is *measured* from its eval log against the
other runs' (:func:`measure_instability`), not assumed from ``planted``.

>>> from polymap.suite import build
>>> manifest = build("suite/", seeds=range(10), unstable=[3, 4])    # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from polymap.atomic import write_json
from polymap.checkpoints.sources import parse_int_list
from polymap.corpus import CorpusError, load_corpus
from polymap.device import resolve_device
from polymap.errors import PolymapError, UsageError
from polymap.executors import ProcessExecutor, TaskFailed
from polymap.suite.defects import DEFECTS, LEGACY, DefectError, parse_defect
from polymap.suite.schedule import checkpoint_steps, learning_rate
from polymap.suite.train import RUN_FILE, SIZES, RunSpec, train_run

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATA_FILE = "data.safetensors"
TOKENIZER_DIR = "tokenizer"
RISE_THRESHOLD = 0.05  # nats of validation loss above its running minimum
BAND_FLOOR = 0.03  # nats above the other runs' median that count as degraded
LASTING_CHECKPOINTS = 3
DEFAULT_UNSTABLE = (3, 4)

__all__ = [
    "SIZES",
    "CorpusError",
    "RunSpec",
    "SuiteError",
    "build",
    "checkpoint_steps",
    "instability_labels",
    "learning_rate",
    "measure_instability",
    "run_logs",
    "run_specs",
]


class SuiteError(PolymapError, ValueError):
    """Bad suite arguments, or an output directory holding a different suite."""


class SuiteUsageError(SuiteError, UsageError):
    """A bad suite argument (sizes, seeds, steps, device, defect...)."""


def _parse_seeds(seeds: str | Iterable[int]) -> list[int]:
    if isinstance(seeds, str):
        try:
            parsed = parse_int_list(seeds)
        except ValueError as err:
            raise SuiteUsageError(f"seeds {seeds!r}: {err}") from None
    else:
        parsed = [int(s) for s in seeds]
    if not parsed or any(s < 0 for s in parsed):
        raise SuiteUsageError(f"seeds {seeds!r}: need one or more non-negative integers")
    return sorted(set(parsed))


def run_specs(
    sizes: Sequence[str] = ("nano",),
    seeds: str | Iterable[int] = range(10),
    steps: int = 400,
    vary: str = "seed",
    unstable: str | Iterable[int] = DEFAULT_UNSTABLE,
    corpus_digest: str = "",
    vocab_size: int = 512,
    defect: str | None = None,
) -> list[RunSpec]:
    """The runs of a suite, validated (no training, no corpus needed).

    ``defect`` (``NAME[:STRENGTH]``, see :mod:`polymap.suite.defects`) is planted in the
    ``unstable`` seeds; without it they get today's default, ``lr_schedule:4``.
    """
    if isinstance(sizes, str):
        sizes = [s.strip() for s in sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        raise SuiteUsageError(f"unknown size(s) {unknown or sizes}; available: {sorted(SIZES)}")
    if vary not in ("seed", "data", "init"):
        raise SuiteUsageError(f"vary={vary!r} is not one of 'seed', 'data', 'init'")
    if steps < 20:
        raise SuiteUsageError(f"steps={steps}: need at least 20")
    seed_list = _parse_seeds(seeds)
    planted = set(_parse_seeds(unstable)) if unstable not in ("", None, ()) else set()
    stray = planted - set(seed_list)
    if stray:
        raise SuiteUsageError(f"--unstable seeds {sorted(stray)} are not among --seeds {seed_list}")
    try:
        name, strength = parse_defect(defect or LEGACY)
    except DefectError as err:
        raise SuiteUsageError(str(err)) from None
    if defect and not planted:
        raise SuiteUsageError(f"--defect {defect}: no --unstable seeds to plant it in")
    specs = []
    for size in sizes:
        for seed in seed_list:
            bad = seed in planted
            spec = RunSpec(
                name=f"{size}-seed{seed}",
                size=size,
                seed=seed,
                init_seed=seed if vary in ("seed", "init") else 0,
                data_seed=seed if vary in ("seed", "data") else 0,
                steps=steps,
                warmup=max(8, steps // 50),
                planted=bad,
                defect=name if bad else "",
                strength=strength if bad else 0.0,
                vocab_size=vocab_size,
                corpus=corpus_digest,
            )
            if bad:
                spec = replace(spec, **DEFECTS[name].spec_changes(strength, spec.peak_lr))
            specs.append(spec)
    return specs


def measure_instability(
    eval_log: Path | str,
    others: Sequence[Path | str] = (),
    rise: float = RISE_THRESHOLD,
    band: float = BAND_FLOOR,
    lasting: int = LASTING_CHECKPOINTS,
) -> tuple[bool, int | None]:
    """``(unstable, onset_step)`` of a run from its ``eval_log.csv`` against ``others``
    (the eval logs of the suite's other runs of the same size).

    The rule is :func:`polymap.scoring.label_runs` on ``val_loss`` (the one used by
    ``polymap label``): the loss stops being finite, rises more than ``rise`` nats above
    its own running minimum, or is above ``median + max(band, 5 MAD)`` of the other runs
    at ``lasting`` consecutive checkpoints; the onset is the first step of whichever
    happens first.
    """
    logs = [("target", eval_log), *((f"other{i}", o) for i, o in enumerate(others))]
    table = pd.concat([pd.read_csv(p).assign(run=name) for name, p in logs], ignore_index=True)
    labels = instability_labels(table)
    row = labels.set_index("run").loc["target"]
    return bool(row["unstable"]), (None if pd.isna(row["onset_step"]) else int(row["onset_step"]))


def instability_labels(eval_logs: pd.DataFrame) -> pd.DataFrame:
    """``run, unstable, onset_step`` of every run of a ``run, step, val_loss`` table,
    each against the others, with the suite's thresholds (see
    :func:`measure_instability`)."""
    from polymap.scoring.labels import label_runs

    return label_runs(
        eval_logs,
        "val_loss",
        higher_is_better=False,
        min_gap=BAND_FLOOR,
        lasting=LASTING_CHECKPOINTS,
        spike=RISE_THRESHOLD,
        smoothing=1.0,
    )


def run_logs(directory: str | Path, log: str = "eval") -> pd.DataFrame:
    """All runs' ``eval_log.csv`` (``log="eval"``: run, step, val_loss) or
    ``train_log.csv`` (``log="train"``: run, step, loss, lr, grad_norm, tokens) of a
    suite (or any ``DIR/<run>/`` layout with such logs) as one table."""
    if log not in ("eval", "train"):
        raise SuiteUsageError(f"log={log!r} is not one of 'eval', 'train'")
    files = sorted(Path(directory).glob(f"*/{log}_log.csv"))
    if not files:
        raise SuiteError(f"{directory}: no */{log}_log.csv files")
    return pd.concat([pd.read_csv(f).assign(run=f.parent.name) for f in files], ignore_index=True)


def _check_existing(out: Path, specs: list[RunSpec]) -> None:
    defaults = {f.name: f.default for f in fields(RunSpec) if f.default is not MISSING}
    for spec in specs:
        saved = out / spec.name / RUN_FILE
        if saved.exists():
            # a run written before a field existed had that field's default
            previous = {**defaults, **json.loads(saved.read_text())}
            if previous.get("planted") and not previous.get("defect"):
                previous.update(defect="lr_schedule", strength=4.0)  # the only one then
            if previous != json.loads(json.dumps(asdict(spec))):
                changed = sorted(k for k in previous if previous.get(k) != asdict(spec).get(k))
                raise SuiteError(
                    f"{out / spec.name} holds a different run (differs in {changed}); "
                    "use another --out or remove it"
                )
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            suite = json.loads(manifest.read_text()).get("suite", {})
        except ValueError as err:
            raise SuiteError(f"{manifest}: unreadable ({err})") from err
        digest = specs[0].corpus
        if suite.get("corpus") not in (None, digest):
            raise SuiteError(f"{out} holds a suite built on another corpus; use another --out")


def _drain(queue, update) -> None:
    """Pass step counts from ``queue`` to ``update`` until a ``None`` arrives."""
    while (item := queue.get()) is not None:
        update(item)


def _train_worker(spec: RunSpec, out: str, device: str, steps_done) -> str:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    data = load_file(Path(out) / DATA_FILE)
    tokenizer = AutoTokenizer.from_pretrained(Path(out) / TOKENIZER_DIR)

    def report(step: int) -> None:
        if step % 10 == 0 or step == spec.steps:
            steps_done.put(10 if step % 10 == 0 else step % 10)

    path = train_run(spec, Path(out), data["train"], data["validation"], tokenizer, report, device)
    return str(path)


def build(
    out: str | Path,
    sizes: Sequence[str] | str = ("nano",),
    seeds: str | Iterable[int] = range(10),
    steps: int = 400,
    corpus: str | Path | None = None,
    vary: str = "seed",
    unstable: str | Iterable[int] = DEFAULT_UNSTABLE,
    jobs: int = 1,
    device: str = "auto",
    progress: bool = True,
    defect: str | None = None,
) -> dict:
    """Build (or finish) a suite in ``out``; returns the manifest.

    Finished runs are kept; a run interrupted mid-way (``<run>.partial``) is retrained
    from scratch. Every argument is checked before any training starts. With
    ``device="auto"`` runs train on the CPU, one thread each, so checkpoints are
    bit-identical for the same command on the same machine whatever ``jobs`` is; at these
    sizes a GPU is no faster (``device="cuda"`` uses it anyway).
    """
    from safetensors.torch import save_file

    train_device = str(resolve_device(device, prefer_gpu=False))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SuiteError(f"--out {out} exists and is not a directory")
    run_specs(sizes, seeds, steps, vary, unstable, defect=defect)  # validate first
    data = load_corpus(corpus)
    specs = run_specs(
        sizes, seeds, steps, vary, unstable, data.digest, data.vocab_size, defect=defect
    )
    out.mkdir(parents=True, exist_ok=True)
    _check_existing(out, specs)
    save_file({"train": data.train, "validation": data.validation}, out / DATA_FILE)
    data.tokenizer.save_pretrained(out / TOKENIZER_DIR)
    for partial in out.glob("*.partial"):
        shutil.rmtree(partial)
    todo = [s for s in specs if not (out / s.name / RUN_FILE).exists()]
    total = sum(s.steps for s in specs)
    done = total - sum(s.steps for s in todo)
    bar = tqdm(total=total, initial=done, desc="suite", unit="step", disable=not progress)
    with bar:
        finished = len(specs) - len(todo)

        def runs_done(name: str) -> None:
            nonlocal finished
            finished += 1
            bar.set_postfix_str(f"{finished}/{len(specs)} runs, last {name}")

        if jobs <= 1:
            for spec in todo:
                train_run(
                    spec,
                    out,
                    data.train,
                    data.validation,
                    data.tokenizer,
                    lambda _step: bar.update(),
                    train_device,
                )
                runs_done(spec.name)
        else:
            # the extraction's process executor (spawned workers that die with this
            # process; a run whose worker dies is retried once); a thread moves the
            # workers' step counts to the progress bar
            with mp.get_context("spawn").Manager() as manager:
                steps_done = manager.Queue()
                drain = threading.Thread(target=_drain, args=(steps_done, bar.update), daemon=True)
                drain.start()
                tasks = [(s, str(out), train_device, steps_done) for s in todo]
                try:
                    with ProcessExecutor(jobs, retries=1) as executor:
                        for (spec, *_), result in executor.run(_train_worker, tasks):
                            if isinstance(result, TaskFailed):
                                raise SuiteError(f"training {spec.name}: {result.reason}")
                            runs_done(spec.name)
                finally:
                    steps_done.put(None)
                    drain.join()
    return write_manifest(out, specs, data.digest)


def write_manifest(out: Path, specs: list[RunSpec], digest: str) -> dict:
    """Measure every run's stability from its logs and write ``manifest.json``."""
    runs = []
    previous = {}
    if (out / MANIFEST).exists():
        previous = {r["run"]: r for r in json.loads((out / MANIFEST).read_text())["runs"]}
    names = {s.name for s in specs}
    logs = pd.concat(
        [pd.read_csv(out / s.name / "eval_log.csv").assign(run=s.name) for s in specs],
        ignore_index=True,
    )
    sizes = {s.name: s.size for s in specs}
    labels = pd.concat(
        [
            instability_labels(logs[logs["run"].map(sizes) == size])
            for size in sorted(set(sizes.values()))
        ]
    ).set_index("run")
    for spec in specs:
        unstable = bool(labels.loc[spec.name, "unstable"])
        onset = labels.loc[spec.name, "onset_step"]
        onset = None if pd.isna(onset) else int(onset)
        runs.append(
            {
                "run": spec.name,
                "seed": spec.seed,
                "size": spec.size,
                "config": asdict(spec),
                "planted": spec.planted,
                "defect": spec.defect or None,
                "strength": spec.strength if spec.defect else None,
                "unstable": unstable,
                "onset_step": onset,
            }
        )
    runs.extend(r for name, r in previous.items() if name not in names)
    runs.sort(key=lambda r: r["run"])
    manifest = {
        "suite": {
            "corpus": digest,
            "rise_threshold": RISE_THRESHOLD,
            "band_floor": BAND_FLOOR,
            "torch": torch.__version__,
        },
        "runs": runs,
    }
    write_json(out / MANIFEST, manifest)
    return manifest
