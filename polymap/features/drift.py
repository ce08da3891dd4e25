"""``drift``: how close each checkpoint is to where its run ends and where it began.

Singular-vector directions agree with the final model only late in training, and runs
that will go wrong drift differently. For each checkpoint, against the run's last
checkpoint in the sweep (its final one; documented fallback: the latest present) and its
step-0 checkpoint, reading two (three) checkpoints at a time, one tensor at a time:

- ``drift.<role>.rel_dist_final``: ``||W_t - W_T|| / ||W_T||`` over the role's matrices;
- ``drift.<role>.rel_dist_init``: ``||W_t - W_0|| / ||W_0||``;
- ``drift.layer<L>.<role>.subspace_final`` (roles in ``SUBSPACE_ROLES``) and its mean
  over layers ``drift.<role>.subspace_final``: overlap of the top-``K`` right singular
  vectors with the final model's, ``||V_t^T V_T||_F^2 / K`` in [0, 1] (1 = same
  subspace; ``K / n`` expected for random subspaces of an ``n``-dimensional input). The
  top singular vectors come from ``torch.svd_lowrank`` (randomised, fixed seed, 4 power
  iterations), accurate for the leading directions.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from polymap.features.base import FeatureSet, Param, group_order, register_feature_set

K = 8
SUBSPACE_ROLES = ("attn_qkv", "mlp_in")
DISTANCE_ROLES = ("embed", "unembed", "attn_qkv", "attn_out", "mlp_in", "mlp_out")


def top_right_singular_vectors(matrix: torch.Tensor, k: int = K) -> torch.Tensor:
    """``(n, k)`` orthonormal top right singular vectors of an ``(m, n)`` matrix."""
    k = min(k, *matrix.shape)
    torch.manual_seed(0)
    if min(matrix.shape) <= 4 * k:
        return torch.linalg.svd(matrix.double(), full_matrices=False).Vh[:k].T
    _, _, v = torch.svd_lowrank(matrix.double(), q=k + 8, niter=4)
    return v[:, :k]


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||A^T B||_F^2 / k`` for orthonormal ``(n, k)`` bases: mean squared cosine of the
    principal angles.

    >>> q = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64)).Q
    >>> round(subspace_overlap(q, q), 6)
    1.0
    """
    k = min(a.shape[1], b.shape[1])
    return float((a.T @ b).pow(2).sum()) / k if k else math.nan


@register_feature_set
class Drift(FeatureSet):
    name = "drift"
    needs_initial = True
    needs_final = True
    documentation = {
        "drift.<role>.rel_dist_final": "||W_t - W_final|| / ||W_final||: distance to the end",
        "drift.<role>.rel_dist_init": "||W_t - W_0|| / ||W_0||: distance from initialisation",
        "drift.<role>.subspace_final": "overlap of top-8 singular directions with the final",
    }

    def start(self) -> None:
        self.sq = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, True, True])  # dF, F, d0, 0, hasF, has0
        self.overlap: dict[str, list[float]] = defaultdict(list)

    def add(self, param: Param) -> None:
        role = param.role
        if role.kind != "weight" or role.role not in DISTANCE_ROLES or len(param.shape) < 2:
            return
        acc = self.sq[role.role]
        values = param.values
        final, initial = param.final, param.initial
        finite = param.is_finite
        if final is not None and finite:
            acc[0] += float((values - final).double().pow(2).sum())
            acc[1] += float(final.double().pow(2).sum())
        else:
            acc[4] = False
        if initial is not None and finite:
            acc[2] += float((values - initial).double().pow(2).sum())
            acc[3] += float(initial.double().pow(2).sum())
        else:
            acc[5] = False
        if role.role in SUBSPACE_ROLES and final is not None and finite and role.layer is not None:
            overlap = subspace_overlap(
                top_right_singular_vectors(param.matrix), top_right_singular_vectors(
                    final.reshape(final.shape[0], -1))
            )  # fmt: skip
            self.overlap[f"layer{role.layer}.{role.role}"].append(overlap)
            self.overlap[role.role].append(overlap)

    def finish(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role in sorted(self.sq, key=group_order):
            d_final, final, d_init, init, has_final, has_init = self.sq[role]
            if has_final and final > 0:
                out[f"drift.{role}.rel_dist_final"] = math.sqrt(d_final / final)
            if has_init and init > 0:
                out[f"drift.{role}.rel_dist_init"] = math.sqrt(d_init / init)
        for group in sorted(self.overlap, key=group_order):
            values = self.overlap[group]
            out[f"drift.{group}.subspace_final"] = sum(values) / len(values)
        return out
