"""Online risk while a run trains: a plain monitor for custom loops and a
``transformers.TrainerCallback``.

At each save the live model's features are extracted (the same feature sets as the
reference table), appended to the run's history, and the run is scored against the
reference runs with every checkpoint so far (``until_step`` = the current step) by the
scorer ``polymap fit`` saved (nothing is refitted, so the first save costs what a later
one does). When the run is flagged (``p_value <= alpha``) an ``InstabilityWarning`` is
issued and, with ``stop=True``, training is asked to stop. A checkpoint whose model type,
width, depth or vocabulary differ from the reference runs' is not scored (one
``ArchitectureMismatchWarning``); a step with nothing comparable in the reference is
never flagged.

In a ``Trainer``, the scores go through ``Trainer.log`` - the path every integration reads
(TensorBoard, W&B, MLflow, CSV) - as ``polymap/risk``, ``polymap/p_value``,
``polymap/flagged`` and ``polymap/deviation``; only the main process scores. With
``stop=True`` under ``torch.distributed`` (``torchrun``) the main process's decision is
broadcast at each save, so every rank stops at the same step.

>>> monitor = RiskMonitor("reference.parquet", "model/", run="my-run")   # doctest: +SKIP
>>> monitor.observe(model, step=1000)                                    # doctest: +SKIP
{'run': 'my-run', 'step': 1000, 'risk': 0.03, 'flagged': False, ...}
>>> callback = attach_risk_callback(trainer, "reference.parquet", "model/")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

from polymap.checkpoints import CheckpointError, CheckpointRef, architecture_signature, read_config
from polymap.extraction import extract_checkpoint
from polymap.table import as_table, feature_columns

log = logging.getLogger(__name__)


class InstabilityWarning(UserWarning):
    """A live run's risk crossed the threshold."""


class ArchitectureMismatchWarning(UserWarning):
    """The live model is not comparable with the reference runs; it is not scored."""


METRICS = ("risk", "p_value", "flagged", "deviation")


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

        self.reference = as_table(reference)
        # the scorer saved by ``polymap fit``: nothing is refitted at the first call
        self.scorer = RiskScorer.load(model_dir).set_params(alpha=alpha)
        sets = {c.split(".")[0] for c in feature_columns(self.reference)}
        self.feature_sets = sorted(sets & {"hu2023", "weights", "spectral"}) or ["hu2023"]
        self.run, self.alpha, self.device = run, alpha, device
        self.history: list[dict] = []
        self.risks: list[dict] = []
        signatures = self.reference.get("architecture", pd.Series(dtype=object)).dropna()
        self.reference_architecture = signatures.mode().iloc[0] if len(signatures) else None
        self.mismatch: str | None = None

    def _comparable(self, directory: str | Path) -> bool:
        """False (warned once) when the live checkpoint's architecture signature differs
        from the reference runs'."""
        if self.mismatch is not None:
            return False
        if self.reference_architecture is None:
            return True  # a reference table from before signatures were recorded
        try:
            live = architecture_signature(read_config(Path(directory)))
        except CheckpointError:
            live = None
        if live is None or live == self.reference_architecture:
            return True
        self.mismatch = (
            f"run {self.run!r} is {live}, the reference runs are {self.reference_architecture}: "
            "not comparable, so not scored"
        )
        warnings.warn(self.mismatch, ArchitectureMismatchWarning, stacklevel=3)
        return False

    def observe_checkpoint(self, directory: str | Path, step: int) -> dict:
        """Score after a checkpoint saved in ``directory`` (a Hugging Face model dir).
        Returns ``{"run", "step", "skipped": reason}`` when it is not comparable."""
        if not self._comparable(directory):
            return {"run": self.run, "step": int(step), "skipped": self.mismatch}
        started = time.perf_counter()
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
                    "performance",
                    "explanation",
                )
            },
        }
        result["seconds"] = time.perf_counter() - started
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
    """A ``transformers.TrainerCallback`` that scores every checkpoint the Trainer saves.

    Bind it to its Trainer (:func:`attach_risk_callback` does both) so the scores go
    through ``Trainer.log`` to every integration; unbound, they are appended to
    ``state.log_history`` only (warned once).
    """
    from transformers import TrainerCallback

    monitor = RiskMonitor(reference, model_dir, run, alpha)

    class PolymapRiskCallback(TrainerCallback):
        def __init__(self):
            self.monitor = monitor
            self.trainer = None
            self._warned_unbound = False

        def bind(self, trainer) -> PolymapRiskCallback:
            self.trainer = trainer
            return self

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:  # one scorer per job, not one per rank
                if stop and _agreed_stop(False):  # the main process's decision, broadcast
                    control.should_training_stop = True
                return control
            flagged = self._score(args, state)
            if stop and _agreed_stop(flagged):
                control.should_training_stop = True
            return control

        def _score(self, args, state) -> bool:
            directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            result = monitor.observe_checkpoint(directory, state.global_step)
            if "skipped" in result:
                return False
            metrics = {f"polymap/{k}": float(result[k]) for k in METRICS}
            if self.trainer is not None:
                self.trainer.log(metrics)  # -> on_log of TensorBoard, W&B, MLflow, ...
            else:
                if not self._warned_unbound:
                    warnings.warn(
                        "polymap risk callback not bound to its Trainer: scores go to "
                        "state.log_history only; use attach_risk_callback(trainer, ...)",
                        stacklevel=2,
                    )
                    self._warned_unbound = True
                state.log_history.append({**metrics, "step": state.global_step})
            return bool(result["flagged"])

    return PolymapRiskCallback()


def _agreed_stop(flagged: bool) -> bool:
    """The main process's stop decision on every rank: under ``torch.distributed`` (as
    ``torchrun`` starts a Trainer) a broadcast from rank 0 that every rank joins at the
    same save, so no rank leaves training while the others wait for it in a collective.
    Without a process group, ``flagged`` as it is."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flagged
    import torch

    device = "cpu"
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    decision = torch.tensor([1 if flagged else 0], dtype=torch.int32, device=device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def attach_risk_callback(
    trainer, reference, model_dir, run: str = "live", alpha: float = 0.05, stop: bool = False
):
    """Create the risk callback, bind it to ``trainer`` and add it; returns it.

    >>> callback = attach_risk_callback(trainer, "reference.parquet", "model/")  # doctest: +SKIP
    >>> trainer.train()                                                        # doctest: +SKIP
    """
    callback = risk_callback(reference, model_dir, run, alpha, stop).bind(trainer)
    trainer.add_callback(callback)
    return callback
