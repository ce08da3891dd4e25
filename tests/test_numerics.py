"""The streaming statistics and spectra against straightforward computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polymap.features.numerics import Moments, StreamingMedian, gram_eigenvalues, powerlaw_alpha
from polymap.features.spectral import matrix_spectrum


def _median_of(parts):
    sm = StreamingMedian()
    for p in parts:
        sm.add(p)
    for p in parts:
        sm.add_again(p)
    return sm.value()


@pytest.mark.parametrize("seed", range(5))
def test_streaming_median_is_torch_lower_median(seed):
    g = torch.Generator().manual_seed(seed)
    parts = [
        torch.randn(int(n), generator=g) * 0.02 for n in torch.randint(1, 5000, (7,), generator=g)
    ]
    parts.append(torch.zeros(10))  # ties and a sign-of-zero corner
    parts.append(-parts[0][:50])
    expected = torch.cat(parts).median().item()
    assert _median_of(parts) == expected


def test_streaming_median_even_count_and_fp16_values():
    values = torch.tensor([4.0, 1.0, 3.0, 2.0])  # torch.median -> 2.0 (lower middle)
    assert _median_of([values]) == 2.0
    half = torch.randn(1001).half()
    assert _median_of([half.float()]) == half.float().median().item()


def test_moments_merge_matches_numpy():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_t(4, size=n) for n in (10, 1000, 3, 5000)]
    merged = Moments()
    for c in chunks:
        merged = merged.merge(Moments.of(torch.tensor(c, dtype=torch.float64)))
    allv = np.concatenate(chunks)
    d = allv - allv.mean()
    assert merged.n == allv.size
    assert merged.mean == pytest.approx(allv.mean(), rel=1e-12)
    assert merged.var == pytest.approx(allv.var(ddof=1), rel=1e-12)
    expected_kurt = (d**4).mean() / (d**2).mean() ** 2 - 3
    assert merged.kurtosis == pytest.approx(expected_kurt, rel=1e-10)


@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (64, 64), (7, 1)])
def test_gram_eigenvalues_are_squared_singular_values(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    sv = torch.linalg.svdvals(w.double())
    assert torch.allclose(gram_eigenvalues(w).sqrt(), sv, rtol=1e-6, atol=1e-10)


def reference_alpha(evals):
    """A plain loop over candidate xmins, as the powerlaw package defines the fit."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > 1e-5]
    best = (math.inf, math.nan)
    for xmin in np.unique(x)[:-1]:
        tail = x[x >= xmin]
        m = tail.size
        alpha = 1 + m / np.sum(np.log(tail / xmin))
        theory = 1 - (tail / xmin) ** (1 - alpha)
        empirical = np.arange(m) / m
        distance = np.max(np.abs(theory - empirical))
        if distance < best[0]:
            best = (distance, alpha)
    return best[1]


def test_alpha_matches_reference_on_known_matrices():
    rng = np.random.default_rng(3)
    heavy = rng.standard_t(2.5, size=(300, 120))  # heavy-tailed entries: heavy-tailed ESD
    gaussian = rng.standard_normal((300, 120))
    for w in (heavy, gaussian):
        evals = gram_eigenvalues(torch.tensor(w)).numpy()
        assert powerlaw_alpha(evals)[0] == pytest.approx(reference_alpha(evals), rel=1e-10)
    # A planted spectrum: eigenvalues exactly on a Pareto(alpha=3) quantile grid.
    u = (np.arange(500) + 0.5) / 500
    planted = (1 - u) ** (-1 / 2.0)
    assert powerlaw_alpha(planted)[0] == pytest.approx(reference_alpha(planted), rel=1e-10)
    assert powerlaw_alpha(planted)[0] == pytest.approx(3.0, abs=0.15)


def test_matrix_spectrum_values():
    w = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0]))
    m = matrix_spectrum(gram_eigenvalues(w))
    sv = np.array([4.0, 2.0, 1.0, 1.0])
    p = sv / sv.sum()
    assert m["spectral_norm"] == pytest.approx(4.0)
    assert m["stable_rank"] == pytest.approx((sv**2).sum() / 16)
    assert m["erank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert m["sv_mean"] == pytest.approx(2.0)
    assert m["sv_var"] == pytest.approx(sv.var(ddof=1))


@pytest.mark.parametrize("shift", [-1.0, 1.0, -1e-30, 0.0])
def test_streaming_median_one_signed_and_tiny_values(shift):
    g = torch.Generator().manual_seed(7)
    parts = [torch.rand(n, generator=g) * 1e-3 + shift for n in (999, 10, 2)]
    assert _median_of(parts) == torch.cat(parts).median().item()
