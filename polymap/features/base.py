"""What a feature set is, what it sees, and the registry that names them.

A feature set is a class registered under a name. One instance is made per checkpoint;
the extractor streams every parameter through :meth:`FeatureSet.add` (one tensor at a
time, as a :class:`Param` whose derived quantities are computed once and shared by all
sets), then once more through :meth:`FeatureSet.add_again` those tensors for which
:meth:`FeatureSet.wants_again` is True, then asks :meth:`FeatureSet.finish` for ``{"<set>.<name>":
float}``.

A set that needs the assembled model (a forward pass: native evals, activations,
gradients) sets ``needs_model = True`` and implements :meth:`FeatureSet.add_model`; the
extractor then loads the checkpoint once as a transformers model on the extraction device
and hands it, with the probe batch (:class:`~polymap.features.probe.Probe`), to every such
set. Such a set may raise :class:`FeatureUnavailableError` (e.g. not a causal LM); the row keeps
the other sets' features and records the reason as a warning.

Adding a metric in your own code::

    from polymap.features import FeatureSet, register_feature_set

    @register_feature_set
    class MaxAbs(FeatureSet):
        name = "maxabs"

        def start(self):
            self.value = 0.0

        def add(self, p):
            if p.role.kind == "weight":
                self.value = max(self.value, float(p.finite_values.abs().max()))

        def finish(self):
            return {"maxabs.value": self.value}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch

from polymap.checkpoints.reader import TensorReader
from polymap.checkpoints.ref import CheckpointRef
from polymap.errors import PolymapError, UsageError
from polymap.features.numerics import Moments, gram_eigenvalues
from polymap.roles import ROLES, Architecture, ParamRole


@dataclass
class CheckpointContext:
    """What a feature set may know about the checkpoint beyond its tensors."""

    ref: CheckpointRef
    config: dict | None
    architecture: Architecture
    device: torch.device
    initial: TensorReader | None = None  # the run's step-0 checkpoint, when there is one
    final: TensorReader | None = None  # the run's last checkpoint (for ``needs_final`` sets)
    directory: Path | None = None  # the local checkpoint directory
    probe: object | None = None  # polymap.features.probe.ProbeSpec for model-level sets


class FeatureUnavailableError(PolymapError, RuntimeError):
    """A feature set cannot be computed for this checkpoint (the reason is recorded)."""


class Param:
    """One tensor of the checkpoint with lazily computed, cached derived quantities.

    ``values`` is the tensor upcast to float32 on the extraction device (fp16/bf16 are
    upcast; fp32 is not copied). ``matrix`` views it as ``(shape[0], -1)``.
    """

    def __init__(
        self,
        name: str,
        role: ParamRole,
        raw: torch.Tensor,
        device: torch.device,
        initial: TensorReader | None = None,
        moment_order: int = 4,
        final: TensorReader | None = None,
    ):
        self.name = name
        self.moment_order = moment_order
        self.role = role
        self.raw = raw
        self.device = device
        self._initial_reader = initial
        self._final_reader = final

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    @property
    def numel(self) -> int:
        return self.raw.numel()

    @cached_property
    def values(self) -> torch.Tensor:
        return self.raw.to(device=self.device, dtype=torch.float32)

    @cached_property
    def nonfinite_count(self) -> int:
        if math.isfinite(float(self.values.sum())):  # fast path: a NaN/Inf poisons the sum
            return 0
        return int(self.numel - torch.isfinite(self.values).sum())

    @property
    def is_finite(self) -> bool:
        return self.nonfinite_count == 0

    @cached_property
    def finite_values(self) -> torch.Tensor:
        """The finite entries (flattened when any are not finite)."""
        v = self.values
        return v if self.is_finite else v[torch.isfinite(v)]

    @cached_property
    def moments(self) -> Moments:
        """Count, mean and central moments of the finite entries, up to the highest order
        any requested set declared (``FeatureSet.moment_order``); shared by all sets."""
        return Moments.of(self.finite_values, self.moment_order)

    @cached_property
    def matrix(self) -> torch.Tensor:
        v = self.values
        return v.reshape(v.shape[0], -1) if v.dim() else v.reshape(1, 1)

    @cached_property
    def gram_eigenvalues(self) -> torch.Tensor:
        """Squared singular values of :attr:`matrix` (float64, descending); NaN-filled when
        the matrix has non-finite entries."""
        if not self.is_finite:
            m = self.matrix
            return torch.full((min(m.shape),), float("nan"), dtype=torch.float64)
        return gram_eigenvalues(self.matrix).cpu()

    @cached_property
    def singular_values(self) -> torch.Tensor:
        return self.gram_eigenvalues.sqrt()

    def _counterpart(self, reader: TensorReader | None) -> torch.Tensor | None:
        if reader is None or self.name not in reader or reader.shape(self.name) != self.shape:
            return None
        return reader.get(self.name).to(device=self.device, dtype=torch.float32)

    @cached_property
    def initial(self) -> torch.Tensor | None:
        """This tensor in the run's step-0 checkpoint (float32, same device), if any."""
        return self._counterpart(self._initial_reader)

    @cached_property
    def final(self) -> torch.Tensor | None:
        """This tensor in the run's last checkpoint (float32, same device), if any."""
        return self._counterpart(self._final_reader)


