"""Read lm-evaluation-harness results JSON into a FeatureTable of ``eval.*`` columns.

Two layouts are found in the wild, and both are read:

* the 0.3-era format of the published Pythia evaluations: ``results`` ->
  ``{task: {"acc": ..., "acc_stderr": ...}}``, ``config.model_args`` like
  ``pretrained=EleutherAI/pythia-v1.1-160m,revision=step13000`` and
  ``config.num_fewshot``; files laid out as ``<run>/<zero-shot|five-shot>/<x>_step<N>.json``;
* the 0.4 format: ``results`` -> ``{task: {"acc,none": ..., "acc_stderr,none": ... | "N/A",
  "alias": ...}}``, ``n-shot`` per task, ``date``, written as ``results_<timestamp>.json``.

Where (run, step) come from, first found wins:

1. a manifest (CSV ``path,run,step``; paths relative to the manifest's folder);
2. the file's own ``config.model_args``: ``revision=step<N>`` or a ``pretrained`` path
   whose last part is a checkpoint directory (``.../<run>/step<N>``); the run is the
   repository name (``EleutherAI/pythia-160m`` -> ``pythia-160m``) or that parent folder.
   Pythia's pre-rename names ``pythia-v1.1-<size>`` are read as today's ``pythia-<size>``;
3. the directory layout: a ``_step<N>`` file name or a ``step<N>`` folder, and the run
   folder above any ``zero-shot`` / ``five-shot`` / ``<k>-shot`` folder.

Columns are ``eval.<task>.<metric>`` for zero-shot results and
``eval.<k>shot.<task>.<metric>`` for k-shot ones (the prefix is always kept for k > 0,
so a column means the same thing whatever else was ingested). A metric computed under a
non-default lm-eval filter is ``<metric>@<filter>``. Standard errors become
``..._stderr`` columns (kept by default: measurement noise is data - the phase
model's noise rule, the labels' noise floor and the scorer's floors use them;
``stderr=False`` drops them). When two files give the same (run, step,
shots, task), the one with the latest timestamp (``date`` field, the timestamp in the
file name, else the file's modification time) wins and the choice is reported.

>>> table, report = ingest(["pythia-v1/"])                       # doctest: +SKIP
>>> table.loc[0, "eval.lambada_openai.acc"]                      # doctest: +SKIP
0.3287
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from polymap.checkpoints.local import SourceError
from polymap.checkpoints.local import read_manifest as read_checkpoint_manifest
from polymap.checkpoints.ref import RefError, check_run, check_step, parse_step, run_name
from polymap.errors import PolymapError
from polymap.table import normalize

FEATURE_SET = "eval"
# Keys of a task's result entry that are bookkeeping, not metrics.
_NOT_METRICS = {"alias", "name", "sample_len", "sample_count", "samples", "group", "task"}
_SHOT_DIR = re.compile(r"^(zero|one|two|three|four|five|ten|\d+)[-_]?shots?$", re.IGNORECASE)
_STEP_IN_NAME = re.compile(r"(?:^|[_-])step[_-]?(\d+)$")
_TIMESTAMP_IN_NAME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}[-:]\d{2}[-:]\d{2}(?:\.\d+)?)")
_SEED = re.compile(r"seed[_-]?(\d+)", re.IGNORECASE)


@dataclass
class EvalRecord:
    """The scores of one results file: ``values[(shots, task)] = {column_suffix: value}``."""

    path: Path
    run: str
    step: int
    model: str | None
    timestamp: float
    values: dict[tuple[int, str], dict[str, float]] = field(default_factory=dict)


@dataclass
class IngestReport:
    """What :func:`ingest` read, skipped and decided."""

    files: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    duplicates: list[str] = field(default_factory=list)  # one line per resolved clash

    @property
    def ok(self) -> bool:
        return not self.problems


class EvalFileError(PolymapError, ValueError):
    """A results file that cannot be used; the message names the file and the reason."""


def parse_model_args(model_args: str | dict | None) -> dict[str, str]:
    """``"pretrained=X,revision=step1"`` -> ``{"pretrained": "X", "revision": "step1"}``.

    >>> parse_model_args("use_accelerate=True,pretrained=EleutherAI/pythia-70m,revision=step8")
    {'use_accelerate': 'True', 'pretrained': 'EleutherAI/pythia-70m', 'revision': 'step8'}
    """
    if isinstance(model_args, dict):
        return {str(k): str(v) for k, v in model_args.items()}
    out = {}
    for part in (model_args or "").split(","):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


_HUB_CACHE_DIR = re.compile(r"models--([^/]+?)--([^/]+)")


def _from_config(data: dict) -> tuple[str | None, int | None, str | None]:
    """(run, step, model) from ``config.model_args`` (string or dict), then lm-eval 0.4's
    ``config.model_revision`` and top-level ``model_name``."""
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    args = parse_model_args(config.get("model_args"))
    pretrained = args.get("pretrained") or args.get("model") or args.get("path")
    if not pretrained and isinstance(data.get("model_name"), str) and data["model_name"]:
        pretrained = data["model_name"]
    revision = args.get("revision") or config.get("model_revision") or ""
    step = parse_step(str(revision)) if revision else None
    run = None
    if pretrained:
        parts = [p for p in pretrained.rstrip("/").split("/") if p]
        leaf_step = parse_step(parts[-1]) if parts else None
        cached = _HUB_CACHE_DIR.search(pretrained)
        if cached:  # a snapshot folder of the Hugging Face cache: the repository's name
            run = run_name(cached.group(2))
        elif leaf_step is not None:
            step = step if step is not None else leaf_step
            run = parts[-2] if len(parts) >= 2 else None
        else:
            run = run_name(pretrained)
    return run, step, pretrained


def _from_layout(path: Path) -> tuple[str | None, int | None]:
    match = _STEP_IN_NAME.search(path.stem)
    step = int(match.group(1)) if match else None
    for parent in path.parents:
        parent_step = parse_step(parent.name)
        if parent_step is not None:
            step = parent_step if step is None else step
        elif not _SHOT_DIR.match(parent.name):
            return run_name(parent.name) if parent.name else None, step
    return None, step


def _timestamp(path: Path, data: dict) -> float:
    date = data.get("date")
    if isinstance(date, (int, float)) and not isinstance(date, bool):
        try:
            value = float(date)
        except OverflowError:  # a 400-digit "date"
            value = math.nan
        if math.isfinite(value):
            return value
    match = _TIMESTAMP_IN_NAME.search(path.name)
    if match:
        text = match.group(1)
        day, _, clock = text.partition("T")
        try:
            parsed = datetime.fromisoformat(f"{day}T{clock.replace('-', ':')}")
            return parsed.replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            pass
    return path.stat().st_mtime


def _number(value, what: str) -> float:
    if isinstance(value, bool) or value is None:
        raise EvalFileError(f"{what}: unknown metric shape {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        if value.strip().upper() in ("N/A", "NA", "NAN", ""):
            return float("nan")
        try:
            return float(value)
        except ValueError:
            raise EvalFileError(f"{what}: not a number ({value!r})") from None
    raise EvalFileError(f"{what}: unknown metric shape ({type(value).__name__})")


def _metric_suffix(key: str) -> tuple[str, bool]:
    """``"acc_stderr,none"`` -> (``"acc"``, True); ``"em,strict"`` -> (``"em@strict"``, False)."""
    metric, _, filt = key.partition(",")
    is_stderr = metric.endswith("_stderr")
    if is_stderr:
        metric = metric[: -len("_stderr")]
    if filt and filt != "none":
        metric = f"{metric}@{filt}"
    return metric, is_stderr


def _shots(data: dict, task: str) -> int:
    n_shot = data.get("n-shot")
    if isinstance(n_shot, dict) and isinstance(n_shot.get(task), (int, float)):
        return int(n_shot[task])
    task_config = (data.get("configs") or {}).get(task) or {}
    if isinstance(task_config.get("num_fewshot"), (int, float)):
        return int(task_config["num_fewshot"])
    shots = (data.get("config") or {}).get("num_fewshot")
    return int(shots) if isinstance(shots, (int, float)) else 0


def read_results_file(
    path: str | Path,
    run: str | None = None,
    step: int | None = None,
    stderr: bool = False,
    problems: list[tuple[str, str]] | None = None,
) -> EvalRecord:
    """One results file as an :class:`EvalRecord`; raises :class:`EvalFileError`.

    ``run``/``step`` override what the file and its path say. Individual metrics that
    cannot be read are skipped and appended to ``problems`` as ``(file, reason)``.
    """
    path = Path(path)
    try:
        return _read_results_file(path, run, step, stderr, problems)
    except EvalFileError:
        raise
    except RefError as err:  # a run name or step polymap cannot store
        raise EvalFileError(f"{path}: {err}") from err
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError, RecursionError) as err:
        # the schema check below should have caught it: still one skipped file, not an abort
        raise EvalFileError(f"{path}: unreadable structure ({type(err).__name__}: {err})") from err


def check_schema(path: Path, data) -> None:
    """The parts of an lm-eval results document polymap reads, type by type; raises
    :class:`EvalFileError` naming the field."""

    def fail(name: str, value, expected: str):
        raise EvalFileError(f"{path}: {name} is {_describe(value)}, expected {expected}")

    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise EvalFileError(f"{path}: no 'results' object; not an lm-eval results file")
    for key in ("config", "configs", "n-shot", "groups"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            fail(f"'{key}'", data[key], "an object")
    config = data.get("config") or {}
    if config.get("model_args") is not None and not isinstance(config["model_args"], (str, dict)):
        fail("'config.model_args'", config["model_args"], "a string or an object")
    for key in ("model_revision",):
        if config.get(key) is not None and not isinstance(config[key], str):
            fail(f"'config.{key}'", config[key], "a string")
    if data.get("model_name") is not None and not isinstance(data["model_name"], str):
        fail("'model_name'", data["model_name"], "a string")
    shots = [("config.num_fewshot", config.get("num_fewshot"))]
    shots += [(f"n-shot.{t}", v) for t, v in (data.get("n-shot") or {}).items()]
    for task, task_config in (data.get("configs") or {}).items():
        if task_config is not None and not isinstance(task_config, dict):
            fail(f"'configs.{task}'", task_config, "an object")
        shots.append((f"configs.{task}.num_fewshot", (task_config or {}).get("num_fewshot")))
    for name, value in shots:
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if not (isinstance(value, str) and value.strip().isdigit()):
                fail(f"'{name}'", value, "a number of shots")
            continue
        if not math.isfinite(value) or value < 0 or value != int(value) or value > 10**6:
            fail(f"'{name}'", value, "a whole number of shots (0 .. 1e6)")
    date = data.get("date")
    if date is not None and not isinstance(date, (str, int, float)) or isinstance(date, bool):
        fail("'date'", date, "a number or a string")


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _read_results_file(path, run, step, stderr, problems) -> EvalRecord:
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not an error
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as err:
        raise EvalFileError(f"{path}: cannot read ({err})") from err
    except json.JSONDecodeError as err:
        raise EvalFileError(f"{path}: not valid JSON, truncated? ({err})") from err
    except RecursionError:
        raise EvalFileError(f"{path}: JSON nested too deeply to be a results file") from None
    check_schema(path, data)
    conf_run, conf_step, pretrained = _from_config(data)
    lay_run, lay_step = _from_layout(path)
    run = run or conf_run or lay_run
    step = step if step is not None else conf_step if conf_step is not None else lay_step
    if run is None or step is None:
        missing = " and ".join(w for w, v in (("run", run), ("step", step)) if v is None)
        raise EvalFileError(
            f"{path}: no {missing} information (config.model_args has no revision=step<N> "
            "or checkpoint path, the path has no <run>/.../step<N>); give a manifest"
        )
    try:
        run, step = check_run(run), check_step(int(step))
    except RefError as err:
        raise EvalFileError(f"{path}: {err}") from err
    record = EvalRecord(path, run, step, pretrained, _timestamp(path, data))
    entries = dict(data["results"])
    if isinstance(data.get("groups"), dict):  # lm-eval 0.4.0-0.4.2 kept group scores apart
        for group, entry in data["groups"].items():
            entries.setdefault(group, entry)
    for task, entry in entries.items():
        if not isinstance(entry, dict):
            if problems is not None:
                problems.append((str(path), f"task {task!r}: unknown result shape, skipped"))
            continue
        values: dict[str, float] = {}
        for key, value in entry.items():
            if key in _NOT_METRICS or key.startswith(" "):
                continue
            metric, is_stderr = _metric_suffix(key)
            if is_stderr and not stderr:
                continue
            try:
                number = _number(value, f"task {task!r} metric {key!r}")
                if math.isinf(number):  # 1e999, Infinity: not a score (NaN = "N/A" is kept)
                    raise EvalFileError(f"task {task!r} metric {key!r}: not finite ({value!r})")
            except EvalFileError as err:
                if problems is not None:
                    problems.append((str(path), f"{err}, skipped"))
                continue
            values[f"{metric}_stderr" if is_stderr else metric] = number
        if values:
            record.values[(_shots(data, task), str(task))] = values
    if not record.values:
        raise EvalFileError(f"{path}: no numeric metrics in 'results'")
    return record


def column_name(shots: int, task: str, metric: str) -> str:
    """``eval.<task>.<metric>`` or ``eval.<k>shot.<task>.<metric>``.

    >>> column_name(0, "piqa", "acc"), column_name(5, "piqa", "acc_norm")
    ('eval.piqa.acc', 'eval.5shot.piqa.acc_norm')
    """
    prefix = FEATURE_SET if shots == 0 else f"{FEATURE_SET}.{shots}shot"
    return f"{prefix}.{task}.{metric}"


def read_manifest(path: str | Path) -> dict[Path, tuple[str, int]]:
    """CSV ``path,run,step`` -> ``{resolved path: (run, step)}``: the checkpoint
    manifest's format and checks (:func:`polymap.checkpoints.local.read_manifest`), its
    ``path`` column naming results files instead of checkpoints."""
    try:
        refs = read_checkpoint_manifest(path)
    except SourceError as err:
        raise EvalFileError(str(err)) from None
    return {Path(ref.location).resolve(): (ref.run, ref.step) for ref in refs}


def find_results_files(paths: Iterable[str | Path]) -> list[Path]:
    """JSON files under the given files/folders (sorted; lm-eval's ``samples_*`` skipped)."""
    found: list[Path] = []
    for item in paths:
        item = Path(item)
        if item.is_dir():
            found.extend(
                p for p in sorted(item.rglob("*.json")) if not p.name.startswith("samples_")
            )
        elif item.exists():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    return list(dict.fromkeys(found))


def ingest(
    paths: str | Path | Iterable[str | Path],
    manifest: str | Path | None = None,
    stderr: bool = True,
) -> tuple[pd.DataFrame, IngestReport]:
    """Read every results file under ``paths`` into one FeatureTable (one row per run and
    step, ``eval.*`` columns) and an :class:`IngestReport` of problems and duplicates.

    Files that cannot be used are reported and skipped; the rest are kept.

    >>> table, report = ingest("lm-eval-out/")                     # doctest: +SKIP
    >>> report.problems                                            # doctest: +SKIP
    [('lm-eval-out/bad.json', 'not valid JSON, truncated? (...)')]
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = find_results_files(paths)
    known = read_manifest(manifest) if manifest is not None else {}
    report = IngestReport(files=len(files))
    chosen: dict[tuple[str, int, int, str], EvalRecord] = {}
    models: dict[tuple[str, int], str | None] = {}
    digests: dict[tuple[str, int], list[str]] = {}
    for file in files:
        try:
            run, step = known.get(file.resolve(), (None, None)) if known else (None, None)
            record = read_results_file(file, run, step, stderr, report.problems)
            digest = hashlib.sha1(file.read_bytes()).hexdigest()[:12]
        except EvalFileError as err:
            report.problems.append((str(file), str(err).removeprefix(f"{file}: ")))
            continue
        except (OSError, RuntimeError) as err:  # RuntimeError: pathlib's "Symlink loop"
            report.problems.append((str(file), f"cannot read ({err})"))
            continue
        key = (record.run, record.step)
        models.setdefault(key, record.model)
        digests.setdefault(key, []).append(digest)
        for shots, task in record.values:
            slot = (record.run, record.step, shots, task)
            previous = chosen.get(slot)
            if previous is None:
                chosen[slot] = record
                continue
            newer, older = (
                (record, previous) if record.timestamp >= previous.timestamp else (previous, record)
            )
            chosen[slot] = newer
            report.duplicates.append(
                f"{record.run}@step{record.step} {task} ({shots}-shot): kept {newer.path} "
                f"(newer), ignored {older.path}"
            )
    rows: dict[tuple[str, int], dict] = {}
    for (run, step, shots, task), record in chosen.items():
        row = rows.setdefault((run, step), _base_row(run, step, models.get((run, step))))
        for metric, value in record.values[(shots, task)].items():
            row[column_name(shots, task, metric)] = value
    for key, row in rows.items():
        row["fingerprint"] = "+".join(sorted(digests.get(key, [])))[:64]
    if not rows:
        return normalize(pd.DataFrame(columns=["run", "step"])), report
    table = normalize(pd.DataFrame(list(rows.values())))
    columns = [c for c in table.columns if not c.startswith(f"{FEATURE_SET}.")]
    table = table[columns + sorted(c for c in table.columns if c not in columns)]
    # .copy() consolidates the column blocks (else adding a column warns "fragmented")
    return table.sort_values(["run", "step"], ignore_index=True).copy(), report


def _base_row(run: str, step: int, model: str | None) -> dict:
    seed = _SEED.search(run)
    return {
        "run": run,
        "step": step,
        "seed": int(seed.group(1)) if seed else None,
        "model": model,
        "status": "ok",
        "feature_sets": FEATURE_SET,
    }
