"""Streaming statistics and spectra, written once and shared by the feature sets.

- :class:`Moments`: count, mean and central moments up to 4, mergeable (Chan et al.), so
  statistics of "all weights of a role" never need the weights concatenated.
- :class:`StreamingMedian`: the exact lower median (``torch.median``'s definition) of
  many tensors in two passes with a fixed 2 x 65,536-bin histogram, by radix selection
  on the float32 bit pattern.
- :func:`gram_eigenvalues`: the eigenvalues of the smaller Gram matrix in float64,
  accumulated over row blocks; their square roots are the singular values. ONE
  decomposition per matrix serves every spectral metric.
- :func:`powerlaw_alpha`: the power-law exponent of an eigenvalue spectrum by the
  continuous MLE at the xmin minimising the Kolmogorov-Smirnov distance, vectorised
  over all candidate xmins.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

# WeightWatcher drops eigenvalues below this before fitting the power law.
EVALS_THRESHOLD = 1e-5
_GRAM_BLOCK_ELEMENTS = 1 << 22


@dataclass
class Moments:
    """Count, mean and central moment sums (M2, M3, M4) of a stream of values.

    >>> m = Moments.of(torch.tensor([1.0, 2.0, 3.0])).merge(Moments.of(torch.tensor([4.0])))
    >>> m.n, m.mean, round(m.var, 6)
    (4, 2.5, 1.666667)
    """

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    @classmethod
    def of(cls, x: torch.Tensor) -> Moments:
        """Moments of the (finite) entries of ``x``."""
        n = x.numel()
        if n == 0:
            return cls()
        mean = float(x.sum(dtype=torch.float64)) / n
        d = x - mean
        d2 = d * d
        return cls(
            n,
            mean,
            float(d2.sum(dtype=torch.float64)),
            float((d2 * d).sum(dtype=torch.float64)),
            float((d2 * d2).sum(dtype=torch.float64)),
        )

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of both streams."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        a, b = self.n, other.n
        mean = self.mean + delta * b / n
        m2 = self.m2 + other.m2 + delta**2 * a * b / n
        m3 = (
            self.m3
            + other.m3
            + delta**3 * a * b * (a - b) / n**2
            + 3 * delta * (a * other.m2 - b * self.m2) / n
        )
        m4 = (
            self.m4
            + other.m4
            + delta**4 * a * b * (a * a - a * b + b * b) / n**3
            + 6 * delta**2 * (a * a * other.m2 + b * b * self.m2) / n**2
            + 4 * delta * (a * other.m3 - b * self.m3) / n
        )
        return Moments(n, mean, m2, m3, m4)

    @property
    def var(self) -> float:
        """Unbiased variance (NaN for fewer than two values)."""
        return self.m2 / (self.n - 1) if self.n > 1 else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.n > 1 else math.nan

    @property
    def kurtosis(self) -> float:
        """Excess kurtosis (population definition; 0 for a Gaussian)."""
        if self.n < 2 or self.m2 <= 0:
            return math.nan
        return self.n * self.m4 / (self.m2 * self.m2) - 3.0


def _sortable_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys whose order is the order of the float32 values."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _key_to_float(key: int) -> float:
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return struct.unpack("<f", struct.pack("<i", bits))[0]


class StreamingMedian:
    """Exact lower median of the values of many tensors, in two passes.

    Pass 1 (:meth:`add`) histograms the top 16 bits of each value's sortable key; the
    bin holding rank ``(n - 1) // 2`` is then known, and pass 2 (:meth:`add_again`, the
    same tensors again) histograms the low 16 bits of the values in that bin. Memory is
    two 65,536-bin histograms, whatever the number of values.

    >>> sm = StreamingMedian()
    >>> for t in (torch.tensor([5.0, -1.0]), torch.tensor([3.0, 2.0])):
    ...     sm.add(t)
    >>> for t in (torch.tensor([5.0, -1.0]), torch.tensor([3.0, 2.0])):
    ...     sm.add_again(t)
    >>> sm.value()
    2.0
    """

    def __init__(self) -> None:
        self.n = 0
        self._high = torch.zeros(65536, dtype=torch.int64)
        self._low: torch.Tensor | None = None
        self._bin = -1
        self._rank = -1

    def add(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        high = (_sortable_keys(x) >> 16) + 32768
        self._high += torch.bincount(high.flatten(), minlength=65536).cpu()
        self.n += x.numel()

    def _prepare(self) -> None:
        k = (self.n - 1) // 2
        cumulative = torch.cumsum(self._high, 0)
        self._bin = int(torch.searchsorted(cumulative, torch.tensor(k), right=True))
        self._rank = k - (int(cumulative[self._bin - 1]) if self._bin > 0 else 0)
        self._low = torch.zeros(65536, dtype=torch.int64)

    def add_again(self, x: torch.Tensor) -> None:
        if self.n == 0 or x.numel() == 0:
            return
        if self._low is None:
            self._prepare()
        keys = _sortable_keys(x).flatten()
        inside = keys[(keys >> 16) + 32768 == self._bin]
        if inside.numel():
            self._low += torch.bincount(inside & 0xFFFF, minlength=65536).cpu()

    def value(self) -> float:
        if self.n == 0:
            return math.nan
        if self._low is None:
            raise RuntimeError("StreamingMedian.value() before the second pass")
        cumulative = torch.cumsum(self._low, 0)
        low = int(torch.searchsorted(cumulative, torch.tensor(self._rank), right=True))
        return _key_to_float((self._bin - 32768) * 65536 + low)


def gram_eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending, clipped at 0) of the smaller Gram matrix of ``matrix``,
    i.e. its squared singular values, computed in float64 over row blocks so that only
    one block is upcast at a time.

    >>> w = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    >>> gram_eigenvalues(w).tolist()
    [16.0, 9.0]
    """
    rows, cols = matrix.shape
    tall = matrix if rows >= cols else matrix.T
    size = tall.shape[1]
    gram = torch.zeros(size, size, dtype=torch.float64, device=matrix.device)
    block = max(1, _GRAM_BLOCK_ELEMENTS // max(size, 1))
    for start in range(0, tall.shape[0], block):
        part = tall[start : start + block].to(torch.float64)
        gram.addmm_(part.T, part)
    evals = torch.linalg.eigvalsh(gram)
    return evals.flip(0).clamp_min(0.0)


def powerlaw_alpha(evals: np.ndarray | torch.Tensor) -> tuple[float, float, float]:
    """Fit a power law to the tail of an eigenvalue spectrum (WeightWatcher's alpha).

    Eigenvalues at or below :data:`EVALS_THRESHOLD` are dropped. For every candidate
    ``xmin`` (each distinct eigenvalue but the largest), alpha is the continuous MLE
    ``1 + m / sum(log(x_i / xmin))`` over the ``m`` eigenvalues ``>= xmin``, and the
    Kolmogorov-Smirnov distance is ``max_j |(1 - (x_j / xmin)^(1 - alpha)) - j / m|``
    over the sorted tail (the empirical CDF of the ``powerlaw`` package). The xmin with
    the smallest distance wins. Returns ``(alpha, xmin, D)``; NaNs when fewer than
    three eigenvalues remain.

    >>> rng = np.random.default_rng(0)
    >>> sample = (1 - rng.random(20000)) ** (-1 / 1.5)       # Pareto, alpha = 2.5
    >>> round(powerlaw_alpha(sample)[0], 1)
    2.5
    """
    x = torch.as_tensor(evals).detach().to("cpu", torch.float64).numpy()
    x = np.sort(x[np.isfinite(x) & (x > EVALS_THRESHOLD)])
    n = x.size
    if n < 3:
        return math.nan, math.nan, math.nan
    logx = np.log(x)
    # Candidates: first occurrence of each distinct value, excluding the largest value.
    first = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
    first = first[x[first] < x[-1]]
    if first.size == 0:
        return math.nan, math.nan, math.nan
    suffix = np.cumsum(logx[::-1])[::-1]  # suffix[i] = sum(logx[i:])
    tail = n - first
    sum_log_ratio = suffix[first] - tail * logx[first]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + tail / sum_log_ratio
    distances = np.full(first.size, np.inf)
    j = np.arange(n)
    rows_per_block = max(1, (1 << 22) // n)
    for lo in range(0, first.size, rows_per_block):
        idx = first[lo : lo + rows_per_block]
        a = alphas[lo : lo + rows_per_block, None]
        rel = j[None, :] - idx[:, None]  # position inside the tail
        with np.errstate(over="ignore", invalid="ignore"):
            theory = 1.0 - np.exp((1.0 - a) * (logx[None, :] - logx[idx][:, None]))
        empirical = rel / tail[lo : lo + rows_per_block, None]
        gap = np.where(rel >= 0, np.abs(theory - empirical), -np.inf)
        distances[lo : lo + rows_per_block] = gap.max(axis=1)
    distances[~np.isfinite(alphas)] = np.inf
    best = int(np.argmin(distances))
    if not np.isfinite(distances[best]):
        return math.nan, math.nan, math.nan
    return float(alphas[best]), float(x[first[best]]), float(distances[best])
