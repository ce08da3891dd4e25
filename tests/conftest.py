"""Shared fixtures: tiny real checkpoints written by transformers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from polymap.suite import build
from polymap.synthetic import ARCHS, make_tiny_run

# The real published data beside the checkout (../shared/data, see its README), resolved
# from this file, not from the working directory; POLYMAP_SHARED_DATA points elsewhere
# (CI points it nowhere once to check that every data test skips rather than fails).
SHARED_DATA = Path(
    os.environ.get("POLYMAP_SHARED_DATA", Path(__file__).resolve().parents[1] / "../shared/data")
).resolve()
PYTHIA_EVALS = SHARED_DATA / "pythia-evals" / "pythia-v1"


@pytest.fixture
def pythia_evals() -> Path:
    """The published Pythia lm-eval results (../shared/data); the test skips without them."""
    if not PYTHIA_EVALS.is_dir():
        pytest.skip(f"{PYTHIA_EVALS} not present (../shared/data is only in this workspace)")
    return PYTHIA_EVALS


def pytest_collection_modifyitems(config, items):
    # `-m shared_data` selects every test that reads ../shared/data (.ci/run runs them
    # once more with the data absent and checks that they skip)
    for item in items:
        if "pythia_evals" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)


hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny run per architecture (steps 0, 1, 4), trained a few AdamW steps."""
    root = tmp_path_factory.mktemp("tiny")
    runs = {}
    for i, arch in enumerate(ARCHS):
        make_tiny_run(root / arch, arch=arch, steps=(0, 1, 4), seed=i)
        runs[arch] = root / arch
    return runs


@pytest.fixture(scope="session")
def neox_runs(tmp_path_factory) -> Path:
    """A runs directory with two GPT-NeoX seeds, steps 0, 1, 2, 4."""
    root = tmp_path_factory.mktemp("neox") / "runs"
    for seed in (0, 1):
        make_tiny_run(root / f"seed{seed}", steps=(0, 1, 2, 4), seed=seed)
    return root


@pytest.fixture
def runs_copy(neox_runs, tmp_path) -> Path:
    """A private, writable copy of ``neox_runs``."""
    dest = tmp_path / "runs"
    shutil.copytree(neox_runs, dest)
    return dest


SMALL = {"sizes": "pico", "seeds": "0-2", "steps": 24, "unstable": "2", "progress": False}


@pytest.fixture(scope="session")
def small_suite(tmp_path_factory) -> Path:
    """A real ``polymap suite``: pico seeds 0-2 (seed 2 planted), 24 steps, with tokenizers."""
    out = tmp_path_factory.mktemp("suite") / "s"
    build(out, **SMALL)
    return out


def edited_checkpoint(source: Path, dest: Path, edit) -> Path:
    """A copy of checkpoint ``source`` at ``dest`` whose tensors were changed in place by
    ``edit(tensors: dict[str, Tensor])`` (e.g. a NaN planted, a matrix scaled)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest
