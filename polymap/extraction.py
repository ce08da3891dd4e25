"""``polymap.extract``: checkpoints in, one feature row per checkpoint out.

The path of one checkpoint, top to bottom:

1. :func:`~polymap.checkpoints.resolve_sources` turns sources into ``CheckpointRef`` s;
2. :func:`~polymap.checkpoints.materialize` gives a local directory (downloading hub
   checkpoints);
3. :class:`~polymap.checkpoints.TensorReader` streams its tensors one at a time;
4. :func:`~polymap.roles.assign_role` labels each (layer, role, kind);
5. every requested feature set sees each tensor as a shared :class:`Param`;
6. the row (keys, ``status``, ``error``, features) goes to the :class:`FeatureStore`.

A checkpoint that cannot be read becomes a ``failed`` row with its reason; one with
NaN/Inf weights a ``nonfinite`` row whose finite-safe features are still computed; the
sweep goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from polymap.atomic import atomic_file, write_json
from polymap.checkpoints import (
    CheckpointError,
    CheckpointRef,
    TensorReader,
    architecture_signature,
    as_refs,
    fingerprint,
    hub,
    materialize,
    open_checkpoint,
    read_config,
)
from polymap.checkpoints.prefetch import HubPrefetcher
from polymap.device import resolve_device
from polymap.errors import UsageError
from polymap.executors import DEFAULT_RETRIES, Executor, LocalExecutor, TaskFailed, get_executor
from polymap.features import (
    CheckpointContext,
    FeatureUnavailableError,
    Param,
    feature_sets,
    get_feature_sets,
)
from polymap.features.base import FeatureSet
from polymap.features.probe import ProbeSpec, build_probe, load_causal_lm, max_positions
from polymap.plugins import Registrations
from polymap.roles import assign_role, detect_architecture, is_known
from polymap.table import FeatureStore, normalize

log = logging.getLogger(__name__)
COMPACT_EVERY = 64


def _base_row(ref: CheckpointRef, sets: Sequence[type[FeatureSet]]) -> dict:
    return {
        "run": ref.run,
        "step": ref.step,
        "seed": ref.seed,
        "model": ref.model,
        "tokens": ref.tokens,
        "status": "ok",
        "error": None,
        "fingerprint": fingerprint(ref),
        "feature_sets": ",".join(s.name for s in sets),
        "architecture": None,
    }


def extract_checkpoint(
    ref: CheckpointRef,
    feature_sets: str | Sequence[str] | None = None,
    device: str | torch.device = "auto",
    initial: CheckpointRef | None = None,
    delete_after: bool = False,
    probe: ProbeSpec | None = None,
    final: CheckpointRef | None = None,
) -> dict:
    """Feature row of one checkpoint. Never raises for a bad checkpoint: the row's
    ``status`` and ``error`` say what went wrong.

    ``initial`` is the run's step-0 checkpoint (for ``weights.*.rel_dist``); ``probe``
    the probe batch of model-level sets such as ``evals_native``.

    >>> row = extract_checkpoint(CheckpointRef("r", 8, "runs/r/step8"))   # doctest: +SKIP
    >>> row["status"], row["hu2023.l2"]                                   # doctest: +SKIP
    ('ok', 3.41)
    """
    sets = get_feature_sets(feature_sets)
    dev = resolve_device(device)
    row = _base_row(ref, sets)
    warnings: list[str] = []
    try:
        with ExitStack() as stack:
            directory = stack.enter_context(materialize(ref, delete_after=delete_after))
            reader = stack.enter_context(open_checkpoint(directory))
            initial_reader = _open_other(stack, initial, ref, "step-0", warnings)
            final_reader = _open_other(stack, final, ref, "final", warnings)
            try:
                config = read_config(directory)
            except CheckpointError as err:
                config = None
                warnings.append(str(err))
            else:
                if config is None:
                    warnings.append(f"{directory}: config.json missing; architecture from names")
            row["architecture"] = architecture_signature(config)
            arch = detect_architecture(config, reader.names())
            model_type = (config or {}).get("model_type")
            if not is_known(arch):
                kind = model_type or "unrecognised names"
                warnings.append(f"unknown architecture ({kind}); roles by name heuristics")
            elif model_type and model_type not in arch.model_types:
                warnings.append(
                    f"unknown model_type {model_type!r}; roles from its {arch.name}-style "
                    "tensor names"
                )
            context = CheckpointContext(
                ref, config, arch, dev, initial_reader, final_reader, Path(directory),
                probe or ProbeSpec(),
            )  # fmt: skip
            features, nonfinite, set_warnings = _run_feature_sets(reader, context, sets)
            row.update(features)
            warnings.extend(set_warnings)
    except CheckpointError as err:
        row.update(status="failed", error=str(err))
        return row
    except Exception as err:  # a bug or an unexpected file: keep the sweep going
        log.exception("unexpected error extracting %s", ref)
        row.update(status="failed", error=f"{type(err).__name__}: {err}")
        return row
    infinite = [k for k, v in row.items() if isinstance(v, float) and math.isinf(v)]
    if nonfinite:
        row["status"] = "nonfinite"
        warnings.insert(0, f"{nonfinite} non-finite (NaN/Inf) weight entries")
    elif infinite:  # finite weights whose statistics overflow (x1e30): a diverged run too
        row["status"] = "nonfinite"
        warnings.insert(0, f"{len(infinite)} feature(s) overflow to infinity, e.g. {infinite[:3]}")
    elif warnings:
        row["status"] = "warning"
    row["error"] = "; ".join(warnings) or None
    return row


def _open_other(stack, other: CheckpointRef | None, ref: CheckpointRef, what: str, warnings):
    """A reader of the run's step-0 or final checkpoint (None if absent or unreadable)."""
    if other is None:
        return None
    try:
        return stack.enter_context(open_checkpoint(stack.enter_context(materialize(other))))
    except CheckpointError as err:
        warnings.append(f"{what} checkpoint unreadable, features comparing with it skipped ({err})")
        return None


