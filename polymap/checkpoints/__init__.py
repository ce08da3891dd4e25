"""Where checkpoints come from and how their tensors are read."""

from polymap.checkpoints.dcp import DCPReader, open_checkpoint
from polymap.checkpoints.local import SourceError, discover_local, read_manifest
from polymap.checkpoints.pythia import (
    parse_pythia_repo,
    polypythias_repos,
    pythia_eval_steps,
    pythia_repo,
    pythia_steps,
)
from polymap.checkpoints.reader import (
    CheckpointError,
    TensorReader,
    UnsafeCheckpointError,
    architecture_signature,
    read_config,
)
from polymap.checkpoints.ref import CheckpointRef, parse_step
from polymap.checkpoints.sources import (
    as_refs,
    fingerprint,
    materialize,
    parse_steps,
    resolve_sources,
)

__all__ = [
    "architecture_signature",
    "as_refs",
    "CheckpointError",
    "CheckpointRef",
    "DCPReader",
    "SourceError",
    "TensorReader",
    "UnsafeCheckpointError",
    "discover_local",
    "fingerprint",
    "materialize",
    "open_checkpoint",
    "parse_pythia_repo",
    "parse_step",
    "parse_steps",
    "polypythias_repos",
    "pythia_eval_steps",
    "pythia_repo",
    "pythia_steps",
    "read_config",
    "read_manifest",
    "resolve_sources",
]
