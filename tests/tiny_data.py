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
