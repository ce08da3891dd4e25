"""Resolve what the user typed into checkpoint references, and make a reference readable.

Sources: a local runs directory, a single run or checkpoint directory, a CSV manifest
(``*.csv``), ``hf://ORG/NAME[@REV,...]``, ``pythia:SIZE`` (the original run) and
``polypythias:SIZE[:SEEDS]`` (seeds 0-9 by default).

>>> [r.location for r in resolve_sources(["polypythias:410m:3,4"], steps="0,1000")]
['hf://EleutherAI/pythia-410m-seed3@step0', 'hf://EleutherAI/pythia-410m-seed3@step1000', \
'hf://EleutherAI/pythia-410m-seed4@step0', 'hf://EleutherAI/pythia-410m-seed4@step1000']
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from polymap.checkpoints import hub
from polymap.checkpoints.dcp import METADATA, dcp_directory
from polymap.checkpoints.local import SourceError, discover_local, read_manifest
from polymap.checkpoints.pythia import (
    POLYPYTHIA_SEEDS,
    polypythias_repos,
    pythia_eval_steps,
    pythia_repo,
)
from polymap.checkpoints.reader import CheckpointError, weight_files
from polymap.checkpoints.ref import HUB_SCHEME, CheckpointRef
from polymap.errors import UsageError


def parse_int_list(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``; raises ValueError naming the bad part."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep and lo:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UsageError(f"cannot parse {part!r} in {text!r} (expected N or A-B)") from None
    return out


def parse_steps(steps: str | Iterable[int] | None) -> set[int] | None:
    """``None``/``"all"`` -> None (every step); ``"eval"`` -> Pythia's 27 eval steps;
    ``"0,1000-2000"`` -> that set (ranges inclusive)."""
    if steps is None:
        return None
    if isinstance(steps, str):
        if steps.strip() in ("", "all"):
            return None
        if steps.strip() == "eval":
            return set(pythia_eval_steps())
        return set(parse_int_list(steps))
    return {int(s) for s in steps}


def _expand(source: str) -> list[str]:
    kind, _, rest = source.partition(":")
    if kind == "pythia" and rest:
        size, deduped = rest.removesuffix("-deduped"), rest.endswith("-deduped")
        return [HUB_SCHEME + pythia_repo(size, deduped=deduped)]
    if kind == "polypythias" and rest:
        size, _, seeds = rest.partition(":")
        seed_list = parse_int_list(seeds) if seeds else list(POLYPYTHIA_SEEDS)
        return [HUB_SCHEME + r for r in polypythias_repos([size], seed_list)]
    return [source]


def resolve_sources(
    sources: Iterable[str | Path], steps: str | Iterable[int] | None = None
) -> list[CheckpointRef]:
    """All checkpoints named by ``sources``, sorted by (run, step), filtered by ``steps``.

    Raises :class:`SourceError` for a source that names nothing or a duplicate
    (run, step) coming from two places.
    """
    wanted = parse_steps(steps)
    refs: dict[tuple[str, int], CheckpointRef] = {}
    for source in sources:
        for item in _expand(str(source)):
            try:
                if item.startswith(HUB_SCHEME):
                    found = hub.discover_hub(item)
                elif item.endswith(".csv") and Path(item).is_file():
                    found = read_manifest(item)
                else:
                    found = discover_local(item)
            except ValueError as err:
                if isinstance(err, SourceError):
                    raise
                raise SourceError(f"{item}: {err}") from err
            for ref in found:
                if wanted is not None and ref.step not in wanted:
                    continue
                key = (ref.run, ref.step)
                if key in refs and refs[key].location != ref.location:
                    raise SourceError(
                        f"run {ref.run!r} step {ref.step} comes from two places: "
                        f"{refs[key].location} and {ref.location}"
                    )
                refs[key] = ref
    if not refs and wanted is not None:
        raise SourceError(f"no checkpoint in {list(map(str, sources))} matches steps={steps!r}")
    return sorted(refs.values(), key=lambda r: (r.run, r.step))


def as_refs(
    sources: str | Path | Iterable[str | Path] | Sequence[CheckpointRef],
    steps: str | Iterable[int] | None = None,
) -> list[CheckpointRef]:
    """Checkpoint refs from sources (paths, ``hf://`` locations, manifests) or refs as
    they are; sorted by run and step."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    sources = list(sources)
    if sources and all(isinstance(s, CheckpointRef) for s in sources):
        return sorted(sources, key=lambda r: (r.run, r.step))
    return resolve_sources(sources, steps)


def fingerprint(ref: CheckpointRef) -> str:
    """Identity of a checkpoint's content, cheap to compute: for local files, names, sizes
    and modification times of config and weights (a hub-cache blob's name is already its
    hash); for hub references, repository and revision."""
    if ref.is_hub:
        return hub.fingerprint(ref)
    directory = Path(ref.location)
    parts = []
    try:
        dcp = dcp_directory(directory)
        if dcp is not None:  # a torch.distributed.checkpoint: its metadata and shards
            files = [dcp / METADATA, *sorted(dcp.glob("*.distcp")), directory / "config.json"]
        else:
            files = weight_files(directory) + [directory / "config.json"]
    except (OSError, ValueError, CheckpointError):
        # a corrupt shard index: identify the directory's contents instead, so fixing
        # the index changes the fingerprint and the checkpoint is extracted again
        try:
            files = sorted(p for p in directory.iterdir() if p.is_file())
        except OSError:
            files = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            parts.append(f"{file.name}:missing")
            continue
        resolved = file.resolve()
        ident = resolved.name if resolved.parent.name == "blobs" else str(stat.st_mtime_ns)
        parts.append(f"{file.name}:{stat.st_size}:{ident}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def materialize(ref: CheckpointRef, delete_after: bool = False) -> Iterator[Path]:
    """A local directory holding ``ref``'s config and weights for the duration of the
    ``with`` block; downloads hub checkpoints and, with ``delete_after``, removes them
    from the hub cache afterwards."""
    if not ref.is_hub:
        yield Path(ref.location)
        return
    snapshot = hub.fetch(ref)
    try:
        yield snapshot
    finally:
        if delete_after:
            hub.release(snapshot)
