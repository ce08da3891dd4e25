"""Feature sets: each a registered unit producing ``<set>.<feature>`` columns."""

# Importing a feature-set module registers it.

from polymap.features import evals_native, hu2023, spectral, weights  # noqa: F401
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