class FeatureSet:
    """Base class of a feature set; see the module docstring."""

    name: ClassVar[str] = ""
    #: Highest central moment the set reads from ``Param.moments`` (0, 2 or 4).
    moment_order: ClassVar[int] = 0
    #: One line per feature pattern, for the docs and ``polymap features``.
    documentation: ClassVar[dict[str, str]] = {}
    #: True for sets computed from the assembled model (forward/backward passes).
    needs_model: ClassVar[bool] = False
    #: True for sets that compare with the run's step-0 checkpoint (``Param.initial``).
    needs_initial: ClassVar[bool] = False
    #: True for sets that compare with the run's last checkpoint (``Param.final``).
    needs_final: ClassVar[bool] = False

    def __init__(self, context: CheckpointContext):
        self.context = context
        self.warnings: list[str] = []  # recorded in the row's ``error`` column
        self.start()

    def start(self) -> None:
        """Reset per-checkpoint state."""

    def add(self, param: Param) -> None:
        if not self.needs_model:
            raise NotImplementedError

    def add_model(self, model, probe) -> None:
        """For ``needs_model`` sets: the checkpoint as a transformers model (eval mode, on
        the extraction device) and the probe (:class:`~polymap.features.probe.Probe`)."""

    def wants_again(self, name: str) -> bool:
        """After the first pass: does the set need tensor ``name`` once more?"""
        return False

    def add_again(self, param: Param) -> None:
        """Second look at the tensors for which :meth:`wants_again` said True."""

    def finish(self) -> dict[str, float]:
        raise NotImplementedError


_REGISTRY: dict[str, type[FeatureSet]] = {}
DEFAULT_FEATURE_SETS = ("hu2023", "weights", "spectral")


def register_feature_set(cls=None, *, replace: bool = False):
    """Class decorator: make a feature set available by its ``name``. Another class
    under a name already taken is an error (``replace=True`` to mean it); registering
    the same class again is harmless.

    >>> @register_feature_set                                   # doctest: +SKIP
    ... class MySet(FeatureSet): name = "myset"
    """

    def register(cls: type[FeatureSet]) -> type[FeatureSet]:
        if not cls.name or "." in cls.name:
            raise UsageError(f"feature set name {cls.name!r} must be non-empty and contain no '.'")
        known = _REGISTRY.get(cls.name)
        if known is not None and not replace and _qualname(known) != _qualname(cls):
            raise UsageError(
                f"feature set name {cls.name!r} is taken by {_qualname(known)}; pick another "
                f"name for {_qualname(cls)} or pass replace=True"
            )
        _REGISTRY[cls.name] = cls
        return cls

    return register if cls is None else register(cls)


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def feature_sets() -> dict[str, type[FeatureSet]]:
    """Registered feature sets by name."""
    return dict(_REGISTRY)


def get_feature_sets(names: str | list[str] | tuple[str, ...] | None) -> list[type[FeatureSet]]:
    """Look up feature sets by name (comma-separated string or list); None = defaults."""
    if names is None:
        names = DEFAULT_FEATURE_SETS
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise UsageError("no feature sets requested")
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise UsageError(f"unknown feature set(s) {unknown}; available: {sorted(_REGISTRY)}")
    return [_REGISTRY[n] for n in dict.fromkeys(names)]


def group_names(param: Param) -> list[str]:
    """The aggregation groups of a parameter: its role, and its (layer, role)."""
    role = param.role
    names = [role.role]
    if role.layer is not None:
        names.append(f"layer{role.layer}.{role.role}")
    return names


def group_order(name: str) -> tuple[int, int]:
    """Sort key of a group name: role aggregates first, then layers in order; roles in
    :data:`~polymap.roles.ROLES` order."""
    layer, _, role = name.rpartition(".")
    index = int(layer.removeprefix("layer")) if layer else -1
    return index, ROLES.index(role) if role in ROLES else len(ROLES)


def mean_ignoring_nan(values: list[float]) -> float:
    """Mean of the non-NaN values (NaN when there are none)."""
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")
