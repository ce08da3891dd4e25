"""polymap: map how language-model pre-training unfolds across many runs.

>>> import polymap
>>> df = polymap.extract("runs/", out="features.parquet")      # doctest: +SKIP
"""

from polymap.checkpoints import CheckpointRef, TensorReader, resolve_sources
from polymap.evals import ingest as ingest_evals
from polymap.extraction import extract, extract_checkpoint
from polymap.features import FeatureSet, feature_sets, register_feature_set
from polymap.roles import assign_role, detect_architecture, register_architecture
from polymap.table import FeatureStore, feature_columns, merge_tables, read_table, write_table

__version__ = "0.1.0"

__all__ = [
    "CheckpointRef",
    "FeatureSet",
    "FeatureStore",
    "TensorReader",
    "assign_role",
    "detect_architecture",
    "extract",
    "extract_checkpoint",
    "feature_columns",
    "feature_sets",
    "ingest_evals",
    "merge_tables",
    "read_table",
    "register_architecture",
    "register_feature_set",
    "resolve_sources",
    "write_table",
]
