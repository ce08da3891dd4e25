"""Latent training phases: preprocessing, HMM fitting and selection, the training map."""

from polymap.phases.graph import describe, fit_model_dir, training_map, write_model_dir
from polymap.phases.model import PhaseModel
from polymap.phases.preprocess import PhaseInputError

__all__ = [
    "PhaseInputError",
    "PhaseModel",
    "describe",
    "fit_model_dir",
    "training_map",
    "write_model_dir",
]