def _run_feature_sets(
    reader: TensorReader, context: CheckpointContext, sets: Sequence[type[FeatureSet]]
) -> tuple[dict, int, list[str]]:
    """Stream every parameter through the feature sets, then run the model-level sets;
    returns (features, number of non-finite weight entries, warnings)."""
    instances = [cls(context) for cls in sets]
    arch, dev = context.architecture, context.device
    params = []
    for name in sorted(reader.names()):  # one order for every file layout
        role = assign_role(arch, name)
        if role.kind != "buffer":
            if math.prod(reader.shape(name)) == 0 and len(reader.shape(name)) > 0:
                raise CheckpointError(
                    f"{reader.directory}: tensor {name} is empty (shape {reader.shape(name)})"
                )
            params.append((name, role))
    order = max(s.moment_order for s in instances)
    nonfinite = 0
    for name, role, raw in _floating_tensors(reader, params):
        with _naming(reader, name, raw):
            param = Param(name, role, raw, dev, context.initial, order, context.final)
            for instance in instances:
                instance.add(param)
            nonfinite += param.nonfinite_count
        del param, raw
    again = [(n, r) for n, r in params if any(s.wants_again(n) for s in instances)]
    for name, role, raw in _floating_tensors(reader, again):
        with _naming(reader, name, raw):
            param = Param(name, role, raw, dev, context.initial, order, context.final)
            for instance in instances:
                if instance.wants_again(name):
                    instance.add_again(param)
    warnings = _run_model_sets([s for s in instances if s.needs_model], context)
    out: dict = {}
    for instance in instances:
        out.update(instance.finish())
        warnings.extend(instance.warnings)
    return out, nonfinite, warnings


@contextlib.contextmanager
def _naming(reader: TensorReader, name: str, raw: torch.Tensor):
    """A tensor the feature sets cannot handle (empty, a scalar where a matrix is
    expected, ...) becomes a CheckpointError naming the checkpoint and the tensor."""
    try:
        yield
    except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as err:
        raise CheckpointError(
            f"{reader.directory}: tensor {name} of shape {tuple(raw.shape)}: "
            f"{type(err).__name__}: {err}"
        ) from err


def _run_model_sets(instances: list[FeatureSet], context: CheckpointContext) -> list[str]:
    """Load the checkpoint as a model once and give it to every model-level set."""
    if not instances:
        return []
    names = ",".join(s.name for s in instances)
    try:
        probe = build_probe(context.probe, context.directory, max_positions(context.config))
        model = load_causal_lm(context.directory, context.device)
    except FeatureUnavailableError as err:
        return [f"{names}: {err}"]
    except Exception as err:  # transformers cannot build this model: keep the weight features
        return [f"{names}: cannot load the model ({type(err).__name__}: {err})"]
    warnings = [f"{names}: {probe.warning}"] if probe.warning else []
    for instance in instances:
        try:
            instance.add_model(model, probe)
        except FeatureUnavailableError as err:
            warnings.append(f"{instance.name}: {err}")
    del model
    return warnings


def _floating_tensors(reader: TensorReader, params: list) -> Iterator[tuple]:
    """``(name, role, tensor)`` for the floating-point tensors, read one at a time."""
    for name, role in params:
        raw = reader.get(name)
        if raw.is_floating_point():
            yield name, role, raw


