"""Tiny real training runs for the demo and the tests: a transformers model, random
init, a few AdamW steps on random tokens, checkpoints saved with ``save_pretrained``
(safetensors) as ``OUT/step<N>/``.

The full miniature Pythia suite (real text, schedules, planted instabilities) is
``polymap suite``; this is the smallest thing that produces real checkpoints.

>>> make_tiny_run("runs/seed0", arch="gpt_neox", steps=(0, 1, 2, 4), seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from polymap.errors import UsageError

ARCHS = ("gpt_neox", "gpt2", "llama", "bert")


def pythia_config(
    hidden: int, layers: int, heads: int, vocab: int, max_positions: int = 256, **extra
):
    """A Pythia-style GPT-NeoX config: parallel residual, rotary on 25% of each head,
    untied input and output embeddings, MLP 4x wide.

    >>> pythia_config(64, 2, 4, 512).use_parallel_residual
    True
    """
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=0,
        **extra,
    )


def tiny_config(arch: str = "gpt_neox", hidden: int = 32, layers: int = 2, vocab: int = 128):
    """A transformers config of a few layers for ``arch``."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    heads = max(1, hidden // 16)
    if arch == "gpt_neox":
        return pythia_config(hidden, layers, heads, vocab)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=3 * hidden,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    if arch == "bert":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=256,
            pad_token_id=0,
        )
    raise UsageError(f"arch={arch!r} is not one of {ARCHS}")


def tiny_model(arch: str = "gpt_neox", seed: int = 0, **config_kwargs):
    """A freshly initialised tiny model (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **config_kwargs)
    auto = AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM
    return auto.from_config(config)


def make_tiny_run(
    out: str | Path,
    arch: str = "gpt_neox",
    steps: Sequence[int] = (0, 1, 2, 4, 8),
    seed: int = 0,
    lr: float = 1e-2,
    batch: int = 4,
    seq_len: int = 16,
    **config_kwargs,
) -> list[Path]:
    """Train a tiny model on random tokens, saving a checkpoint at each of ``steps``."""
    out = Path(out)
    model = tiny_model(arch, seed, **config_kwargs)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    saved = []
    last = max(steps)
    for step in range(last + 1):
        if step in steps:
            path = out / f"step{step}"
            model.save_pretrained(path)
            saved.append(path)
        if step == last:
            break
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return saved
