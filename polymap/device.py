"""Which torch device work runs on: one rule for extraction, lm-eval runs and training.

>>> resolve_device("cpu")
device(type='cpu')
>>> resolve_device("auto", prefer_gpu=False)
device(type='cpu')
"""

from __future__ import annotations

import torch

from polymap.errors import UsageError


def resolve_device(device: str | torch.device = "auto", prefer_gpu: bool = True) -> torch.device:
    """``auto`` -> CUDA when available (and ``prefer_gpu``), else CPU; ``cuda`` or
    ``cuda:N`` without a GPU is a :class:`~polymap.errors.UsageError`.

    The training suite passes ``prefer_gpu=False``: at its sizes a GPU is no faster and
    CPU runs are bit-identical, so ``auto`` trains on the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        use_gpu = prefer_gpu and torch.cuda.is_available()
        return torch.device("cuda" if use_gpu else "cpu")
    if not isinstance(device, str) or (
        device not in ("cpu", "cuda") and not device.startswith("cuda:")
    ):
        raise UsageError(f"device={device!r} is not one of 'auto', 'cpu', 'cuda'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={device!r} requested but no CUDA GPU is available")
    return torch.device(device)