def save_probe(spec: ProbeSpec, refs: Sequence[CheckpointRef], table: Path) -> Path | None:
    """Write the probe batch next to the table (``<table>.probe.npy`` + ``.probe.json``)
    for reproducibility: the token ids of the first local checkpoint's tokenizer (every
    run of a suite shares it) and the spec that made them."""

    import numpy as np

    local = next((r for r in refs if not r.is_hub), None)
    if local is None:
        return None
    try:
        probe = build_probe(spec, Path(local.location))
    except FeatureUnavailableError as err:
        log.info("probe not saved: %s", err)
        return None
    npy = table.with_name(table.name + ".probe.npy")
    with atomic_file(npy) as tmp:  # all rows; statistics use the first `sequences`
        np.save(tmp, probe.eval_ids.numpy())
    meta = {
        "spec": dataclasses.asdict(spec),
        "digest": probe.digest,
        "tokenizer_of": local.location,
        "shape": list(probe.eval_ids.shape),
    }
    write_json(table.with_name(table.name + ".probe.json"), meta)
    return npy


def _with_prefetch(tasks: list[tuple], prefetch: HubPrefetcher | None) -> Iterator[tuple]:
    """Tasks in order, each hub checkpoint's download awaited (and started ahead)."""
    for task in tasks:
        if prefetch is not None:
            prefetch.wait(task[0])
        yield task


def extract_task(
    ref: CheckpointRef,
    names,
    device,
    initial,
    delete_after,
    probe,
    final,
    registrations: Registrations | None,
) -> dict:
    """One executor task: :func:`extract_checkpoint` in a worker that first learns the
    driver's own registrations (:mod:`polymap.plugins`)."""
    if registrations is not None:
        registrations.install()
    return extract_checkpoint(ref, names, device, initial, delete_after, probe, final)


def _probe_changed(table: Path, spec: ProbeSpec) -> bool:
    """Whether the probe saved next to ``table`` was made with another spec (rows of
    model-level sets computed on other tokens must not be mixed with new ones)."""
    meta = table.with_name(table.name + ".probe.json")
    if not meta.exists():
        return False
    try:
        saved = json.loads(meta.read_text()).get("spec", {})
    except (OSError, ValueError, AttributeError):
        return True
    current = dataclasses.asdict(spec)
    keys = ("sequences", "eval_sequences", "length", "tokens", "text")  # not batch_size
    return any(saved.get(key) != current[key] for key in keys)


def _pending(
    refs: Sequence[CheckpointRef],
    existing: pd.DataFrame,
    wanted: Sequence[str],
    stale: set[str] = frozenset(),
) -> list[CheckpointRef]:
    done = {}
    for rec in existing[["run", "step", "fingerprint", "feature_sets", "status"]].itertuples():
        done[(rec.run, rec.step)] = rec
    todo = []
    for ref in refs:
        rec = done.get((ref.run, ref.step))
        if rec is not None and rec.status != "failed" and rec.fingerprint == fingerprint(ref):
            have = set(str(rec.feature_sets or "").split(",")) - stale
            if set(wanted) <= have:
                continue
        todo.append(ref)
    return todo


