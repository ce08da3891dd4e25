"""Feature sets: each a registered unit producing ``<set>.<feature>`` columns."""

from polymap.features import hu2023, spectral, weights  # noqa: F401  (registration)
from polymap.features.base import (
    DEFAULT_FEATURE_SETS,
    CheckpointContext,
    FeatureSet,
    Param,
    feature_sets,
    get_feature_sets,
    register_feature_set,
)

__all__ = [
    "DEFAULT_FEATURE_SETS",
    "CheckpointContext",
    "FeatureSet",
    "Param",
    "feature_sets",
    "get_feature_sets",
    "register_feature_set",
]
