"""``spectral``: singular-value metrics of every 2-D weight matrix, from ONE decomposition.

Each matrix's squared singular values come from one float64 eigendecomposition of its
smaller Gram matrix (shared with ``hu2023``). Per matrix:

- ``spectral_norm``: largest singular value;
- ``stable_rank``: ``||W||_F^2 / ||W||_2^2``;
- ``erank``: entropy effective rank ``exp(-sum p_i log p_i)``, ``p_i = s_i / sum s``
  (Roy & Vetterli 2007);
- ``sv_mean``, ``sv_var``: mean and unbiased variance of the singular values;
- ``alpha``: power-law exponent of the empirical spectral density (eigenvalues of
  ``W^T W``) by continuous MLE at the KS-optimal xmin (WeightWatcher's definition; see
  :func:`polymap.features.numerics.powerlaw_alpha`);
- ``alpha_weighted``: ``alpha * log10(lambda_max)`` with ``lambda_max`` the largest
  eigenvalue of ``W^T W``.

Columns: ``spectral.<role>.<metric>.mean`` and ``.max`` over the role's matrices, and
``spectral.layer<L>.<role>.<metric>`` (mean over that layer's matrices of the role, e.g.
Llama's q, k and v). Matrices with non-finite entries are left out;
``spectral.nonfinite_matrices`` counts them.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from polymap.features.base import (
    FeatureSet,
    Param,
    group_order,
    mean_ignoring_nan,
    register_feature_set,
)
from polymap.features.numerics import powerlaw_alpha

METRICS = (
    "spectral_norm",
    "stable_rank",
    "erank",
    "sv_mean",
    "sv_var",
    "alpha",
    "alpha_weighted",
)


def matrix_spectrum(evals: torch.Tensor) -> dict[str, float]:
    """The spectral metrics of one matrix from its Gram eigenvalues (descending)."""
    evals = evals.to(torch.float64)
    sv = evals.sqrt()
    top = float(evals[0])
    total_sv = float(sv.sum())
    if total_sv > 0:
        p = sv[sv > 0] / total_sv
        erank = math.exp(float(-(p * p.log()).sum()))
    else:
        erank = math.nan
    alpha, _, _ = powerlaw_alpha(evals)
    return {
        "spectral_norm": math.sqrt(top),
        "stable_rank": float(evals.sum()) / top if top > 0 else math.nan,
        "erank": erank,
        "sv_mean": float(sv.mean()),
        "sv_var": float(sv.var()) if sv.numel() > 1 else math.nan,
        "alpha": alpha,
        "alpha_weighted": alpha * math.log10(top) if top > 0 else math.nan,
    }


@register_feature_set
class Spectral(FeatureSet):
    name = "spectral"
    documentation = {
        "spectral.<group>.spectral_norm": "largest singular value",
        "spectral.<group>.stable_rank": "||W||_F^2/||W||_2^2: how many directions carry mass",
        "spectral.<group>.erank": "entropy effective rank of the singular values",
        "spectral.<group>.sv_mean / sv_var": "mean and variance of the singular values",
        "spectral.<group>.alpha": "power-law exponent of the ESD (lower = heavier tail)",
        "spectral.<group>.alpha_weighted": "alpha * log10(lambda_max)",
        "spectral.nonfinite_matrices": "matrices left out for NaN/Inf entries",
    }

    def start(self) -> None:
        self.by_role: dict[str, list[dict[str, float]]] = defaultdict(list)
        self.by_layer: dict[str, list[dict[str, float]]] = defaultdict(list)
        self.nonfinite = 0

    def add(self, param: Param) -> None:
        if param.role.kind != "weight" or len(param.shape) != 2:
            return
        if not param.is_finite:
            self.nonfinite += 1
            return
        metrics = matrix_spectrum(param.gram_eigenvalues)
        self.by_role[param.role.role].append(metrics)
        if param.role.layer is not None:
            self.by_layer[f"layer{param.role.layer}.{param.role.role}"].append(metrics)

    def finish(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role in sorted(self.by_role, key=group_order):
            items = self.by_role[role]
            for metric in METRICS:
                values = [m[metric] for m in items]
                finite = [v for v in values if v == v]
                out[f"spectral.{role}.{metric}.mean"] = mean_ignoring_nan(values)
                out[f"spectral.{role}.{metric}.max"] = max(finite) if finite else math.nan
        for group in sorted(self.by_layer, key=group_order):
            items = self.by_layer[group]
            for metric in METRICS:
                out[f"spectral.{group}.{metric}"] = mean_ignoring_nan([m[metric] for m in items])
        out["spectral.nonfinite_matrices"] = float(self.nonfinite)
        return out
