"""Where checkpoints are extracted: in this process, on a local process pool, or on Ray.

Every executor runs the same task function (:func:`polymap.extraction.extract_checkpoint`)
on one checkpoint at a time and streams ``(task, result)`` pairs back to the driver as
they finish; the driver alone writes the FeatureTable. The contract:

- at most ``in_flight`` tasks are submitted at once (the pool size, or twice the Ray
  cluster's CPUs), so a crash only ever concerns those;
- a task whose worker dies (killed, out of memory, a segfault in a native library) is
  retried up to ``retries`` more times; after that the executor yields a
  :class:`TaskFailed` for it, which the driver records as a ``failed`` row with the
  reason — the sweep goes on;
- results are yielded once per task, in completion order.

>>> executor = get_executor("process", jobs=4)                       # doctest: +SKIP
>>> for task, row in executor.run(extract_checkpoint, tasks): ...   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from polymap.errors import PolymapError, UsageError

log = logging.getLogger(__name__)
DEFAULT_RETRIES = 2


class ExecutorError(PolymapError, RuntimeError):
    """An executor that cannot start (Ray missing, an address that does not answer)."""


@dataclass
class TaskFailed:
    """A task that could not be completed after its retries; ``reason`` says why."""

    reason: str
    attempts: int


class Executor:
    """Base class: :meth:`run` yields ``(task, result or TaskFailed)``."""

    name = ""

    def run(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[tuple, object]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (the pool, the Ray connection this executor opened)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """One task after another in this process (exceptions propagate: they are bugs)."""

    name = "local"

    def run(self, fn, tasks):
        for task in tasks:
            yield task, fn(*task)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def die_with_parent(parent: int | None = None) -> None:
    """Make this worker process end when the process that started it dies, even by
    SIGKILL (which runs no cleanup): Linux's parent-death signal, and everywhere a
    watchdog thread that exits once the parent is gone. Without it an orphaned worker
    (~400 MB with torch loaded) keeps running after the driver was killed."""
    import threading

    parent = parent or os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="polymap-parent-watchdog", daemon=True).start()


def _worker_init(threads: int, parent: int | None = None) -> None:
    """Limit every thread pool of a worker (torch, and the BLAS under numpy/scipy, which
    read these variables when they load) so N workers do not oversubscribe the cores;
    the worker dies with its driver (:func:`die_with_parent`)."""
    die_with_parent(parent)
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)  # libraries already loaded
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        pass


def _died(crashes: int, finished_any: bool) -> str:
    reason = f"worker process died {crashes} time(s) on this task (killed or out of memory?"
    if not finished_any and getattr(sys.modules.get("__main__"), "__file__", None):
        # spawned workers re-import the script: unguarded top-level code runs again there
        reason += " No task has finished yet: does your script guard its top-level code "
        reason += "with `if __name__ == '__main__':`?"
    return reason + ")"


class ProcessExecutor(Executor):
    """A pool of ``jobs`` spawned processes on this machine, each with
    ``cpu_count // jobs`` torch threads. A dead worker breaks the pool: it is rebuilt and
    the tasks that were running are retried."""

    name = "process"

    def __init__(self, jobs: int = 2, retries: int = DEFAULT_RETRIES):
        if jobs < 1:
            raise UsageError(f"jobs={jobs}: need at least 1")
        self.jobs, self.retries = jobs, retries
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self._pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.jobs,
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
            initargs=(self.threads, os.getpid()),
        )

    def run(self, fn, tasks):
        # A dead worker breaks the whole pool, so when several tasks were running the
        # culprit is unknown: they are re-run one at a time ("suspects"), and only a task
        # that kills its worker while running alone is charged an attempt.
        queue = deque(tasks)
        suspects: deque = deque()  # (task, crashes so far)
        running: dict = {}
        finished_any = False  # no task ever finished: the workers may not start at all
        self._pool = self._new_pool()
        try:
            while queue or suspects or running:
                if not running:
                    if suspects:
                        task, crashes = suspects.popleft()
                        running[self._pool.submit(fn, *task)] = (task, crashes)
                    else:
                        while queue and len(running) < self.jobs:
                            task = queue.popleft()
                            running[self._pool.submit(fn, *task)] = (task, None)
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                if not any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                    for future in done:
                        task, _ = running.pop(future)
                        finished_any = True
                        yield task, future.result()
                    if suspects:  # finish the suspects alone before taking new work
                        continue
                    while queue and len(running) < self.jobs and not suspects:
                        task = queue.popleft()
                        running[self._pool.submit(fn, *task)] = (task, None)
                    continue
                alone = len(running) == 1
                for future, (task, crashes) in list(running.items()):
                    if future.done() and not isinstance(future.exception(), BrokenProcessPool):
                        finished_any = True
                        yield task, future.result()
                        continue
                    if alone:
                        crashes = (crashes or 0) + 1
                        if crashes > self.retries:
                            yield task, TaskFailed(_died(crashes, finished_any), crashes)
                            continue
                        log.warning("worker died on %s; retrying (%d)", task[0], crashes)
                    suspects.append((task, crashes or 0))
                running.clear()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
        finally:
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when a Ray address does not answer."""
    if address in ("auto", "local") or not address:
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ExecutorError(
            f"Ray cluster at {address} does not answer ({err}); is `ray start --head` running "
            "there, and is the port right (6379 for the GCS, 10001 for ray://)?"
        ) from err


