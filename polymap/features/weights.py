"""``weights``: distribution statistics of the weight matrices, per role and per layer.

For every role (aggregated over all layers: ``weights.<role>.<stat>``) and every
(layer, role) (``weights.layer<L>.<role>.<stat>``), over the ``*.weight`` tensors:

- ``fro``: Frobenius norm of all entries together; ``rms``: root mean square;
- ``mean``, ``std`` (unbiased), ``kurtosis`` (excess; 0 for a Gaussian), from merged
  streaming moments, never a concatenation;
- ``max_abs``: largest |w|;
- ``outlier_frac``: share of entries further than 6 standard deviations from their own
  matrix's mean (each matrix judged against its own spread);
- ``rel_dist``: ``||W_t - W_0|| / ||W_0||`` against the run's step-0 checkpoint (all
  matrices of the group together), present only when the run has a step-0 checkpoint.

Also ``weights.<role>.bias_fro`` (Frobenius norm of the role's biases) and
``weights.nonfinite_fraction``. Non-finite entries are left out of every statistic.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from polymap.features.base import FeatureSet, Param, group_names, group_order, register_feature_set
from polymap.features.numerics import Moments

OUTLIER_SIGMAS = 6.0


@dataclass
class _Group:
    moments: Moments = field(default_factory=Moments)
    max_abs: float = 0.0
    outliers: int = 0
    diff_sq: float = 0.0
    init_sq: float = 0.0
    has_initial: bool = True


@register_feature_set
class Weights(FeatureSet):
    name = "weights"
    moment_order = 4
    needs_initial = True
    documentation = {
        "weights.<group>.fro": "Frobenius norm of the group's weights",
        "weights.<group>.rms": "root mean square weight",
        "weights.<group>.mean / std": "mean and standard deviation of the entries",
        "weights.<group>.kurtosis": "excess kurtosis: heavy tails appear as weights leave init",
        "weights.<group>.max_abs": "largest |w|: single large weights (outlier features)",
        "weights.<group>.outlier_frac": "share of entries beyond 6 std of their matrix",
        "weights.<group>.rel_dist": "||W_t - W_0|| / ||W_0||: how far from initialisation",
        "weights.<role>.bias_fro": "Frobenius norm of the role's biases",
        "weights.nonfinite_fraction": "share of NaN/Inf weight entries",
    }

    def start(self) -> None:
        self.groups: dict[str, _Group] = defaultdict(_Group)
        self.bias_sq: dict[str, float] = defaultdict(float)
        self.total = 0
        self.nonfinite = 0

    def add(self, param: Param) -> None:
        kind = param.role.kind
        if kind == "bias":
            values = param.finite_values
            self.bias_sq[param.role.role] += float((values * values).sum())
            return
        if kind != "weight":
            return
        self.total += param.numel
        self.nonfinite += param.nonfinite_count
        values = param.finite_values
        moments = param.moments
        if values.numel():
            max_abs = max(float(values.max()), -float(values.min()))
            spread = OUTLIER_SIGMAS * moments.std if moments.n > 1 else math.inf
            outliers = int((values > moments.mean + spread).sum()) + int(
                (values < moments.mean - spread).sum()
            )
        else:
            max_abs, outliers = math.nan, 0
        initial = param.initial
        if initial is not None and param.is_finite:
            diff_sq = sum(
                float(torch.sum((a - b) ** 2))
                for a, b in zip(
                    param.values.reshape(-1).split(1 << 22),
                    initial.reshape(-1).split(1 << 22),
                    strict=True,
                )
            )
            init_sq = float((initial * initial).sum())
        else:
            diff_sq = init_sq = math.nan
        for name in group_names(param):
            group = self.groups[name]
            group.moments = group.moments.merge(moments)
            group.max_abs = max(group.max_abs, max_abs)
            group.outliers += outliers
            if math.isnan(diff_sq):
                group.has_initial = False
            else:
                group.diff_sq += diff_sq
                group.init_sq += init_sq

    def finish(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in sorted(self.groups, key=group_order):
            g = self.groups[name]
            m = g.moments
            sum_sq = m.m2 + m.n * m.mean**2
            prefix = f"weights.{name}"
            out[f"{prefix}.fro"] = math.sqrt(sum_sq)
            out[f"{prefix}.rms"] = math.sqrt(sum_sq / m.n) if m.n else math.nan
            out[f"{prefix}.mean"] = m.mean if m.n else math.nan
            out[f"{prefix}.std"] = m.std
            out[f"{prefix}.kurtosis"] = m.kurtosis
            out[f"{prefix}.max_abs"] = g.max_abs
            out[f"{prefix}.outlier_frac"] = g.outliers / m.n if m.n else math.nan
            if g.has_initial and g.init_sq > 0:
                out[f"{prefix}.rel_dist"] = math.sqrt(g.diff_sq / g.init_sq)
        for role, sq in sorted(self.bias_sq.items(), key=lambda kv: group_order(kv[0])):
            out[f"weights.{role}.bias_fro"] = math.sqrt(sq)
        out["weights.nonfinite_fraction"] = self.nonfinite / self.total if self.total else math.nan
        return out
