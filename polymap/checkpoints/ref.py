"""`CheckpointRef`: what one checkpoint is (run, step, where), before anything is read."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from polymap.errors import PolymapError

# Checkpoint directory names that carry a training step.
_STEP_PATTERNS = (
    re.compile(r"^step[_-]?(\d+)$"),
    re.compile(r"^checkpoint[_-](\d+)$"),
    re.compile(r"^global_step[_-]?(\d+)$"),
    re.compile(r"^iter_(\d+)$"),
)

HUB_SCHEME = "hf://"
MAX_STEP = 2**63 - 1  # steps are stored as int64


class RefError(PolymapError, ValueError):
    """An unusable run name or step; the message says which value and why."""


def check_step(step, where: str = "step") -> int:
    """``step`` as an int in ``0 .. 2**63 - 1`` (what a Parquet int64 column holds).

    >>> check_step(1000)
    1000
    >>> check_step(-5)
    Traceback (most recent call last):
    polymap.checkpoints.ref.RefError: step -5: must be between 0 and 2**63 - 1
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise RefError(f"{where} {step!r}: not an integer")
    if not 0 <= int(step) <= MAX_STEP:
        text = str(step)
        text = text if len(text) <= 30 else f"{text[:20]}... ({len(text)} digits)"
        raise RefError(f"{where} {text}: must be between 0 and 2**63 - 1")
    return int(step)


def check_run(run, where: str = "run name") -> str:
    """A run name polymap can use as a folder name: non-empty, no path separator, not
    ``.`` or ``..``, no control characters.

    >>> check_run("pythia-160m")
    'pythia-160m'
    >>> check_run("../../escaped")
    Traceback (most recent call last):
    polymap.checkpoints.ref.RefError: run name '../../escaped': contains a path separator or '..'
    """
    if not isinstance(run, str) or not run.strip():
        raise RefError(f"{where} {run!r}: empty")
    if "/" in run or "\\" in run or run in (".", ".."):
        raise RefError(f"{where} {run!r}: contains a path separator or '..'")
    if any(ord(c) < 32 for c in run):
        raise RefError(f"{where} {run!r}: contains a control character")
    return run


_PYTHIA_V11 = re.compile(r"^pythia-v1\.1-(.+)$")


def run_name(name: str) -> str:
    """The run name of a Hub repository id, a cached repository or a folder path: its last
    component, with Pythia's v1.1 names mapped to today's. The one naming rule of
    checkpoint sources and eval results, so tables of the same run join.

    >>> run_name("EleutherAI/pythia-v1.1-160m-deduped")
    'pythia-160m-deduped'
    >>> run_name("runs/nano-seed3/")
    'nano-seed3'
    """
    name = name.rstrip("/").split("/")[-1]
    match = _PYTHIA_V11.match(name)
    return f"pythia-{match.group(1)}" if match else name


def parse_step(name: str) -> int | None:
    """The training step in a checkpoint directory (or revision) name, else None; a
    step outside ``0 .. 2**63 - 1`` is a :class:`RefError`.

    >>> [parse_step(n) for n in ("step1000", "checkpoint-1000", "global_step1000",
    ...                          "iter_0001000", "final")]
    [1000, 1000, 1000, 1000, None]
    """
    for pattern in _STEP_PATTERNS:
        match = pattern.match(name)
        if match:
            return check_step(int(match.group(1)), f"{name!r}: step")
    return None


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """One checkpoint of one run.

    ``location`` is a local directory (a Hugging Face model directory) or
    ``hf://ORG/NAME@REVISION`` for a checkpoint on the Hub.

    >>> CheckpointRef("seed0", 1000, "/runs/seed0/step1000").is_hub
    False
    """

    run: str
    step: int
    location: str
    seed: int | None = None
    model: str | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        check_run(self.run)
        object.__setattr__(self, "step", check_step(self.step, f"run {self.run!r}: step"))

    @property
    def is_hub(self) -> bool:
        return self.location.startswith(HUB_SCHEME)

    def __str__(self) -> str:
        return f"{self.run}@step{self.step} ({self.location})"
