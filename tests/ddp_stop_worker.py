"""Run by ``torchrun --nproc_per_node 2`` from ``test_scoring.py``: a real ``Trainer`` on
CPU (gloo) with the polymap risk callback and ``stop=True``; each rank writes the step
at which its training ended."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from polymap.scoring.online import attach_risk_callback
from polymap.synthetic import tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from tiny_data import RandomTokens  # noqa: E402


def main(work: Path) -> None:
    model = tiny_model("gpt_neox", seed=11)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(25)  # a wildly off run: flagged once the deviation has lasted
    args = TrainingArguments(
        output_dir=str(work / "out"), max_steps=60, save_steps=5, logging_steps=5,
        per_device_train_batch_size=2, learning_rate=1e-4, report_to=[], use_cpu=True,
        ddp_backend="gloo", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=RandomTokens(model.config.vocab_size, n=256)
    )
    callback = attach_risk_callback(
        trainer, work / "reference.parquet", work / "model", run="live", stop=True
    )
    trainer.train()
    rank = torch.distributed.get_rank()
    flags = [r["step"] for r in callback.monitor.risks if r["flagged"]] if rank == 0 else []
    (work / f"rank{rank}.json").write_text(
        json.dumps({"stopped_at": trainer.state.global_step, "flagged": flags})
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
