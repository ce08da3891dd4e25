"""``hu2023``: the 14 metrics behind the training maps of Hu et al. (2023) and PolyPythias.

Computed as the published PolyPythias extraction does, over the checkpoint's stored
parameter names (buffers such as GPT-NeoX's ``attention.bias`` causal mask excluded, as
``named_parameters()`` excludes them):

- skip a parameter whose name starts with ``embed`` or whose lower-cased name contains
  ``norm``. For GPT-NeoX (Pythia) this *keeps* ``gpt_neox.embed_in.weight`` and *skips*
  ``embed_out.weight``; for GPT-2 the LayerNorms (``ln_1``, ``ln_2``, ``ln_f``) have no
  ``norm`` in their names and are kept, as in the published rule;
- each ``*.weight`` is viewed as a matrix ``(shape[0], -1)``. Per matrix: ``l1`` (sum of
  |w|), ``l2`` (Frobenius norm), ``trace`` (sum of the diagonal of that matrix),
  ``lambda_max`` (largest singular value), ``l1_l2 = l1 / l2``,
  ``trace_lambda = trace / lambda_max``, ``mu_lambda`` and ``sigma_lambda`` (mean and
  unbiased variance of the singular values after setting those below 1e-5 to 0). Each is
  averaged over the weight matrices;
- ``mu_w``, ``median_w``, ``sigma_w``: mean, median (``torch.median``: the lower middle
  value) and unbiased variance of all weight entries together; ``mu_b``, ``median_b``,
  ``sigma_b`` the same over all ``*.bias`` entries.

Differences from a literal two-SVD implementation, all documented: singular values come
from one float64 eigendecomposition of the smaller Gram matrix (agreeing with ``torch.svd``
to ~1e-7 relative); the median is exact but computed by two-pass radix selection instead
of concatenating the model; a matrix with a single singular value (a 1-D weight) has no
variance and is left out of ``sigma_lambda``'s average (a literal implementation gets NaN
for the whole checkpoint); non-finite matrices are left out of the per-matrix averages and
non-finite entries out of the entry statistics, with ``hu2023.nonfinite_fraction``
recording their share.
"""

from __future__ import annotations

import math

import torch

from polymap.features.base import FeatureSet, Param, mean_ignoring_nan, register_feature_set
from polymap.features.numerics import Moments, StreamingMedian

SINGULAR_VALUE_FLOOR = 1e-5
MATRIX_METRICS = (
    "l1",
    "l2",
    "l1_l2",
    "trace",
    "lambda_max",
    "trace_lambda",
    "mu_lambda",
    "sigma_lambda",
)


def included(name: str) -> bool:
    """The published selection rule."""
    return not name.startswith("embed") and "norm" not in name.lower()


@register_feature_set
class Hu2023(FeatureSet):
    name = "hu2023"
    moment_order = 2
    documentation = {
        "hu2023.l1": "mean over weight matrices of sum |w| (overall weight scale)",
        "hu2023.l2": "mean Frobenius norm of the weight matrices",
        "hu2023.l1_l2": "mean l1/l2 ratio: how spread the mass is over entries",
        "hu2023.trace": "mean trace (diagonal sum) of the weight matrices",
        "hu2023.lambda_max": "mean largest singular value (spectral norm)",
        "hu2023.trace_lambda": "mean trace / largest singular value",
        "hu2023.mu_lambda": "mean over matrices of the mean singular value",
        "hu2023.sigma_lambda": "mean over matrices of the singular values' variance",
        "hu2023.mu_w / median_w / sigma_w": "mean, median, variance of all weight entries",
        "hu2023.mu_b / median_b / sigma_b": "mean, median, variance of all bias entries",
        "hu2023.nonfinite_fraction": "share of NaN/Inf entries among the included tensors",
    }

    def start(self) -> None:
        self.per_matrix: dict[str, list[float]] = {k: [] for k in MATRIX_METRICS}
        self.moments = {"w": Moments(), "b": Moments()}
        self.medians = {"w": StreamingMedian(), "b": StreamingMedian()}
        self.included: set[str] = set()
        self.total = 0
        self.nonfinite = 0

    @staticmethod
    def _group(param: Param) -> str | None:
        if param.role.kind == "buffer" or not included(param.name):
            return None
        if param.name.endswith("weight"):
            return "w"
        if param.name.endswith("bias"):
            return "b"
        return None

    def add(self, param: Param) -> None:
        group = self._group(param)
        if group is None:
            return
        self.included.add(param.name)
        self.total += param.numel
        self.nonfinite += param.nonfinite_count
        values = param.finite_values
        self.moments[group] = self.moments[group].merge(param.moments)
        self.medians[group].add(values)
        if group == "w" and param.is_finite:
            self._add_matrix(param)

    def _add_matrix(self, param: Param) -> None:
        m = param.matrix
        sv = param.singular_values
        l1 = sum(float(c.abs().sum()) for c in m.reshape(-1).split(1 << 22))
        l2 = math.sqrt(float(param.gram_eigenvalues.sum()))  # ||W||_F^2 = trace of the Gram
        trace = float(torch.diagonal(m).sum(dtype=torch.float64))
        lam = float(sv[0])
        floored = torch.where(sv < SINGULAR_VALUE_FLOOR, torch.zeros_like(sv), sv)
        values = {
            "l1": l1,
            "l2": l2,
            "l1_l2": l1 / l2 if l2 else math.nan,
            "trace": trace,
            "lambda_max": lam,
            "trace_lambda": trace / lam if lam else math.nan,
            "mu_lambda": float(floored.mean()),
            "sigma_lambda": float(floored.var()) if floored.numel() > 1 else math.nan,
        }
        for key, value in values.items():
            self.per_matrix[key].append(value)

    def wants_again(self, name: str) -> bool:
        return name in self.included  # the exact median needs a second look

    def add_again(self, param: Param) -> None:
        group = self._group(param)
        if group is not None:
            self.medians[group].add_again(param.finite_values)

    def finish(self) -> dict[str, float]:
        out = {f"hu2023.{k}": mean_ignoring_nan(v) for k, v in self.per_matrix.items()}
        for group in ("w", "b"):
            moments = self.moments[group]
            out[f"hu2023.mu_{group}"] = moments.mean if moments.n else math.nan
            out[f"hu2023.median_{group}"] = self.medians[group].value()
            out[f"hu2023.sigma_{group}"] = moments.var
        out["hu2023.nonfinite_fraction"] = self.nonfinite / self.total if self.total else math.nan
        return out
