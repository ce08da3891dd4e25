"""``embedding``: structure of the input and output embeddings.

Embeddings learn their structure quickly, which makes them an early signal. Over the
token embedding (the largest ``embed`` matrix: ``embed_in``, ``wte``, ``embed_tokens``)
and the output embedding (``unembed``, when untied):

- ``in_norm`` / ``out_norm``: Frobenius norms;
- ``in_row_norm`` / ``out_row_norm``: mean L2 norm of a token's vector;
- ``in_cos_mean`` / ``out_cos_mean``: mean pairwise cosine similarity of a fixed token
  subset (the first ``TOKENS`` = 256 ids; anisotropy: near 0 at init, rising as the
  embedding collapses into a cone);
- ``in_struct_drift``: how far the subset's cosine-similarity structure has moved from
  step 0: ``1 - corr(C_t, C_0)`` over the off-diagonal entries (0 = unchanged), when the
  run's step-0 checkpoint is in the sweep.
"""

from __future__ import annotations

import math

import torch

from polymap.features.base import FeatureSet, Param, register_feature_set

TOKENS = 256


def cosine_matrix(rows: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows (float64)."""
    rows = rows.double()
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return unit @ unit.T


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    n = matrix.shape[0]
    return matrix[~torch.eye(n, dtype=torch.bool, device=matrix.device)]


def structure_drift(now: torch.Tensor, start: torch.Tensor) -> float:
    """``1 - Pearson correlation`` of two cosine matrices' off-diagonal entries.

    >>> x = torch.randn(20, 8)
    >>> round(structure_drift(cosine_matrix(x), cosine_matrix(x)), 9)
    0.0
    """
    a, b = off_diagonal(now), off_diagonal(start)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return max(0.0, 1.0 - float((a * b).sum()) / denominator) if denominator > 0 else math.nan


@register_feature_set
class Embedding(FeatureSet):
    name = "embedding"
    needs_initial = True
    documentation = {
        "embedding.in_norm / out_norm": "Frobenius norm of the input / output embedding",
        "embedding.in_row_norm / out_row_norm": "mean L2 norm of a token vector",
        "embedding.in_cos_mean / out_cos_mean": "mean pairwise cosine of the first 256 tokens",
        "embedding.in_struct_drift": "1 - corr of that cosine structure with step 0's",
    }

    def start(self) -> None:
        self.found: dict[str, tuple[int, Param]] = {}
        self.out: dict[str, float] = {}

    def add(self, param: Param) -> None:
        role = param.role
        if role.kind != "weight" or role.role not in ("embed", "unembed") or len(param.shape) != 2:
            return
        side = "in" if role.role == "embed" else "out"
        rows = param.shape[0]
        if side in self.found and self.found[side][0] >= rows:
            return  # keep the largest (token, not position) embedding
        self.found[side] = (rows, param)
        values = param.values
        prefix = f"embedding.{side}"
        stats = {
            f"{prefix}_norm": float(values.double().norm()),
            f"{prefix}_row_norm": float(values.double().norm(dim=1).mean()),
        }
        subset = values[: min(TOKENS, rows)]
        cos = cosine_matrix(subset)
        stats[f"{prefix}_cos_mean"] = (
            float(off_diagonal(cos).mean()) if len(subset) > 1 else math.nan
        )
        if side == "in":
            initial = param.initial
            stats[f"{prefix}_struct_drift"] = (
                structure_drift(cos, cosine_matrix(initial[: min(TOKENS, rows)]))
                if initial is not None and param.is_finite
                else math.nan
            )
        self.found[side] = (rows, None)  # drop the tensor; keep the size
        self.out = {k: v for k, v in self.out.items() if not k.startswith(prefix + "_")} | stats

    def finish(self) -> dict[str, float]:
        return dict(self.out)
