"""Feature sets: each a registered unit producing ``<set>.<feature>`` columns."""

# Importing a feature-set module registers it.

from polymap.features import (  # noqa: F401
    activations,
    drift,
    embedding,
    evals_native,
    gradients,
    hu2023,
    shape,
    spectral,
    weights,
)
from polymap.features.base import (
    DEFAULT_FEATURE_SETS,
    CheckpointContext,
    FeatureSet,
    FeatureUnavailableError,
    Param,
    feature_sets,
    get_feature_sets,
    register_feature_set,
)

__all__ = [
    "DEFAULT_FEATURE_SETS",
    "CheckpointContext",
    "FeatureSet",
    "FeatureUnavailableError",
    "Param",
    "feature_sets",
    "get_feature_sets",
    "register_feature_set",
]
