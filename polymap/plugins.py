"""What the user registered in this process, shipped to the workers that extract.

A feature set (:func:`polymap.features.register_feature_set`) or an architecture
(:func:`polymap.roles.register_architecture`) registered in a notebook, a script or the
user's own package exists in the driver's registries only: a fresh worker process (the
``process`` executor spawns them; Ray's run elsewhere) imports polymap and knows its
built-ins. Every extraction task therefore carries a :class:`Registrations`: the
registered entries that are not polymap's own, serialised with cloudpickle *by value*
(a class from ``__main__``, a notebook cell, a test module or a package that the worker's
interpreter cannot import arrives whole), and :meth:`Registrations.install` re-registers
them in the worker before it looks names up.

Safety: this is in-memory transport from the driver to the workers it started, the same
trust as the pickling that multiprocessing and Ray already apply to every task argument;
nothing here reads a file, and saved polymap artefacts stay JSON + npz + Parquet.

>>> Registrations.current() is None or isinstance(Registrations.current(), Registrations)
True
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import cloudpickle


@dataclass(frozen=True)
class Registrations:
    """Feature-set classes and architecture tables that are not built into polymap."""

    feature_sets: tuple[type, ...] = ()
    architectures: tuple[object, ...] = ()

    @classmethod
    def current(cls) -> Registrations | None:
        """This process's own registrations; ``None`` when there are none."""
        from polymap.features.base import feature_sets
        from polymap.roles import added_architectures

        own = tuple(c for c in feature_sets().values() if not _is_builtin(c))
        archs = tuple(added_architectures())
        return cls(own, archs) if own or archs else None

    def install(self) -> None:
        """Register everything here in this process (what the driver has wins)."""
        from polymap.features.base import register_feature_set
        from polymap.roles import register_architecture

        for arch in self.architectures:
            register_architecture(arch, replace=True)
        for feature_set in self.feature_sets:
            register_feature_set(feature_set, replace=True)

    def __reduce__(self):
        # by value: the defining modules may not be importable where the task runs
        already = set(cloudpickle.list_registry_pickle_by_value())
        modules = {c.__module__ for c in self.feature_sets} - already - {"__main__"}
        modules = [sys.modules[m] for m in sorted(modules) if m in sys.modules]
        for module in modules:
            cloudpickle.register_pickle_by_value(module)
        try:
            payload = cloudpickle.dumps((self.feature_sets, self.architectures))
        finally:
            for module in modules:
                cloudpickle.unregister_pickle_by_value(module)
        return (_restore, (payload,))


def _restore(payload: bytes) -> Registrations:
    feature_sets, architectures = cloudpickle.loads(payload)
    return Registrations(tuple(feature_sets), tuple(architectures))


def _is_builtin(cls: type) -> bool:
    return cls.__module__ == "polymap" or cls.__module__.startswith("polymap.")
