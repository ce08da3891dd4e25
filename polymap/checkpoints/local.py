"""Local checkpoint layouts: a runs directory, a single run, or a CSV manifest."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

from polymap.checkpoints.ref import HUB_SCHEME, CheckpointRef, RefError, parse_step
from polymap.errors import PolymapError

log = logging.getLogger(__name__)


class SourceError(PolymapError, ValueError):
    """A source that names no checkpoints, or cannot be parsed; says which and why."""


_SEED = re.compile(r"seed[_-]?(\d+)", re.IGNORECASE)


def _seed_from_name(run: str) -> int | None:
    match = _SEED.search(run)
    return int(match.group(1)) if match else None


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for child in directory.iterdir():
        try:
            step = parse_step(child.name)
        except RefError as err:  # e.g. step99999999999999999999: reported, not a crash
            log.warning("%s: skipped (%s)", child, err)
            continue
        if step is not None and child.is_dir():
            found.append((step, child))
    return sorted(found)


def discover_local(path: str | Path) -> list[CheckpointRef]:
    """Checkpoints under ``path``: ``ROOT/<run>/<step dir>/``, ``RUN/<step dir>/``, or a
    single ``<step dir>`` (its parent names the run).

    >>> discover_local("runs")                                   # doctest: +SKIP
    [CheckpointRef(run='seed0', step=0, location='runs/seed0/step0', seed=0, ...), ...]
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise SourceError(f"{path}: expected a directory of runs or checkpoints")
    own_step = parse_step(path.name)
    if own_step is not None and not _step_dirs(path):
        run = path.resolve().parent.name
        return [CheckpointRef(run, own_step, str(path), seed=_seed_from_name(run))]
    steps = _step_dirs(path)
    if steps:
        run = path.resolve().name
        return [CheckpointRef(run, s, str(d), seed=_seed_from_name(run)) for s, d in steps]
    refs = []
    for run_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        for step, ckpt in _step_dirs(run_dir):
            refs.append(
                CheckpointRef(run_dir.name, step, str(ckpt), seed=_seed_from_name(run_dir.name))
            )
    if not refs:
        raise SourceError(
            f"{path}: no checkpoint directories found (expected ROOT/<run>/step<N>/ or "
            "RUN/step<N>/; also checkpoint-<N>, global_step<N>, iter_<N>)"
        )
    return refs


def read_manifest(path: str | Path) -> list[CheckpointRef]:
    """Checkpoints listed in a CSV with columns ``run, step, path`` and optional
    ``seed, model, tokens``. Relative paths are relative to the manifest's folder;
    ``hf://ORG/NAME@REV`` locations are allowed.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SourceError(f"{path}: cannot read manifest ({err})") from err
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise SourceError(f"{path}: empty manifest")
    missing = {"run", "step", "path"} - set(rows[0])
    if missing:
        raise SourceError(f"{path}: manifest lacks column(s) {sorted(missing)}")
    refs = []
    for line, row in enumerate(rows, start=2):
        try:
            step = int(row["step"])
            seed = int(row["seed"]) if row.get("seed") not in (None, "") else None
            tokens = int(float(row["tokens"])) if row.get("tokens") not in (None, "") else None
        except ValueError as err:
            raise SourceError(f"{path}:{line}: {err}") from err
        location = row["path"]
        if not location.startswith(HUB_SCHEME) and not Path(location).is_absolute():
            location = str(path.parent / location)
        try:
            refs.append(
                CheckpointRef(row["run"], step, location, seed, row.get("model") or None, tokens)
            )
        except RefError as err:
            raise SourceError(f"{path}:{line}: {err}") from err
    return refs
