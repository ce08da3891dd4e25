"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file polymap writes (tables, model directories, scores, figures, reports) goes
through :func:`atomic_file`: the content is written to a temporary file in the same
folder (same suffix, so writers that pick a format from it still do), flushed to disk,
then renamed over the target with ``os.replace``. A crash or an exception in the writer
leaves the previous file untouched and no temporary behind.

>>> import tempfile, pathlib
>>> target = pathlib.Path(tempfile.mkdtemp()) / "scores.csv"
>>> with atomic_file(target) as tmp:
...     _ = tmp.write_text("run,risk\\n")
>>> target.read_text()
'run,risk\\n'
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no pandas import at run time: the CLI imports this module eagerly
    import pandas as pd


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> Path:
    """``json.dumps(obj, indent=1, **kwargs)`` to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=kwargs.pop("indent", 1), **kwargs))


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """``frame.to_csv(path, index=False)`` atomically."""
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """``frame.to_parquet(path, index=False)`` atomically."""
    with atomic_file(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)
