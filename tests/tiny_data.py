"""A dataset of random token ids for training tiny models in tests (the Trainer tests and
the torchrun worker both use it)."""

from __future__ import annotations

import torch


class RandomTokens(torch.utils.data.Dataset):
    """``n`` sequences of ``length`` token ids below ``vocab``, the labels the inputs."""

    def __init__(self, vocab: int, n: int = 64, length: int = 16):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_reference(root, steps=(0, 5, 10, 15, 20), seeds: int = 4):
    """``seeds`` tiny GPT-NeoX runs under ``root/ref``, their hu2023 features, a one-state
    map and its scorer saved in ``root/model`` (what the online tests score against).
    Returns the reference table."""
    from pathlib import Path

    import polymap
    from polymap.phases import fit_model_dir
    from polymap.scoring import RiskScorer
    from polymap.synthetic import make_tiny_run

    root = Path(root)
    for seed in range(seeds):
        make_tiny_run(root / "ref" / f"seed{seed}", steps=steps, seed=seed)
    reference = polymap.extract(root / "ref", features="hu2023", device="cpu", progress=False)
    (phase_model,) = fit_model_dir(reference, root / "model", n_states=1, restarts=1).values()
    RiskScorer(phase_model=phase_model).fit(reference).save(root / "model")
    return reference