class RayExecutor(Executor):
    """One Ray task per checkpoint, ``num_cpus``/``num_gpus`` each; Ray re-runs a task
    whose worker died up to ``retries`` times (``max_retries``), then it is failed.

    Connects to ``address`` (``auto``: a running cluster found via ``RAY_ADDRESS`` or the
    local node; ``HOST:PORT``; ``ray://HOST:PORT``); with ``address=None`` and no Ray
    running, starts a local one that is shut down by :meth:`close`. An already
    initialised Ray (``ray.init`` in a notebook) is used as is.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        retries: int = DEFAULT_RETRIES,
        in_flight: int | None = None,
    ):
        try:
            import ray
        except ImportError as err:
            raise ExecutorError("--executor ray needs Ray: pip install 'polymap[ray]'") from err
        self.ray = ray
        self.num_cpus, self.num_gpus, self.retries = num_cpus, num_gpus, retries
        self._owned = False
        if not ray.is_initialized():
            if address is not None:
                _check_reachable(address)
            try:
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ExecutorError(
                    f"cannot connect to Ray at {address or 'local'}: {err}"
                ) from err
            self._owned = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.in_flight = in_flight or max(2, 2 * cpus)

    def run(self, fn, tasks):
        ray = self.ray
        remote = ray.remote(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.retries
        )(fn)
        queue = deque(tasks)
        running: dict = {}
        while queue or running:
            while queue and len(running) < self.in_flight:
                task = queue.popleft()
                running[remote.remote(*task)] = task
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                task = running.pop(ref)
                try:
                    yield task, ray.get(ref)
                except ray.exceptions.RayError as err:
                    reason = type(err).__name__
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    yield (
                        task,
                        TaskFailed(
                            f"Ray task failed after {self.retries + 1} attempt(s): "
                            f"{reason}: {first}",
                            self.retries + 1,
                        ),
                    )

    def close(self) -> None:
        if self._owned and self.ray.is_initialized():
            self.ray.shutdown()
            self._owned = False


# name -> factory(jobs=, address=, gpus_per_task=, retries=): the one list of executors,
# read by :func:`get_executor` and the CLI's ``--executor`` choices.
_REGISTRY: dict[str, Callable[..., Executor]] = {}


def register_executor(name: str, factory: Callable[..., Executor], replace: bool = False):
    """Make ``factory(jobs=, address=, gpus_per_task=, retries=)`` available as
    ``executor=name`` (API) and ``--executor name`` (CLI). A taken name is an error unless
    ``replace=True``.

    >>> register_executor("local", lambda **kw: LocalExecutor())
    Traceback (most recent call last):
    polymap.errors.UsageError: executor name 'local' is taken; pass replace=True to replace it
    """
    if name in _REGISTRY and not replace:
        raise UsageError(f"executor name {name!r} is taken; pass replace=True to replace it")
    _REGISTRY[name] = factory
    return factory


def executors() -> tuple[str, ...]:
    """The registered executor names."""
    return tuple(_REGISTRY)


register_executor("local", lambda **kw: LocalExecutor())
register_executor(
    "process", lambda jobs=1, retries=DEFAULT_RETRIES, **kw: ProcessExecutor(max(1, jobs), retries)
)
register_executor(
    "ray",
    lambda address=None, gpus_per_task=0, retries=DEFAULT_RETRIES, **kw: RayExecutor(
        address=address, num_gpus=gpus_per_task, retries=retries
    ),
)


def get_executor(
    name: str = "local",
    jobs: int = 1,
    address: str | None = None,
    gpus_per_task: float = 0,
    retries: int = DEFAULT_RETRIES,
) -> Executor:
    """An executor by name: ``local``, ``process`` (``jobs`` workers), ``ray``, or one
    added with :func:`register_executor`."""
    if name not in _REGISTRY:
        raise UsageError(f"executor {name!r} is not one of {executors()}")
    return _REGISTRY[name](jobs=jobs, address=address, gpus_per_task=gpus_per_task, retries=retries)
