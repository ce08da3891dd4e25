"""Evaluation scores as features: lm-eval results files, running lm-eval, local tasks."""

from polymap.evals.results import (
    EvalFileError,
    IngestReport,
    column_name,
    ingest,
    read_results_file,
)

__all__ = ["EvalFileError", "IngestReport", "column_name", "ingest", "read_results_file"]
