"""Planted defects of the built-in suite: an instability zoo with a strength knob each.

Each defect is a cause present from step 0 whose effect on the validation loss is meant to
show late. It changes exactly one thing of a run; everything else (initial weights, data
order, the logged learning rate unless the defect *is* the schedule) stays that of the
healthy run with the same seed. ``polymap suite --list-defects`` prints the registry;
what each does at each strength is measured in the README ("The instability zoo").

``strength`` is a number whose meaning each defect states (``unit``); ``grid`` lists the
benchmark's strengths from obvious to barely measurable, and ``default`` is the middle one.

>>> sorted(DEFECTS)
['adam_eps', 'data_repeat', 'lr_schedule', 'precision', 'weight_decay']
>>> parse_defect("lr_schedule:3")
('lr_schedule', 3.0)
>>> parse_defect("precision")
('precision', 6.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from polymap.errors import UsageError


class DefectError(UsageError):
    """An unknown defect name or a strength outside its range."""


@dataclass(frozen=True)
class Defect:
    """One planted mechanism. Subclasses override the hooks they need.

    Hooks (each a no-op here): :meth:`spec_changes` (RunSpec fields, for schedule
    defects only), :meth:`optimizer_kwargs`, :meth:`init` (after the healthy
    initialisation), :meth:`batch` (a training batch), :meth:`after_step` (after each
    optimizer step).
    """

    name: str
    unit: str  # what the strength number is
    low: float  # valid strength range, inclusive
    high: float
    grid: tuple[float, ...]  # benchmark strengths, obvious first
    models: str  # what it models in real training

    @property
    def default(self) -> float:
        return self.grid[len(self.grid) // 2]

    def check(self, strength: float) -> float:
        if not (math.isfinite(strength) and self.low <= strength <= self.high):
            raise DefectError(
                f"defect {self.name!r}: strength {strength:g} outside [{self.low:g}, {self.high:g}]"
                f" ({self.unit})"
            )
        return float(strength)

    def spec_changes(self, strength: float, peak_lr: float) -> dict:
        return {}

    def optimizer_kwargs(self, strength: float) -> dict:
        return {}

    def init(self, model, strength: float) -> None:
        return None

    def batch(self, batch: torch.Tensor, train_ids: torch.Tensor, gen, strength: float):
        return batch

    def after_step(self, model, strength: float) -> None:
        return None

    def describe(self) -> str:
        grid = ",".join(f"{s:g}" for s in self.grid)
        return (
            f"{self.name:<12} strength {self.low:g}..{self.high:g} ({self.unit}; grid {grid},"
            f" default {self.default:g}): {self.models}"
        )


class LRSchedule(Defect):
    def spec_changes(self, strength, peak_lr):
        return {"peak_lr": peak_lr * strength, "lr_period": 0.5}


class AdamEps(Defect):
    def optimizer_kwargs(self, strength):
        return {"eps": 10.0 ** (-strength)}


class WeightDecay(Defect):
    def optimizer_kwargs(self, strength):
        return {"weight_decay": strength}


class DataRepeat(Defect):
    SHARD_TOKENS = 4096  # the repeated shard: the first 4,096 training tokens

    def batch(self, batch, train_ids, gen, strength):
        n = round(strength * batch.shape[0])
        if n == 0:
            return batch
        seq = batch.shape[1]
        starts = torch.randint(0, self.SHARD_TOKENS - seq - 1, (n,), generator=gen)
        batch = batch.clone()
        for i, s in enumerate(starts.tolist()):
            batch[i] = train_ids[s : s + seq]
        return batch


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded to ``bits`` explicit mantissa bits (bf16 has 7), round to nearest.

    >>> round_mantissa(torch.tensor([1.0 + 2**-9, 3.0]), 7).tolist()
    [1.0, 3.0]
    """
    mantissa, exponent = torch.frexp(x)
    scale = 2.0 ** (bits + 1)
    return torch.ldexp(torch.round(mantissa * scale) / scale, exponent.to(x.dtype))


class Precision(Defect):
    @torch.no_grad()
    def after_step(self, model, strength):
        for p in model.parameters():
            p.copy_(round_mantissa(p, int(strength)))


DEFECTS: dict[str, Defect] = {
    d.name: d
    for d in (
        LRSchedule(
            "lr_schedule",
            "peak learning-rate factor; cosine period 0.5",
            1.0,
            8.0,
            (4.0, 3.0, 2.0),
            "a cosine schedule with too short a period and a high peak (CosineAnnealingLR with"
            " a small T_max keeps cycling): the rate climbs back in the second half",
        ),
        AdamEps(
            "adam_eps",
            "-log10 of Adam's epsilon (healthy 8)",
            1.0,
            7.0,
            (3.0, 3.25, 3.5),
            "an optimizer misconfiguration: Adam epsilon too large, so updates shrink as the"
            " gradients do and the run falls behind late",
        ),
        WeightDecay(
            "weight_decay",
            "AdamW weight decay on the matrices (healthy 0.01)",
            0.0,
            10.0,
            (3.0, 2.0, 1.5),
            "an optimizer misconfiguration: weight decay meant for another optimizer or"
            " parametrisation; its shrinkage accumulates, so the run falls behind late",
        ),
        DataRepeat(
            "data_repeat",
            "fraction of every batch drawn from one 4k-token shard",
            0.0,
            1.0,
            (0.5, 0.4, 0.3),
            "a data defect: a small shard repeated from step 0 (a broken shuffle/dedup), so"
            " the model memorises it and generalises worse as training goes on",
        ),
        Precision(
            "precision",
            "mantissa bits the weights keep after every step (bf16: 7)",
            1.0,
            10.0,
            (5.0, 6.0, 7.0),
            "low-precision weights without fp32 master copies: updates smaller than half a"
            " unit in the last place are lost, so learning stalls as the rate decays",
        ),
    )
}
LEGACY = "lr_schedule:4"  # what ``--unstable`` without ``--defect`` plants


def parse_defect(text: str) -> tuple[str, float]:
    """``NAME[:STRENGTH]`` -> ``(name, strength)``; the default strength when omitted."""
    name, _, value = text.strip().partition(":")
    if name not in DEFECTS:
        raise DefectError(f"unknown defect {name!r}; available: {', '.join(sorted(DEFECTS))}")
    defect = DEFECTS[name]
    if not value:
        return name, defect.default
    try:
        strength = float(value)
    except ValueError:
        raise DefectError(f"defect {text!r}: strength {value!r} is not a number") from None
    return name, defect.check(strength)
