"""The Lightning callback on a real ``lightning.Trainer`` training a tiny GPT-NeoX."""

from __future__ import annotations

import pandas as pd
import pytest

pytest.importorskip("lightning")

import lightning  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from tiny_data import RandomTokens, tiny_reference  # noqa: E402

from polymap.scoring import RiskScorer  # noqa: E402


class TinyLM(lightning.LightningModule):
    def __init__(self, model, lr: float = 1e-2):
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@pytest.mark.slow
def test_lightning_callback_logs_and_matches_score_until_step(tmp_path):
    from polymap.scoring.lightning import PolymapRiskCallback
    from polymap.synthetic import tiny_model

    reference = tiny_reference(tmp_path)

    model = tiny_model("gpt_neox", seed=7)
    callback = PolymapRiskCallback(reference, tmp_path / "model", run="live")
    data = torch.utils.data.DataLoader(RandomTokens(model.config.vocab_size), batch_size=4)
    trainer = lightning.Trainer(
        max_steps=20, accelerator="cpu", logger=CSVLogger(tmp_path / "logs"),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5,
                                   save_top_k=-1), callback],
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5,
    )  # fmt: skip
    trainer.fit(TinyLM(model), data)

    steps = [r["step"] for r in callback.monitor.risks]
    assert steps == [5, 10, 15, 20]
    # every Lightning logger received the scores: the CSV logger's metrics file
    (metrics_file,) = (tmp_path / "logs").rglob("metrics.csv")
    logged = pd.read_csv(metrics_file).dropna(subset=["polymap/risk"])
    assert logged["step"].tolist() == steps
    assert logged["polymap/p_value"].tolist() == pytest.approx(
        [r["p_value"] for r in callback.monitor.risks]
    )
    assert "polymap/p_value" in trainer.callback_metrics
    # the flag history at each save is what `score --until-step` gives afterwards
    live = pd.DataFrame(callback.monitor.history)
    scorer = RiskScorer.load(tmp_path / "model")
    for result in callback.monitor.risks:
        again = scorer.score(live, until_step=result["step"]).iloc[0]
        assert bool(again["flagged"]) == bool(result["flagged"])
        assert again["p_value"] == pytest.approx(result["p_value"], rel=1e-9)
    # the features scored at the last save are the trained model's own
    from polymap.checkpoints import CheckpointRef
    from polymap.extraction import extract_checkpoint

    model.save_pretrained(tmp_path / "final")
    direct = extract_checkpoint(CheckpointRef("live", 20, str(tmp_path / "final")), "hu2023")
    row = live.set_index("step").loc[20]
    for column in [c for c in direct if c.startswith("hu2023.")]:
        assert row[column] == pytest.approx(direct[column], rel=1e-6), column


def test_save_module_writes_a_plain_state_dict(tmp_path):
    from safetensors.torch import load_file

    from polymap.scoring.lightning import save_module

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    save_module(module, tmp_path / "m")
    saved = load_file(tmp_path / "m" / "model.safetensors")
    for name, tensor in module.state_dict().items():
        assert torch.equal(saved[name], tensor)
