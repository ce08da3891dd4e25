"""Output paths, checked before any work starts.

A command that computes for minutes and then cannot write its result has wasted the
minutes: ``check_output`` says up front when ``--out`` cannot be created (a parent is a
regular file, a directory stands where a file is expected, no write permission).

>>> check_output("/tmp/polymap-doctest/scores.csv", "file")
PosixPath('/tmp/polymap-doctest/scores.csv')
"""

from __future__ import annotations

import os
from pathlib import Path

from polymap.errors import PolymapError, UsageError


class OutputPathError(PolymapError, OSError):
    """``--out`` cannot be written; the message names the path and why."""


def check_output(path: str | Path, kind: str) -> Path:
    """Raise :class:`OutputPathError` unless ``path`` can be written as a ``kind``
    (``"file"`` or ``"dir"``): what exists must have that kind, the nearest existing
    ancestor must be a writable directory. Creates nothing."""
    if kind not in ("file", "dir"):
        raise UsageError(f"kind={kind!r} is not 'file' or 'dir'")
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise OutputPathError(f"{path}: is a directory; expected a file name")
        if kind == "dir" and not path.is_dir():
            raise OutputPathError(f"{path}: exists and is not a directory")
        target = path if kind == "dir" else path.parent
        if not os.access(target, os.W_OK):
            raise OutputPathError(f"{target}: not writable")
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{path}: cannot be created, {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: cannot be created, {ancestor} is not writable")
    return path


__all__ = ["OutputPathError", "check_output"]