def _merge_with_previous(row: dict, existing: pd.DataFrame) -> dict:
    """Keep feature sets computed earlier for the same file content."""
    match = existing[(existing["run"] == row["run"]) & (existing["step"] == row["step"])]
    if match.empty or match.iloc[0]["fingerprint"] != row["fingerprint"]:
        return row
    old = match.iloc[0].to_dict()
    if old.get("status") == "failed":
        return row
    merged = {k: v for k, v in old.items() if "." in k and not _isnan(v)}
    merged.update(row)
    sets = dict.fromkeys(
        str(old.get("feature_sets") or "").split(",") + row["feature_sets"].split(",")
    )
    merged["feature_sets"] = ",".join(s for s in sets if s)
    return merged


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def extract(
    sources: str | Path | Iterable[str | Path] | Sequence[CheckpointRef],
    out: str | Path | None = None,
    features: str | Sequence[str] | None = None,
    steps: str | Iterable[int] | None = None,
    device: str = "auto",
    jobs: int = 1,
    delete_after: bool = False,
    progress: bool = True,
    probe: ProbeSpec | None = None,
    executor: str | Executor | None = None,
    address: str | None = None,
    gpus_per_task: float = 0,
    retries: int = DEFAULT_RETRIES,
    max_on_disk: int = 2,
) -> pd.DataFrame:
    """Extract feature rows for every checkpoint in ``sources``.

    With ``out``, rows are appended to that Parquet FeatureTable as they finish,
    checkpoints already there (same run, step and fingerprint, with these feature sets)
    are skipped, and the whole table is returned. Without ``out`` only the new rows are
    returned.

    ``executor``: ``local`` (this process), ``process`` (``jobs`` worker processes) or
    ``ray`` (one Ray task per checkpoint, ``address`` of the cluster, ``gpus_per_task``);
    default ``process`` when ``jobs > 1``. A checkpoint whose worker dies is retried
    ``retries`` times, then recorded as ``failed``. Hub checkpoints are downloaded ahead
    by the local executor with at most ``max_on_disk`` on disk (use ``delete_after``).

    Examples
    --------
    >>> import polymap
    >>> df = polymap.extract("runs/", out="features.parquet", features="hu2023")  # doctest: +SKIP
    >>> df[["run", "step", "hu2023.lambda_max"]].head()                          # doctest: +SKIP
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"jobs={jobs!r}: must be an integer >= 1")
    sets = get_feature_sets(features)
    names = [s.name for s in sets]
    resolve_device(device)  # fail fast on a bad device
    refs = as_refs(sources, steps)
    # the run's step-0 checkpoint, for the sets that compare with it; with delete_after it
    # stays on disk until the sweep ends (one extra checkpoint per run)
    needs_initial = any(s.needs_initial for s in sets)
    initial_of = {r.run: r for r in refs if r.step == 0} if needs_initial else {}
    # the run's last checkpoint (its latest in this sweep) for sets that compare with it
    needs_final = any(s.needs_final for s in sets)
    final_of = {}
    if needs_final:
        for r in refs:
            if r.run not in final_of or r.step > final_of[r.run].step:
                final_of[r.run] = r
    keep = set(initial_of.values()) | set(final_of.values()) if delete_after else set()
    store = FeatureStore(out) if out is not None else None
    rows: list[dict] = []
    with ExitStack() as stack:
        existing = normalize(pd.DataFrame(columns=["run", "step"]))
        if store is not None:
            stack.enter_context(store)
            existing = store.compact() if store.path.exists() or store.parts.exists() else existing
        stale = set()
        if store is not None and _probe_changed(store.path, probe or ProbeSpec()):
            # every model-level set of the table is recomputed on the new probe, the ones
            # this sweep did not ask for included: no table mixes two probes
            present = {n for v in existing["feature_sets"].dropna() for n in str(v).split(",")}
            model_level = {n for n, cls in feature_sets().items() if cls.needs_model}
            stale = (present | set(names)) & model_level
            extra = sorted(stale - set(names))
            sets, names = sets + get_feature_sets(extra) if extra else sets, names + extra
            if stale and len(existing):
                log.warning(
                    "%s was extracted with another probe batch (%s.probe.json): %s are "
                    "re-extracted for its checkpoints", out, store.path.name, sorted(stale)
                )  # fmt: skip
        todo = _pending(refs, existing, names, stale)
        skipped = len(refs) - len(todo)
        if skipped:
            log.info("%d checkpoint(s) already in %s, skipped", skipped, out)
        bar = stack.enter_context(
            tqdm(total=len(todo), desc="extract", unit="ckpt", disable=not progress)
        )
        started = time.perf_counter()

        def finished(row: dict) -> None:
            if store is not None:
                row = _merge_with_previous(row, existing)
                store.append(row)
                if len(rows) % COMPACT_EVERY == COMPACT_EVERY - 1:
                    store.compact()
            rows.append(row)
            bar.set_postfix_str(f"{row['run']}@{row['step']} {row['status']}")
            bar.update()

        shipped = Registrations.current()  # the user's own feature sets / architectures
        tasks = [
            (ref, names, device, initial_of.get(ref.run), delete_after and ref not in keep, probe,
             final_of.get(ref.run), shipped)
            for ref in todo
        ]  # fmt: skip
        if executor is None:
            executor = "process" if jobs > 1 and len(todo) > 1 else "local"
        if isinstance(executor, str):
            executor = get_executor(executor, jobs=jobs, address=address,
                                    gpus_per_task=gpus_per_task, retries=retries)  # fmt: skip
        prefetch = None
        if isinstance(executor, LocalExecutor) and any(r.is_hub for r in todo):
            prefetch = stack.enter_context(HubPrefetcher(todo, max_on_disk=max_on_disk))
        stack.enter_context(executor)
        for task, result in executor.run(extract_task, _with_prefetch(tasks, prefetch)):
            if isinstance(result, TaskFailed):
                result = _base_row(task[0], sets) | {"status": "failed", "error": result.reason}
            if prefetch is not None:
                prefetch.release(task[0])
            finished(result)
        for ref in keep:
            if ref.is_hub:
                with contextlib.suppress(CheckpointError):
                    hub.release(hub.fetch(ref))
        log.info("extracted %d checkpoint(s) in %.1fs", len(rows), time.perf_counter() - started)
        if store is not None:
            if any(s.needs_model for s in sets):
                save_probe(probe or ProbeSpec(), refs, store.path)
            return store.compact()
    return (
        normalize(pd.DataFrame(rows)) if rows else normalize(pd.DataFrame(columns=["run", "step"]))
    )
