"""Outlier-risk scoring, instability labels and backtests."""

from polymap.scoring.backtest import backtest
from polymap.scoring.labels import label_runs
from polymap.scoring.score import ScoringError, horizon_step, score_paths, score_runs
from polymap.scoring.scorer import RiskScorer

__all__ = [
    "RiskScorer",
    "ScoringError",
    "backtest",
    "horizon_step",
    "label_runs",
    "score_paths",
    "score_runs",
]
