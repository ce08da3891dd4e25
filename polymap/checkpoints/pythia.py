"""Catalogue of the Pythia and PolyPythias runs on the Hugging Face Hub.

Pythia (Biderman et al. 2023) saved 154 checkpoints per run: step 0, log-spaced steps
1, 2, 4, ..., 512 and then every 1,000 steps to 143,000, each as a Hub *revision*
``step<N>``. The published evaluations use a 27-step subset. PolyPythias
(van der Wal et al., ICLR 2025) retrained the 14M-410M models with seeds 1-9; seed 0 is
the original run. Its repositories are named ``EleutherAI/pythia-<size>-seed<S>``, and
for some sizes ``-data-seed<S>`` / ``-weight-seed<S>`` runs vary only one source of
randomness.

>>> len(pythia_steps()), len(pythia_eval_steps())
(154, 27)
>>> polypythias_repos(["410m"], seeds=[0, 3])
['EleutherAI/pythia-410m', 'EleutherAI/pythia-410m-seed3']
>>> parse_pythia_repo("EleutherAI/pythia-160m-seed3")
{'model': '160m', 'seed': 3, 'variant': 'seed'}
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from polymap.errors import UsageError

ORG = "EleutherAI"
PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
POLYPYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m")
POLYPYTHIA_SEEDS = tuple(range(10))

_REPO = re.compile(
    r"^(?:EleutherAI/)?pythia-(?:v1\.1-)?(?P<size>[\d.]+[mb])"
    r"(?P<deduped>-deduped)?(?:-(?P<variant>seed|data-seed|weight-seed)(?P<seed>\d+))?(?:-.*)?$"
)


def pythia_steps() -> list[int]:
    """The 154 checkpoint steps of every Pythia / PolyPythias run."""
    return [0] + [2**i for i in range(10)] + list(range(1000, 143_001, 1000))


def pythia_eval_steps() -> list[int]:
    """The 27 steps of the published Pythia evaluations."""
    return [0] + [2**i for i in range(10)] + [1000, 3000] + list(range(13_000, 143_001, 10_000))


def pythia_repo(size: str, seed: int = 0, deduped: bool = False, variant: str = "seed") -> str:
    """Repository id of one run; seed 0 of the plain variant is the original Pythia run."""
    if size not in PYTHIA_SIZES:
        raise UsageError(f"size={size!r} is not one of {PYTHIA_SIZES}")
    if variant not in ("seed", "data-seed", "weight-seed"):
        raise UsageError(f"variant={variant!r} is not one of ('seed', 'data-seed', 'weight-seed')")
    name = f"pythia-{size}" + ("-deduped" if deduped else "")
    if seed or variant != "seed":
        name += f"-{variant}{seed}"
    return f"{ORG}/{name}"


def polypythias_repos(sizes: Iterable[str], seeds: Iterable[int] = POLYPYTHIA_SEEDS) -> list[str]:
    """Repository ids of the PolyPythias runs for the given sizes and seeds."""
    out = []
    for size in sizes:
        if size not in POLYPYTHIA_SIZES:
            raise UsageError(f"PolyPythias size {size!r} is not one of {POLYPYTHIA_SIZES}")
        out.extend(pythia_repo(size, seed) for seed in seeds)
    return out


def parse_pythia_repo(repo_id: str) -> dict | None:
    """``{'model', 'seed', 'variant'}`` for a Pythia repository id, else None."""
    match = _REPO.match(repo_id)
    if not match:
        return None
    model = match["size"] + ("-deduped" if match["deduped"] else "")
    return {
        "model": model,
        "seed": int(match["seed"]) if match["seed"] else 0,
        "variant": match["variant"] or "seed",
    }
