"""Run lm-evaluation-harness on checkpoints and keep its own results JSON.

For every checkpoint the model is loaded once (``lm_eval.models.huggingface.HFLM``) and
all tasks are evaluated in one ``lm_eval.simple_evaluate`` call; lm-eval's
``EvaluationTracker`` writes ``OUT/<run>/step<N>/results_<timestamp>.json``, which
:func:`polymap.evals.ingest` reads back. ``config.model_args`` names the checkpoint
(``pretrained=<dir or ORG/NAME>,revision=step<N>``) so the file is self-describing.

Local tasks (YAML + local data files, see :mod:`polymap.evals.tasks`) come in through
``include_path``; nothing is fetched when ``HF_HUB_OFFLINE=1``/``HF_DATASETS_OFFLINE=1``.
A checkpoint that already has a readable results file with every requested task is
skipped, so an interrupted sweep resumes; one that fails is reported and the sweep goes
on.

>>> run_harness("suite/", tasks=["suite_lastword"], out="evals/",         # doctest: +SKIP
...             include_path="suite/tasks")
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from polymap.checkpoints import CheckpointError, CheckpointRef, as_refs, materialize
from polymap.checkpoints.hub import parse_location
from polymap.errors import PolymapError

log = logging.getLogger(__name__)


class HarnessError(PolymapError, RuntimeError):
    """lm-eval is missing, or a task cannot be found."""


@dataclass
class HarnessReport:
    """Files written, checkpoints skipped as already done, and failures."""

    written: list[Path] = field(default_factory=list)
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint, reason)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:  # pragma: no cover - lm-eval is a dependency
        raise HarnessError(f"lm-eval is not importable ({err}); pip install 'lm-eval[hf]'") from err
    return lm_eval, EvaluationTracker, HFLM, TaskManager


@contextmanager
def _quiet_inner_bars():
    """lm-eval draws several progress bars per checkpoint on ``sys.stderr``; one bar per
    sweep (ours, created before) is enough. Their output goes to a discarded buffer."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


@contextmanager
def _default_sigterm():
    """SIGTERM at its default (terminate) while lm-eval runs. lm-eval bootstraps standard
    errors in a forked ``multiprocessing.Pool`` whose ``terminate()`` relies on SIGTERM
    killing the workers; a Python handler the process inherited (``ray.init`` installs
    one that calls ``sys.exit``) makes a worker unwind instead, block on the pool's queue
    lock, and the sweep hang forever. Only the main thread can set handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe_checkpoint(ref: CheckpointRef) -> str:
    """``model_args`` naming a checkpoint (what ingestion reads run and step from).

    >>> describe_checkpoint(CheckpointRef("r", 8, "hf://EleutherAI/pythia-70m@step8"))
    'pretrained=EleutherAI/pythia-70m,revision=step8'
    """
    if ref.is_hub:
        repo_id, revisions = parse_location(ref.location)
        return f"pretrained={repo_id},revision={(revisions or ['main'])[0]}"
    return f"pretrained={Path(ref.location).resolve()},revision=step{ref.step}"


def results_dir(out: str | Path, ref: CheckpointRef) -> Path:
    """Where the results of one checkpoint go: ``OUT/<run>/step<N>/``."""
    return Path(out) / ref.run / f"step{ref.step}"


def _done_tasks(directory: Path) -> set[str]:
    done: set[str] = set()
    for file in directory.glob("results_*.json"):
        try:
            done |= set(json.loads(file.read_text()).get("results", {}))
        except (OSError, ValueError):
            continue  # a truncated file from an interrupted run: evaluate again
    return done


def run_harness(
    sources: str | Path | Iterable[str | Path] | Sequence[CheckpointRef],
    tasks: str | Sequence[str],
    out: str | Path,
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    steps: str | Iterable[int] | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> HarnessReport:
    """Evaluate every checkpoint of ``sources`` on ``tasks`` with lm-eval.

    ``limit`` caps the examples per task (a fraction when < 1, as in lm-eval).
    ``bootstrap_iters`` is lm-eval's bootstrap for stderrs of non-mean metrics
    (perplexity); lm-eval's own default (100,000) is slow on CPU.
    """
    from polymap.device import resolve_device

    lm_eval, EvaluationTracker, HFLM, TaskManager = _import_lm_eval()
    task_names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    task_names = [t for t in task_names if t]
    if not task_names:
        raise HarnessError("no tasks given")
    if isinstance(include_path, (str, Path)):
        include_path = [include_path]
    manager = TaskManager(include_path=[str(p) for p in include_path] if include_path else None)
    unknown = [t for t in task_names if t not in manager.all_tasks]
    if unknown:
        raise HarnessError(
            f"unknown lm-eval task(s) {unknown}; local tasks need --include-path DIR "
            "(a folder of task YAML files)"
        )
    dev = str(resolve_device(device))
    refs = as_refs(sources, steps)
    report = HarnessReport()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-example truncation warnings
    for ref in tqdm(refs, desc="lm-eval", unit="ckpt", disable=not progress):
        directory = results_dir(out, ref)
        if set(task_names) <= _done_tasks(directory):
            report.skipped += 1
            continue
        try:
            with materialize(ref) as local, _quiet_inner_bars(), _default_sigterm():
                lm = HFLM(pretrained=str(local), device=dev, batch_size=batch_size, dtype="float32")
                tracker = EvaluationTracker(output_path=str(directory / "results.json"))
                results = lm_eval.simple_evaluate(
                    model=lm,
                    model_args=describe_checkpoint(ref),
                    tasks=task_names,
                    num_fewshot=num_fewshot,
                    limit=limit,
                    bootstrap_iters=bootstrap_iters,
                    task_manager=manager,
                    evaluation_tracker=tracker,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                    log_samples=False,
                )
                if results is None:
                    raise HarnessError("lm-eval returned no results")
                tracker.save_results_aggregated(results=results, samples=None)
                del lm
        except (CheckpointError, HarnessError, OSError, ValueError, RuntimeError) as err:
            log.warning("%s: lm-eval failed: %s", ref, err)
            report.failed.append((str(ref), f"{type(err).__name__}: {err}"))
            continue
        report.written.extend(sorted(directory.glob("results_*.json"))[-1:])
    return report
