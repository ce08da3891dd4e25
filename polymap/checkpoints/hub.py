"""Checkpoints on the Hugging Face Hub: ``hf://ORG/NAME[@REV[,REV...]]``.

Only what extraction needs is downloaded (``config.json`` and the weights in the best
available format), through ``huggingface_hub`` so its cache, ``HF_HUB_CACHE``/``HF_HOME``
and ``HF_HUB_OFFLINE`` are honoured. Each revision whose name carries a step
(``step1000``) is one checkpoint. Without explicit revisions, Pythia/PolyPythias repos use
the catalogue's 154-step schedule; other repos list their branches (or, offline, the
revisions present in the local cache).

:func:`release` deletes a downloaded revision from the cache again (``--delete-after``),
so a sweep's disk use stays bounded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, scan_cache_dir
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

from polymap.checkpoints.local import SourceError
from polymap.checkpoints.pythia import parse_pythia_repo, pythia_steps
from polymap.checkpoints.reader import BIN_INDEX, SAFETENSORS_INDEX, CheckpointError, _read_index
from polymap.checkpoints.ref import HUB_SCHEME, CheckpointRef, RefError, parse_step, run_name

log = logging.getLogger(__name__)


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it only at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The hub cache in force now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def parse_location(location: str) -> tuple[str, list[str] | None]:
    """``hf://ORG/NAME@a,b`` -> ``("ORG/NAME", ["a", "b"])``; no ``@`` -> revisions None.

    >>> parse_location("hf://EleutherAI/pythia-70m@step1000")
    ('EleutherAI/pythia-70m', ['step1000'])
    """
    if not location.startswith(HUB_SCHEME):
        raise SourceError(f"{location}: not a hub location (expected hf://ORG/NAME[@REV])")
    body = location[len(HUB_SCHEME) :]
    repo, _, revs = body.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise SourceError(f"{location}: repository must be ORG/NAME")
    revisions = [r for r in revs.split(",") if r] if revs else None
    return repo, revisions


def _cached_revisions(repo_id: str) -> list[str]:
    refs = cache_dir() / f"models--{repo_id.replace('/', '--')}" / "refs"
    return sorted(p.name for p in refs.iterdir()) if refs.is_dir() else []


def _listed_revisions(repo_id: str) -> list[str]:
    if is_offline():
        return _cached_revisions(repo_id)
    from huggingface_hub import HfApi

    try:
        return [b.name for b in HfApi().list_repo_refs(repo_id).branches]
    except (HfHubHTTPError, OSError) as err:
        raise SourceError(f"hf://{repo_id}: cannot list revisions ({err})") from err


def _step_or_none(revision: str) -> int | None:
    try:
        return parse_step(revision)
    except RefError:
        return None


def discover_hub(location: str) -> list[CheckpointRef]:
    """One :class:`CheckpointRef` per step revision of ``hf://ORG/NAME[@REVS]``."""
    repo_id, revisions = parse_location(location)
    info = parse_pythia_repo(repo_id) or {}
    if revisions is None:
        if info:
            revisions = [f"step{s}" for s in pythia_steps()]
        else:
            revisions = [r for r in _listed_revisions(repo_id) if _step_or_none(r) is not None]
            if not revisions:
                raise SourceError(
                    f"{location}: no step revisions found (name them: hf://{repo_id}@step1000)"
                )
    refs = []
    for revision in revisions:
        try:
            step = parse_step(revision)
        except RefError as err:
            raise SourceError(f"{location}: {err}") from err
        if step is None:
            raise SourceError(f"{location}: revision {revision!r} carries no step")
        refs.append(
            CheckpointRef(
                run=run_name(repo_id),
                step=step,
                location=f"{HUB_SCHEME}{repo_id}@{revision}",
                seed=info.get("seed"),
                model=info.get("model"),
            )
        )
    return refs


def _download(repo_id: str, revision: str, filename: str) -> Path:
    return Path(
        hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir(),
            local_files_only=is_offline(),
        )
    )


def fetch(ref: CheckpointRef) -> Path:
    """Download (or find in the cache) config and weights of a hub checkpoint; return
    the snapshot directory that holds them."""
    repo_id, revisions = parse_location(ref.location)
    revision = revisions[0] if revisions else "main"
    where = f"{ref.location}"
    try:
        config = _download(repo_id, revision, "config.json")
    except EntryNotFoundError as err:
        hint = " (HF_HUB_OFFLINE is set and it is not in the cache)" if is_offline() else ""
        raise CheckpointError(f"{where}: config.json not available{hint}") from err
    except HfHubHTTPError as err:
        raise CheckpointError(f"{where}: {err}") from err
    snapshot = config.parent
    for filename in ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", BIN_INDEX):
        try:
            path = _download(repo_id, revision, filename)
        except EntryNotFoundError:
            continue
        except HfHubHTTPError as err:
            raise CheckpointError(f"{where}: {filename}: {err}") from err
        if filename in (SAFETENSORS_INDEX, BIN_INDEX):
            for shard in sorted(set(_read_index(path).values())):
                try:
                    _download(repo_id, revision, shard)
                except (EntryNotFoundError, HfHubHTTPError) as err:
                    raise CheckpointError(f"{where}: shard {shard}: {err}") from err
        return snapshot
    hint = " in the local cache (HF_HUB_OFFLINE is set)" if is_offline() else ""
    raise CheckpointError(f"{where}: no weights found{hint}")


def fingerprint(ref: CheckpointRef) -> str:
    """Hub checkpoints are identified by repository and revision (Pythia's step
    branches are immutable), so a re-run can skip them without downloading."""
    return ref.location


def release(snapshot: Path) -> int:
    """Delete one downloaded revision from the hub cache; returns bytes freed."""
    snapshot = Path(snapshot)
    commit = snapshot.name
    try:
        info = scan_cache_dir(cache_dir())
    except (OSError, ValueError) as err:
        log.warning("cannot scan hub cache to delete %s: %s", snapshot, err)
        return 0
    strategy = info.delete_revisions(commit)
    freed = strategy.expected_freed_size
    strategy.execute()
    return freed
