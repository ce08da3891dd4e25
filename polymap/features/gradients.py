"""``gradients``: the language-modelling gradient of each checkpoint on the probe batch.

One forward and backward pass of the mean next-token cross-entropy over the whole probe
(the model in eval mode: no dropout, so the gradient is deterministic), then, over the
parameters of each role (assigned by :mod:`polymap.roles` on the model's parameter
names) and each (layer, role):

- ``gradients.<group>.norm``: L2 norm of the gradient;
- ``gradients.<role>.kurtosis``: excess kurtosis of the gradient entries (spiky updates);
- ``gradients.total_norm``: the global gradient norm (what clipping sees) and
  ``gradients.loss``: the loss it is the gradient of.

A non-finite loss or gradient is recorded as NaN values and a warning.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from polymap.features.base import FeatureSet, group_order, register_feature_set
from polymap.features.numerics import Moments
from polymap.roles import assign_role


@register_feature_set
class Gradients(FeatureSet):
    name = "gradients"
    needs_model = True
    documentation = {
        "gradients.<group>.norm": "L2 norm of the LM-loss gradient of the role (layer)",
        "gradients.<role>.kurtosis": "excess kurtosis of the role's gradient entries",
        "gradients.total_norm": "global gradient norm on the probe batch",
        "gradients.loss": "the probe loss the gradient is taken of",
    }

    def start(self) -> None:
        self.values: dict[str, float] = {}

    def add_model(self, model, probe) -> None:
        device = next(model.parameters()).device
        model.zero_grad(set_to_none=True)
        ids = probe.ids.to(device)
        total_tokens = ids.shape[0] * (ids.shape[1] - 1)
        loss_sum = 0.0
        with torch.enable_grad():
            for batch in ids.split(self.context.probe.batch_size):
                logits = model(input_ids=batch).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                (loss / total_tokens).backward()
                loss_sum += float(loss.detach())
        squares: dict[str, float] = defaultdict(float)
        moments: dict[str, Moments] = defaultdict(Moments)
        total = 0.0
        arch = self.context.architecture
        for name, param in model.named_parameters():
            if param.grad is None:
                continue
            grad = param.grad.detach().float()
            role = assign_role(arch, name)
            sq = float(grad.double().pow(2).sum())
            total += sq
            groups = [role.role] + (
                [f"layer{role.layer}.{role.role}"] if role.layer is not None else []
            )
            for group in groups:
                squares[group] += sq
            moments[role.role] = moments[role.role].merge(Moments.of(grad.reshape(-1), 4))
        model.zero_grad(set_to_none=True)
        values = {
            f"gradients.{g}.norm": math.sqrt(squares[g]) for g in sorted(squares, key=group_order)
        }
        for role in sorted(moments, key=group_order):
            values[f"gradients.{role}.kurtosis"] = moments[role].kurtosis
        values["gradients.total_norm"] = math.sqrt(total)
        values["gradients.loss"] = loss_sum / total_tokens
        if not all(math.isfinite(v) for v in (total, loss_sum)):
            self.warnings.append("gradients: non-finite loss or gradient")
            values = {k: (v if math.isfinite(v) else math.nan) for k, v in values.items()}
        self.values = values

    def finish(self) -> dict[str, float]:
        return dict(self.values)
