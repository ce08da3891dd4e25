"""polymap: map how language-model pre-training unfolds across many runs.

>>> import polymap
>>> df = polymap.extract("runs/", out="features.parquet")      # doctest: +SKIP

The names below are imported on first use (PEP 562), so ``import polymap`` and
``polymap --help`` do not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CheckpointRef": "polymap.checkpoints",
    "TensorReader": "polymap.checkpoints",
    "resolve_sources": "polymap.checkpoints",
    "extract": "polymap.extraction",
    "extract_checkpoint": "polymap.extraction",
    "FeatureSet": "polymap.features",
    "feature_sets": "polymap.features",
    "register_feature_set": "polymap.features",
    "assign_role": "polymap.roles",
    "detect_architecture": "polymap.roles",
    "register_architecture": "polymap.roles",
    "FeatureStore": "polymap.table",
    "feature_columns": "polymap.table",
    "merge_tables": "polymap.table",
    "read_table": "polymap.table",
    "write_table": "polymap.table",
    "PolymapError": "polymap.errors",
}
_RENAMED = {"ingest_evals": ("polymap.evals", "ingest")}

__all__ = sorted([*_LAZY, *_RENAMED])


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _RENAMED:
        module, attribute = _RENAMED[name]
        value = getattr(importlib.import_module(module), attribute)
    else:
        raise AttributeError(f"module 'polymap' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
