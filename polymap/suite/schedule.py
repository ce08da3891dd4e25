"""Checkpoint steps and the learning-rate schedule, Pythia-style, scaled to the run length.

>>> checkpoint_steps(400)[:8], len(checkpoint_steps(400))
([0, 1, 2, 4, 8, 13, 26, 39], 36)
"""

from __future__ import annotations

import math

from polymap.errors import UsageError


def checkpoint_steps(total: int, evenly: int = 30) -> list[int]:
    """Step 0, powers of two below the even interval, then every ``total / evenly`` steps
    to the end (Pythia: 0, 1, 2, ..., 512, then every 1000 to 143000)."""
    if total < 1:
        raise UsageError(f"steps={total} must be at least 1")
    interval = max(1, round(total / evenly))
    steps = {0, total}
    power = 1
    while power < interval:
        steps.add(power)
        power *= 2
    steps.update(range(interval, total + 1, interval))
    return sorted(s for s in steps if s <= total)


def learning_rate(step: int, total: int, peak: float, warmup: int, period: float = 1.0) -> float:
    """Linear warmup to ``peak``, then cosine decay to 10% of it at ``total`` (Pythia).

    ``period`` < 1 is the planted schedule bug: the cosine's half-period is that fraction
    of the decay phase and the cosine keeps going (as ``torch.optim.lr_scheduler.
    CosineAnnealingLR`` does past ``T_max``), so the rate reaches its floor early and then
    climbs back towards the peak.

    >>> [round(learning_rate(s, 100, 1.0, 10), 3) for s in (0, 9, 55, 100)]
    [0.1, 1.0, 0.55, 0.1]
    >>> [round(learning_rate(s, 100, 1.0, 10, period=0.5), 3) for s in (55, 100)]
    [0.1, 1.0]
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, progress) if period >= 1.0 else progress / period
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
