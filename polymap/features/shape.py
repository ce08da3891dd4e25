"""``shape``: how far each role's weight distribution is from Gaussian, and which family fits.

Weights start Gaussian and grow heavy tails early in training, at different speeds for
attention QKV, attention output and MLP matrices. Per role (``shape.<role>.<stat>``),
over the role's weight matrices (norm gains excluded), each matrix standardised by its
own mean and standard deviation (so the shape, not the scale, is compared):

- ``kurtosis``: excess kurtosis from the exact streaming moments (0 for a Gaussian, 6/(nu-4)
  for a Student-t); also per layer (``shape.layer<L>.<role>.kurtosis``);
- ``nu``: Student-t degrees of freedom fitted by maximum likelihood (location, scale and
  nu together); nu -> infinity is Gaussian, reported capped at ``NU_MAX`` (1000);
- ``ks_gauss`` / ``ks_logistic``: Kolmogorov-Smirnov distance to the best Gaussian
  (mean, std) and to the moment-matched logistic (scale = std * sqrt(3) / pi);
- ``tail_ratio``: ``q(0.999) / q(0.99)`` of ``|z|`` (1.28 for a Gaussian, larger for
  heavier tails).

``nu``, the KS distances and ``tail_ratio`` are computed on a fixed-size subsample:
``SAMPLE_PER_MATRIX`` (4,096) entries per matrix drawn with a seed derived from the
tensor name, then at most ``SAMPLE_PER_ROLE`` (16,384) per role, so a checkpoint's shape
costs milliseconds whatever the model size, and the same checkpoint always gives the same
numbers. The subsampling error is measured in ``benchmarks/bench_features.py`` and the
tests (nu of a Student-t(5) sample of 16k: within ~10%).
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict

import numpy as np
import torch
from scipy import optimize, special, stats

from polymap.features.base import FeatureSet, Param, group_names, group_order, register_feature_set
from polymap.features.numerics import Moments

SAMPLE_PER_MATRIX = 4096
SAMPLE_PER_ROLE = 16384
NU_MAX = 1000.0
NU_MIN = 0.5
SKIP_ROLES = ("norm",)


def fit_student_t(x: np.ndarray, iterations: int = 12) -> tuple[float, float, float]:
    """Maximum-likelihood ``(nu, loc, scale)`` of a Student-t: a bounded 1-D search over
    log(nu) of the profile likelihood, with location and scale at each nu from EM
    updates (warm-started). ``nu`` is capped at ``NU_MAX``.

    >>> rng = np.random.default_rng(0)
    >>> nu, loc, scale = fit_student_t(rng.standard_t(4, 50_000))
    >>> round(nu)
    4
    """
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = x.size
    if n < 10 or np.ptp(x) == 0:
        return math.nan, math.nan, math.nan
    state = {"loc": float(np.median(x)), "scale": float(np.std(x)) or 1.0}

    def negative_loglik(log_nu: float) -> float:
        nu = math.exp(log_nu)
        loc, scale = state["loc"], state["scale"]
        for _ in range(iterations):  # EM for loc, scale at fixed nu
            d = ((x - loc) / scale) ** 2
            w = (nu + 1) / (nu + d)
            loc = float(np.sum(w * x) / np.sum(w))
            scale = math.sqrt(float(np.sum(w * (x - loc) ** 2)) / n) or 1e-12
        state["loc"], state["scale"] = loc, scale
        z2 = ((x - loc) / scale) ** 2
        ll = n * (
            special.gammaln((nu + 1) / 2)
            - special.gammaln(nu / 2)
            - 0.5 * math.log(nu * math.pi)
            - math.log(scale)
        ) - (nu + 1) / 2 * float(np.sum(np.log1p(z2 / nu)))
        return -ll

    result = optimize.minimize_scalar(
        negative_loglik,
        bounds=(math.log(NU_MIN), math.log(NU_MAX)),
        method="bounded",
        options={"xatol": 1e-3},
    )
    nu = min(math.exp(result.x), NU_MAX)
    negative_loglik(result.x)  # leave loc/scale at the optimum
    return nu, state["loc"], state["scale"]


def ks_distances(z: np.ndarray) -> tuple[float, float]:
    """KS distance of ``z`` to the fitted Gaussian and to the moment-matched logistic."""
    mean, std = float(np.mean(z)), float(np.std(z))
    if std == 0:
        return math.nan, math.nan
    gauss = stats.kstest(z, "norm", args=(mean, std)).statistic
    logistic = stats.kstest(z, "logistic", args=(mean, std * math.sqrt(3) / math.pi)).statistic
    return float(gauss), float(logistic)


def tail_ratio(z: np.ndarray) -> float:
    """``q(0.999) / q(0.99)`` of ``|z - median|``.

    >>> round(tail_ratio(np.random.default_rng(0).standard_normal(1_000_000)), 2)
    1.28
    """
    a = np.abs(z - np.median(z))
    q99, q999 = np.quantile(a, [0.99, 0.999])
    return float(q999 / q99) if q99 > 0 else math.nan


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


@register_feature_set
class Shape(FeatureSet):
    name = "shape"
    moment_order = 4
    documentation = {
        "shape.<role>.kurtosis": "excess kurtosis of the weights (0 = Gaussian); also per layer",
        "shape.<role>.nu": "Student-t degrees of freedom (MLE; large = Gaussian, small = heavy)",
        "shape.<role>.ks_gauss": "KS distance to the best-fitting Gaussian",
        "shape.<role>.ks_logistic": "KS distance to the moment-matched logistic",
        "shape.<role>.tail_ratio": "q(0.999)/q(0.99) of |w|: 1.28 Gaussian, more = heavy tails",
    }

    def start(self) -> None:
        self.moments: dict[str, Moments] = defaultdict(Moments)
        self.samples: dict[str, list[np.ndarray]] = defaultdict(list)

    def add(self, param: Param) -> None:
        role = param.role
        if role.kind != "weight" or role.role in SKIP_ROLES or len(param.shape) < 2:
            return
        moments = param.moments
        for group in group_names(param):
            self.moments[group] = self.moments[group].merge(moments)
        values = param.finite_values.reshape(-1)
        if values.numel() < 2 or moments.std == 0 or not math.isfinite(moments.std):
            return
        if values.numel() > SAMPLE_PER_MATRIX:
            generator = torch.Generator(device="cpu").manual_seed(_seed(param.name))
            index = torch.randint(values.numel(), (SAMPLE_PER_MATRIX,), generator=generator)
            values = values[index.to(values.device)]
        z = ((values.double() - moments.mean) / moments.std).cpu().numpy()
        self.samples[role.role].append(z)

    def finish(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for group in sorted(self.moments, key=group_order):
            out[f"shape.{group}.kurtosis"] = self.moments[group].kurtosis
        for role in sorted(self.samples, key=group_order):
            z = np.concatenate(self.samples[role])
            if z.size > SAMPLE_PER_ROLE:
                rng = np.random.default_rng(_seed(role))
                z = z[rng.choice(z.size, SAMPLE_PER_ROLE, replace=False)]
            nu, _, _ = fit_student_t(z)
            ks_gauss, ks_logistic = ks_distances(z)
            out[f"shape.{role}.nu"] = nu
            out[f"shape.{role}.ks_gauss"] = ks_gauss
            out[f"shape.{role}.ks_logistic"] = ks_logistic
            out[f"shape.{role}.tail_ratio"] = tail_ratio(z)
        return out
