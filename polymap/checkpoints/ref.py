"""`CheckpointRef`: what one checkpoint is (run, step, where), before anything is read."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Checkpoint directory names that carry a training step.
_STEP_PATTERNS = (
    re.compile(r"^step[_-]?(\d+)$"),
    re.compile(r"^checkpoint[_-](\d+)$"),
    re.compile(r"^global_step[_-]?(\d+)$"),
    re.compile(r"^iter_(\d+)$"),
)

HUB_SCHEME = "hf://"


def parse_step(name: str) -> int | None:
    """The training step in a checkpoint directory (or revision) name, else None.

    >>> [parse_step(n) for n in ("step1000", "checkpoint-1000", "global_step1000",
    ...                          "iter_0001000", "final")]
    [1000, 1000, 1000, 1000, None]
    """
    for pattern in _STEP_PATTERNS:
        match = pattern.match(name)
        if match:
            return int(match.group(1))
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

    @property
    def is_hub(self) -> bool:
        return self.location.startswith(HUB_SCHEME)

    def __str__(self) -> str:
        return f"{self.run}@step{self.step} ({self.location})"
