"""The README's Python examples run as written: every ```python block, in order, in one
fresh interpreter, in a folder holding what they name (``runs/`` of tiny real runs and a
``live.parquet``). A block preceded by ``<!-- readme-test: skip (why) -->`` is not run; the
reason is in the README beside it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of every ```python block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = lines[i - 1] if i else ""
            match = SKIP.match(before.strip())
            blocks.append((start + 1, "\n".join(lines[start:end]), match and match.group(1)))
            i = end
        i += 1
    return blocks


def test_blocks_are_found_and_every_skip_says_why():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    skipped = [reason for _, _, reason in blocks if reason is not None]
    assert all(len(reason) > 10 for reason in skipped) and len(skipped) <= 2


@pytest.mark.slow
def test_readme_python_examples_run_as_written(tmp_path):
    import polymap
    from polymap.synthetic import make_tiny_run

    for seed in range(5):
        make_tiny_run(tmp_path / "runs" / f"seed{seed}", steps=tuple(range(0, 20, 2)), seed=seed)
    live = tmp_path / "live"
    make_tiny_run(live / "seed9", steps=(0, 2, 4, 6), seed=9)
    polymap.extract(live, out=tmp_path / "live.parquet", features="hu2023,weights",
                    device="cpu", progress=False)  # fmt: skip
    script = ["import matplotlib", "matplotlib.use('Agg')"]
    for line, code, reason in python_blocks(README.read_text()):
        if reason is None:
            script += [f"# README.md line {line}", code, f"print('ok: README line {line}')"]
    (tmp_path / "readme_examples.py").write_text("\n".join(script) + "\n")
    done = subprocess.run(
        [sys.executable, "readme_examples.py"], cwd=tmp_path, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    ran = [int(n) for n in re.findall(r"ok: README line (\d+)", done.stdout)]
    expected = [line for line, _, reason in python_blocks(README.read_text()) if reason is None]
    assert ran == expected
