"""Online risk in PyTorch Lightning: a ``lightning.pytorch.Callback`` that scores the
live model every time Lightning saves a checkpoint (``pip install 'polymap[lightning]'``).

At each ``on_save_checkpoint`` (``ModelCheckpoint``'s schedule, or
``trainer.save_checkpoint``) the module's weights are written to a temporary folder - a
Hugging Face model inside the module (``save_pretrained``) as itself, anything else as
its ``state_dict`` in safetensors - and scored by :class:`~polymap.scoring.online.RiskMonitor`
with the scorer ``polymap fit`` saved, exactly as the ``transformers`` callback does, so
the flag history equals ``polymap score --until-step`` at each save.

The scores reach every Lightning logger (TensorBoard, CSV, W&B, MLflow...) through
``logger.log_metrics`` at the trainer's global step - ``LightningModule.log`` is not
allowed inside checkpoint hooks - as ``polymap/risk``, ``polymap/p_value``,
``polymap/flagged`` and ``polymap/deviation``, and are put in
``trainer.callback_metrics``, so ``EarlyStopping(monitor="polymap/p_value", mode="max")``
or a ``ModelCheckpoint`` can use them. Only global rank 0 scores; with ``stop=True`` its
decision is broadcast through the strategy so every rank stops at the same step.

>>> from polymap.scoring.lightning import PolymapRiskCallback     # doctest: +SKIP
>>> trainer = lightning.Trainer(callbacks=[ModelCheckpoint(every_n_train_steps=500),
...     PolymapRiskCallback("reference.parquet", "model/", run="seed7")])  # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from polymap.errors import PolymapError
from polymap.scoring.online import METRICS, RiskMonitor

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package name of older installs
    try:
        from pytorch_lightning import Callback
    except ImportError as err:
        raise PolymapError(
            "the Lightning callback needs PyTorch Lightning: pip install 'polymap[lightning]'"
        ) from err


def save_module(module, directory: str | Path) -> Path:
    """Write ``module``'s weights where :func:`~polymap.extraction.extract_checkpoint` reads
    them: a ``transformers`` model (the module itself or one of its direct children) with
    ``save_pretrained`` (its config too), else the ``state_dict`` as ``model.safetensors``
    (shared tensors cloned: safetensors stores each once)."""
    directory = Path(directory)
    candidates = [module, *module.children()]
    for candidate in candidates:
        if hasattr(candidate, "save_pretrained") and hasattr(candidate, "config"):
            candidate.save_pretrained(directory)
            return directory
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    return directory


class PolymapRiskCallback(Callback):
    """Score the live run at each Lightning checkpoint against a saved scorer.

    Parameters
    ----------
    reference, model_dir
        The reference FeatureTable and the MODEL_DIR ``polymap fit`` wrote (its scorer).
    run : str
        The live run's name in the scores.
    alpha : float
        The flag's false-alarm rate per run over all its looks.
    stop : bool
        Ask the trainer to stop when the run is flagged (on every rank).
    """

    def __init__(
        self,
        reference: pd.DataFrame | str | Path,
        model_dir: str | Path,
        run: str = "live",
        alpha: float = 0.05,
        stop: bool = False,
    ):
        super().__init__()
        self.monitor = RiskMonitor(reference, model_dir, run, alpha)
        self.stop = stop

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        flagged = False
        if trainer.is_global_zero:
            flagged = self._score(trainer, pl_module)
        if self.stop:
            flagged = bool(trainer.strategy.broadcast(flagged, src=0))
            if flagged:
                trainer.should_stop = True

    def _score(self, trainer, pl_module) -> bool:
        import torch

        step = int(trainer.global_step)
        with tempfile.TemporaryDirectory(prefix="polymap-live-") as tmp:
            result = self.monitor.observe_checkpoint(save_module(pl_module, tmp), step)
        if "skipped" in result:
            return False
        metrics = {f"polymap/{k}": float(result[k]) for k in METRICS}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        return bool(result["flagged"])
