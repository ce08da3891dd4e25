"""Train one miniature Pythia-style run and write its checkpoints and logs.

A run is fully described by a :class:`RunSpec`; the same spec gives bit-identical
checkpoints on the same machine (one CPU thread per run, seeded initialisation and data
order, deterministic kernels). The run is written to ``<run>.partial/`` and renamed to
``<run>/`` when finished, so an interrupted suite never leaves a half run that looks done.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from polymap.suite.defects import DEFECTS, Defect
from polymap.suite.schedule import checkpoint_steps, learning_rate

SIZES = {  # name: (hidden, layers, heads)
    "pico": (32, 2, 2),
    "nano": (64, 2, 4),
    "micro": (96, 3, 4),
}
RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run.

    Planted runs (``planted``) carry ``defect`` at ``strength`` (see
    :mod:`polymap.suite.defects`); only a schedule defect changes ``peak_lr`` /
    ``lr_period`` here, every other defect acts inside :func:`train_run`.
    """

    name: str
    size: str
    seed: int
    init_seed: int
    data_seed: int
    steps: int = 400
    batch: int = 16
    seq_len: int = 64
    peak_lr: float = 3e-3
    warmup: int = 8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lr_period: float = 1.0
    planted: bool = False
    defect: str = ""
    strength: float = 0.0
    vocab_size: int = 512
    corpus: str = ""

    def model_config(self):
        from polymap.synthetic import pythia_config

        hidden, layers, heads = SIZES[self.size]
        return pythia_config(
            hidden,
            layers,
            heads,
            self.vocab_size,
            max(128, self.seq_len),
            pad_token_id=0,
            attn_implementation="eager",
        )


def _batches(ids: torch.Tensor, spec: RunSpec, defect: Defect | None = None):
    """The run's training batches; a data defect edits them with its own generator, so
    the healthy part of the stream is the same as the healthy run's."""
    gen = torch.Generator().manual_seed(10_000 + spec.data_seed)
    defect_gen = torch.Generator().manual_seed(20_000 + spec.data_seed)
    high = ids.numel() - spec.seq_len - 1
    while True:
        starts = torch.randint(0, high, (spec.batch,), generator=gen)
        batch = torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])
        if defect is not None:
            batch = defect.batch(batch, ids, defect_gen, spec.strength)
        yield batch


def _validation_batches(ids: torch.Tensor, spec: RunSpec, count: int = 128) -> torch.Tensor:
    n = min(count, (ids.numel() - 1) // spec.seq_len)
    return ids[: n * spec.seq_len].view(n, spec.seq_len)


@torch.no_grad()
def _validation_loss(model, val: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=b, labels=b).loss) for b in val.split(32)]
    model.train()
    return sum(losses) / len(losses)


@contextlib.contextmanager
def torch_state_restored():
    """Whatever a training run sets globally - torch's thread count, deterministic mode,
    the global RNG, transformers' progress bars - is put back afterwards, so a library
    call leaves the caller's process as it found it."""
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.get_rng_state()
    bars = hf_logging.is_progress_bar_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_rng_state(rng)
        if bars:
            hf_logging.enable_progress_bar()


def train_run(
    spec: RunSpec,
    out: Path,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    tokenizer,
    on_step=None,
    device: str = "cpu",
) -> Path:
    """Train ``spec`` and write ``out/<name>/``; returns that directory.

    On the CPU (the default) a run uses one thread and is bit-identical on the same
    machine. ``device="cuda"`` trains on the GPU with deterministic kernels requested
    (reproducible on the same GPU and software, not identical to the CPU run).
    ``on_step(step)`` is called after every optimizer step (for progress bars). The
    caller's torch settings are restored afterwards (:func:`torch_state_restored`).
    """
    with torch_state_restored():
        return _train_run(spec, out, train_ids, val_ids, tokenizer, on_step, device)


def _train_run(spec, out, train_ids, val_ids, tokenizer, on_step, device) -> Path:
    from transformers import GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=device.startswith("cuda"))
    final = out / spec.name
    partial = out / f"{spec.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    defect = DEFECTS[spec.defect] if spec.defect else None
    torch.manual_seed(spec.init_seed)
    model = GPTNeoXForCausalLM(spec.model_config()).to(device)
    if defect is not None:
        defect.init(model, spec.strength)
    model.train()
    adam = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": spec.weight_decay}
    if defect is not None:
        adam.update(defect.optimizer_kwargs(spec.strength))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": adam.pop("weight_decay")},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=spec.peak_lr, **adam)
    saves = set(checkpoint_steps(spec.steps))
    val = _validation_batches(val_ids, spec).to(device)
    batches = _batches(train_ids, spec, defect)
    tokens_per_step = spec.batch * spec.seq_len
    train_log = [("step", "loss", "lr", "grad_norm", "tokens")]
    eval_log = [("step", "val_loss")]
    for step in range(spec.steps + 1):
        if step in saves:
            directory = partial / f"step{step}"
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            eval_log.append((step, _validation_loss(model, val)))
        if step == spec.steps:
            break
        lr = learning_rate(step, spec.steps, spec.peak_lr, spec.warmup, spec.lr_period)
        for group in opt.param_groups:
            group["lr"] = lr
        ids = next(batches).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        if math.isfinite(float(loss.detach())):
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip))
            if math.isfinite(norm):
                opt.step()  # a non-finite step is skipped, as large-scale trainers do
                if defect is not None:
                    defect.after_step(model, spec.strength)
        else:
            norm = math.nan
        train_log.append((step + 1, float(loss.detach()), lr, norm, (step + 1) * tokens_per_step))
        if on_step is not None:
            on_step(step + 1)
    _write_csv(partial / "train_log.csv", train_log)
    _write_csv(partial / "eval_log.csv", eval_log)
    (partial / RUN_FILE).write_text(json.dumps(asdict(spec), indent=1, sort_keys=True))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def _write_csv(path: Path, rows: list[tuple]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        for row in rows:
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
