"""Download Hub checkpoints ahead of extraction, with at most M checkpoints on disk.

A background thread fetches the sweep's hub checkpoints in order. Before each download
it takes one of ``max_on_disk`` slots; the extractor gives the slot back
(:meth:`HubPrefetcher.release`) once the checkpoint is extracted and, with
``delete_after``, deleted from the cache. So downloads overlap with computation and no
more than ``max_on_disk`` checkpoints are ever on disk together (the one being extracted
and ``max_on_disk - 1`` downloaded ahead).

>>> with HubPrefetcher(refs, max_on_disk=2) as prefetch:          # doctest: +SKIP
...     for ref in refs:
...         prefetch.wait(ref)          # downloaded (or raises its download error)
...         row = extract_checkpoint(ref, delete_after=True)
...         prefetch.release(ref)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from polymap.checkpoints import hub
from polymap.checkpoints.ref import CheckpointRef
from polymap.errors import UsageError

log = logging.getLogger(__name__)


class HubPrefetcher:
    """See the module docs. Local checkpoints pass through untouched."""

    def __init__(self, refs: Sequence[CheckpointRef], max_on_disk: int = 2):
        if max_on_disk < 1:
            raise UsageError(f"max_on_disk={max_on_disk}: need at least 1")
        self.refs = [r for r in refs if r.is_hub]
        self._slots = threading.Semaphore(max_on_disk)
        self._futures: dict[CheckpointRef, Future] = {r: Future() for r in self.refs}
        self._held: set[CheckpointRef] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._download_all, daemon=True)
        self._thread.start()

    def _download_all(self) -> None:
        for ref in self.refs:
            while not self._slots.acquire(timeout=0.2):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                self._slots.release()
                return
            with self._lock:
                self._held.add(ref)
            try:
                self._futures[ref].set_result(hub.fetch(ref))
            except Exception as err:  # reported by the extractor as the row's error
                self._futures[ref].set_exception(err)

    def wait(self, ref: CheckpointRef) -> Path | None:
        """Block until ``ref`` is downloaded; None for local checkpoints. A download
        error is not raised here: the extractor meets it again and records it."""
        future = self._futures.get(ref)
        if future is None:
            return None
        try:
            return future.result()
        except Exception as err:
            log.debug("download of %s failed: %s", ref, err)
            return None

    def release(self, ref: CheckpointRef) -> None:
        """``ref`` is extracted (and deleted): its disk slot is free."""
        with self._lock:
            if ref not in self._held:
                return
            self._held.discard(ref)
        self._slots.release()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> HubPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
