"""One base for every error polymap expects (bad input, bad arguments).

``polymap`` raises subclasses of :class:`PolymapError` for what a user can fix; the CLI
prints them in one line and exits 1 (:class:`UsageError`: 2). Anything else is a bug and
shows its traceback.

>>> issubclass(UsageError, PolymapError)
True
"""

from __future__ import annotations


class PolymapError(Exception):
    """An expected error: bad input data, an unusable file, a refused operation."""


class UsageError(PolymapError, ValueError):
    """A bad argument or flag value (exit code 2 on the command line)."""


__all__ = ["PolymapError", "UsageError"]
