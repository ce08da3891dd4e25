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
import sys
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import blas, eigvalsh

# WeightWatcher drops eigenvalues below this before fitting the power law.
EVALS_THRESHOLD = 1e-5
_GRAM_BLOCK_ELEMENTS = 1 << 22
_CHUNK = 1 << 22


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
    def of(cls, x: torch.Tensor, order: int = 4) -> Moments:
        """Moments of the entries of ``x`` up to ``order`` (2 or 4; higher sums are 0).

        Computed over chunks of ~4M entries merged exactly, so temporaries stay small
        whatever the tensor's size. Sums run in the tensor's dtype with torch's pairwise
        reduction; the chunk mean is subtracted first so central moments do not cancel.
        """
        flat = x.reshape(-1)
        total = cls()
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start : start + _CHUNK]
            n = chunk.numel()
            mean = float(chunk.sum()) / n
            d = chunk - mean
            d2 = d * d
            if order >= 4:
                part = cls(n, mean, float(d2.sum()), float((d2 * d).sum()), float((d2 * d2).sum()))
            else:
                part = cls(n, mean, float(d2.sum()))
            total = total.merge(part)
        return total

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


_HIGH, _LOW = (1, 0) if sys.byteorder == "little" else (0, 1)
# Raw 16-bit pattern u -> rank of its half in float order: negatives (sign bit set) count
# down from the most negative, positives count up.
_U16 = np.arange(65536)
_RANK_OF_RAW = np.where(_U16 < 32768, _U16 + 32768, 65535 - _U16)
_RAW_OF_RANK = np.argsort(_RANK_OF_RAW)


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 16-bit halves of the float32 bit patterns of ``x`` (views, no copy)."""
    pairs = x.to(torch.float32).contiguous().view(torch.int16).view(-1, 2)
    return pairs[:, _HIGH], pairs[:, _LOW]


def _histogram_u16(halves: torch.Tensor) -> np.ndarray:
    """Counts of each raw 16-bit pattern (index = pattern as unsigned)."""
    if halves.device.type == "cpu":
        return np.bincount(halves.numpy().view(np.uint16), minlength=65536)
    counts = torch.bincount(halves.to(torch.int32) & 0xFFFF, minlength=65536)
    return counts.cpu().numpy()


class StreamingMedian:
    """Exact lower median of the values of many tensors, in two passes.

    Radix selection on the float32 bit patterns: pass 1 (:meth:`add`) counts the high 16
    bits (sign, exponent, top of the mantissa) of every value; the high pattern holding
    rank ``(n - 1) // 2`` in float order is then known, and pass 2 (:meth:`add_again`, the
    same tensors again) counts the low 16 bits of the values that share it. Memory is two
    65,536-bin histograms, whatever the number of values; -0.0 and 0.0 compare equal.

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
        self._high = np.zeros(65536, dtype=np.int64)
        self._low: np.ndarray | None = None
        self._target = -1  # raw high pattern of the median
        self._rank = -1  # rank of the median among values with that pattern

    def add(self, x: torch.Tensor) -> None:
        if x.numel():
            self._high += _histogram_u16(_halves(x)[0])
            self.n += x.numel()

    def _prepare(self) -> None:
        k = (self.n - 1) // 2
        cumulative = np.cumsum(self._high[_RAW_OF_RANK])  # in float order
        rank_bin = int(np.searchsorted(cumulative, k, side="right"))
        self._rank = k - (int(cumulative[rank_bin - 1]) if rank_bin else 0)
        self._target = int(_RAW_OF_RANK[rank_bin])
        self._low = np.zeros(65536, dtype=np.int64)

    def add_again(self, x: torch.Tensor) -> None:
        if self.n == 0 or x.numel() == 0:
            return
        if self._low is None:
            self._prepare()
        high, low = _halves(x)
        target = self._target - 65536 if self._target >= 32768 else self._target  # as int16
        inside = low[high == target]
        if inside.numel():
            self._low += _histogram_u16(inside)

    def value(self) -> float:
        if self.n == 0:
            return math.nan
        if self._low is None:
            raise RuntimeError("StreamingMedian.value() before the second pass")
        negative = self._target >= 32768  # sign bit: larger low bits mean smaller values
        counts = self._low[::-1] if negative else self._low
        position = int(np.searchsorted(np.cumsum(counts), self._rank, side="right"))
        low = 65535 - position if negative else position
        return struct.unpack("<f", struct.pack("<I", (self._target << 16) | low))[0]


def gram_eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending, clipped at 0) of the smaller Gram matrix of ``matrix``,
    i.e. its squared singular values, computed in float64 over blocks so that only one
    block is upcast at a time.

    On the CPU the Gram matrix is accumulated with BLAS ``dsyrk`` (a symmetric product:
    half the flops of a general matrix product) and diagonalised with LAPACK through
    SciPy; on a GPU with torch.

    >>> w = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    >>> gram_eigenvalues(w).tolist()
    [16.0, 9.0]
    """
    if matrix.device.type == "cpu":
        return _gram_eigenvalues_cpu(matrix)
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


def _gram_eigenvalues_cpu(matrix: torch.Tensor) -> torch.Tensor:
    a = matrix.detach().contiguous().numpy()
    rows, cols = a.shape
    size = min(rows, cols)
    gram = np.zeros((size, size), dtype=np.float64, order="F")
    block = max(1, _GRAM_BLOCK_ELEMENTS // max(size, 1))
    if rows >= cols:  # G = A^T A: blocks of rows; part.T is Fortran-ordered, no copy
        for start in range(0, rows, block):
            part = a[start : start + block].astype(np.float64)
            gram = blas.dsyrk(1.0, part.T, beta=1.0, c=gram, trans=0, overwrite_c=1)
    else:  # G = A A^T: blocks of columns
        for start in range(0, cols, block):
            part = np.ascontiguousarray(a[:, start : start + block], dtype=np.float64)
            gram = blas.dsyrk(1.0, part.T, beta=1.0, c=gram, trans=1, overwrite_c=1)
    evals = eigvalsh(gram, lower=False, check_finite=False, overwrite_a=True, driver="evr")
    return torch.from_numpy(evals[::-1].copy()).clamp_min(0.0)


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
