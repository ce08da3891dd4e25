"""Online risk while a run trains: a plain monitor for custom loops and a
``transformers.TrainerCallback``.

At each save the live model's features are extracted (the same feature sets as the
reference table), appended to the run's history, and the run is scored against the
reference runs with every checkpoint so far (``until_step`` = the current step). The
risk is logged; when the run is flagged (``p_value <= alpha``, the saved scorer's
calibrated decision) a warning is issued and, with ``stop=True``, training is asked to
stop.

>>> monitor = RiskMonitor("reference.parquet", "model/", run="my-run")   # doctest: +SKIP
>>> monitor.observe(model, step=1000)                                    # doctest: +SKIP
{'run': 'my-run', 'step': 1000, 'risk': 0.03, 'flagged': False, ...}
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import pandas as pd

from polymap.checkpoints import CheckpointRef
from polymap.extraction import extract_checkpoint
from polymap.table import feature_columns, read_table

log = logging.getLogger(__name__)


class InstabilityWarning(UserWarning):
    """A live run's risk crossed the threshold."""


class RiskMonitor:
    """Score a live run against a reference after each checkpoint."""

    def __init__(
        self,
        reference: pd.DataFrame | str | Path,
        model_dir: str | Path,
        run: str = "live",
        alpha: float = 0.05,
        device: str = "auto",
    ):
        from polymap.scoring.scorer import RiskScorer

        self.reference = (
            read_table(reference) if not isinstance(reference, pd.DataFrame) else (reference)
        )
        # the scorer saved by ``polymap fit``: nothing is refitted at the first call
        self.scorer = RiskScorer.load(model_dir).set_params(alpha=alpha)
        sets = {c.split(".")[0] for c in feature_columns(self.reference)}
        self.feature_sets = sorted(sets & {"hu2023", "weights", "spectral"}) or ["hu2023"]
        self.run, self.alpha, self.device = run, alpha, device
        self.history: list[dict] = []
        self.risks: list[dict] = []

    def observe_checkpoint(self, directory: str | Path, step: int) -> dict:
        """Score after a checkpoint saved in ``directory`` (a Hugging Face model dir)."""
        ref = CheckpointRef(self.run, int(step), str(directory))
        row = extract_checkpoint(ref, self.feature_sets, self.device)
        self.history.append(row)
        targets = pd.DataFrame(self.history)
        scores = self.scorer.score(targets, until_step=int(step))
        top = scores.iloc[0].to_dict()
        result = {
            "run": self.run,
            "step": int(step),
            **{
                k: top[k]
                for k in (
                    "risk",
                    "flagged",
                    "p_value",
                    "path",
                    "likelihood",
                    "deviation",
                    "explanation",
                )
            },
        }
        self.risks.append(result)
        log.info("polymap risk at step %d: %.3f", step, result["risk"])
        if result["flagged"]:
            warnings.warn(
                f"run {self.run!r} at step {step}: flagged (p = {result['p_value']:.2g} <= "
                f"{self.alpha}; {result['explanation']})",
                InstabilityWarning,
                stacklevel=2,
            )
        return result

    def observe(self, model, step: int) -> dict:
        """Score a live ``transformers`` model (saved to a temporary directory)."""
        with tempfile.TemporaryDirectory(prefix="polymap-live-") as tmp:
            model.save_pretrained(tmp)
            return self.observe_checkpoint(tmp, step)


def risk_callback(reference, model_dir, run: str = "live", alpha: float = 0.05, stop: bool = False):
    """A ``transformers.TrainerCallback`` that scores every checkpoint the Trainer saves."""
    from transformers import TrainerCallback

    monitor = RiskMonitor(reference, model_dir, run, alpha)

    class PolymapRiskCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            result = monitor.observe_checkpoint(directory, state.global_step)
            state.log_history.append({"step": state.global_step, "polymap_risk": result["risk"]})
            if stop and result["flagged"]:
                control.should_training_stop = True
            return control

    callback = PolymapRiskCallback()
    callback.monitor = monitor
    return callback
