"""Latent training phases: preprocessing, HMM fitting and selection, the training map.

Imported on first use (PEP 562): ``describe`` reads a MODEL_DIR without loading
scikit-learn or hmmlearn.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "PhaseInputError": "polymap.phases.preprocess",
    "PhaseModel": "polymap.phases.model",
    "describe": "polymap.phases.model_dir",
    "fit_model_dir": "polymap.phases.model_dir",
    "training_map": "polymap.phases.graph",
    "write_model_dir": "polymap.phases.model_dir",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'polymap.phases' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
