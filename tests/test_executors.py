"""Executors: Ray on a real local cluster gives the local table; dead workers are retried
then recorded; a sweep killed mid-way resumes with every checkpoint exactly once; hub
sweeps keep at most M checkpoints on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import polymap
from polymap.checkpoints import CheckpointRef, hub
from polymap.checkpoints.prefetch import HubPrefetcher
from polymap.executors import (
    ExecutorError,
    ProcessExecutor,
    RayExecutor,
    TaskFailed,
    _check_reachable,
    get_executor,
)
from polymap.table import feature_columns


def crash_once(marker: str, value: int) -> int:
    """Dies (hard, like an OOM kill) the first time it sees ``marker``, then works."""
    if not os.path.exists(marker):
        Path(marker).write_text("crashed")
        os._exit(9)
    return value * 2


def always_crash(value: int) -> int:
    os._exit(9)


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values(["run", "step"], ignore_index=True)


@pytest.fixture(scope="module")
def reference(small_suite):
    return _sorted(polymap.extract(small_suite, features="hu2023", device="cpu", progress=False))


# --- process pool ------------------------------------------------------------------------


def test_process_executor_matches_local(small_suite, reference):
    table = polymap.extract(small_suite, features="hu2023", device="cpu", jobs=2,
                            executor="process", progress=False)  # fmt: skip
    pd.testing.assert_frame_equal(_sorted(table), reference)


@pytest.mark.slow
def test_process_worker_death_is_retried_then_recorded(tmp_path):
    with ProcessExecutor(jobs=2, retries=1) as executor:
        tasks = [(str(tmp_path / "m1"), 1), (str(tmp_path / "m2"), 2), (str(tmp_path / "m3"), 3)]
        results = dict(executor.run(crash_once, tasks))
    assert {t[1]: r for t, r in results.items()} == {1: 2, 2: 4, 3: 6}
    with ProcessExecutor(jobs=1, retries=1) as executor:
        ((task, result),) = list(executor.run(always_crash, [(5,)]))
    assert isinstance(result, TaskFailed) and result.attempts == 2
    assert "died 2 time(s)" in result.reason


# --- Ray --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


def test_ray_extraction_equals_local(ray_cluster, small_suite, reference, tmp_path):
    out = tmp_path / "ray.parquet"
    table = polymap.extract(small_suite, out=out, features="hu2023", device="cpu",
                            executor="ray", progress=False)  # fmt: skip
    pd.testing.assert_frame_equal(_sorted(table), reference)
    assert len(polymap.read_table(out)) == len(reference)
    assert not (tmp_path / "ray.parquet.parts").exists() or not list(
        (tmp_path / "ray.parquet.parts").iterdir()
    )


def test_ray_worker_death_is_retried_then_recorded(ray_cluster, tmp_path):
    executor = RayExecutor(retries=1)
    results = dict(executor.run(crash_once, [(str(tmp_path / "r1"), 4), (str(tmp_path / "r2"), 5)]))
    assert sorted(results.values()) == [8, 10]
    executor = RayExecutor(retries=0)
    ((_, result),) = list(executor.run(always_crash, [(1,)]))
    assert isinstance(result, TaskFailed) and "WorkerCrashedError" in result.reason


def test_ray_cli(ray_cluster, small_suite, tmp_path, reference):
    from polymap.cli import main

    out = tmp_path / "cli.parquet"
    argv = ["extract", str(small_suite), "--out", str(out), "--features", "hu2023",
            "--executor", "ray", "--device", "cpu", "-q"]  # fmt: skip
    assert main(argv) == 0
    cols = ["run", "step", *feature_columns(reference)]
    pd.testing.assert_frame_equal(_sorted(polymap.read_table(out))[cols], reference[cols])


def test_unreachable_ray_address_is_a_clear_error():
    with pytest.raises(ExecutorError, match="does not answer"):
        _check_reachable("127.0.0.1:1", timeout=2)
    with pytest.raises(ExecutorError, match="does not answer"):
        _check_reachable("ray://127.0.0.1:1", timeout=2)
    with pytest.raises(ExecutorError, match="expected auto"):
        _check_reachable("nonsense")
    with pytest.raises(ValueError, match="not one of"):
        get_executor("dask")


# --- resumable sweeps -------------------------------------------------------------------


def _finished_parts(parts) -> list:
    """Part files a sweep has finished: not the hidden ``.NAME.tmp.parquet`` of
    :func:`polymap.atomic.atomic_file` still being written."""
    return [p for p in parts.glob("*.parquet") if not p.name.startswith(".")]


def test_sweep_killed_mid_way_resumes_without_loss_or_duplicates(small_suite, reference, tmp_path):
    out = tmp_path / "killed.parquet"
    parts = tmp_path / "killed.parquet.parts"
    cmd = [sys.executable, "-m", "polymap", "extract", str(small_suite), "--out", str(out),
           "--features", "hu2023", "--device", "cpu", "-q"]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(_finished_parts(parts)) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started, no cleanup
    proc.wait()
    partial = polymap.read_table(out)
    assert 5 <= len(partial) < len(reference)
    # restart: completes, nothing lost, nothing twice, values as a clean sweep's
    assert subprocess.run(cmd, check=False).returncode == 0
    table = _sorted(polymap.read_table(out))
    assert not table.duplicated(["run", "step"]).any()
    pd.testing.assert_frame_equal(table[reference.columns], reference)


# --- disk-bounded hub sweeps ------------------------------------------------------------


def test_prefetcher_keeps_at_most_m_on_disk(tmp_path, monkeypatch):
    disk = tmp_path / "cache"
    disk.mkdir()
    peak, lock = [0], threading.Lock()

    def fake_fetch(ref):
        time.sleep(0.02)
        folder = disk / f"{ref.run}-{ref.step}"
        folder.mkdir()
        with lock:
            peak[0] = max(peak[0], len(list(disk.iterdir())))
        return folder

    monkeypatch.setattr(hub, "fetch", fake_fetch)
    refs = [CheckpointRef("r", s, f"hf://org/r@step{s}") for s in range(8)]
    overlapped = 0
    with HubPrefetcher(refs, max_on_disk=2) as prefetch:
        for ref in refs:
            folder = prefetch.wait(ref)
            assert folder.is_dir()
            time.sleep(0.05)  # "extraction": the next download runs meanwhile
            overlapped += len(list(disk.iterdir())) == 2
            folder.rmdir()  # delete_after
            prefetch.release(ref)
    assert peak[0] <= 2 and overlapped >= 4


def test_hub_sweep_with_delete_after_is_bounded(neox_runs, tmp_path, monkeypatch):
    from test_sources import populate_hub_cache

    cache = tmp_path / "hub"
    steps = (0, 1, 2, 4)
    populate_hub_cache(
        cache,
        "EleutherAI/pythia-14m-seed3",
        {f"step{s}": neox_runs / "seed0" / f"step{s}" for s in steps},
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshots = cache / "models--EleutherAI--pythia-14m-seed3" / "snapshots"
    fetched = []
    real_fetch = hub.fetch

    def recording_fetch(ref):
        fetched.append(ref.step)
        return real_fetch(ref)

    monkeypatch.setattr(hub, "fetch", recording_fetch)
    table = polymap.extract(["hf://EleutherAI/pythia-14m-seed3@step0,step1,step2,step4"],
                            features="hu2023,weights", device="cpu", delete_after=True,
                            max_on_disk=2, progress=False)  # fmt: skip
    assert sorted(table["step"]) == list(steps)
    assert (table["status"] == "ok").all(), table["error"].tolist()
    # step 0 stayed until the end for rel_dist, then every revision was deleted
    assert table["weights.mlp_in.rel_dist"].iloc[1:].notna().all()
    assert not snapshots.exists() or not list(snapshots.iterdir())
    assert sorted(set(fetched)) == list(steps)


# --- the user's own registrations reach the workers ------------------------------------


def _register_user_plugins(monkeypatch) -> None:
    """A feature set and an architecture as a user defines them in a notebook cell:
    inside a function, so no worker can import them by name. The architecture replaces
    the GPT-NeoX table (everything but the embedding is ``other``), which changes
    ``role`` for every tensor the feature set sees."""
    from polymap.features import base
    from polymap.roles import _REGISTRY as ARCHS
    from polymap.roles import Architecture, architectures, register_architecture

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr("polymap.roles._REGISTRY", dict(ARCHS))
    neox = architectures()["gpt_neox"]
    register_architecture(
        Architecture(
            name="gpt_neox",
            model_types=neox.model_types,
            rules=((r"embed_in", "embed"),),
            layer_pattern=neox.layer_pattern,
            buffers=neox.buffers,
        ),
        replace=True,
    )

    @base.register_feature_set
    class RoleCount(base.FeatureSet):
        name = "test_role_count"
        documentation = {"test_role_count.other": "tensors whose role is other"}

        def start(self):
            self.counts = {"other": 0.0, "total": 0.0}

        def add(self, param):
            self.counts["total"] += 1
            self.counts["other"] += param.role.role == "other"

        def finish(self):
            return {f"test_role_count.{k}": v for k, v in self.counts.items()}


def test_user_registered_feature_set_and_architecture_run_on_process_workers(
    small_suite, monkeypatch
):
    _register_user_plugins(monkeypatch)
    runs = [small_suite / "pico-seed0"]
    local = polymap.extract(runs, features="test_role_count", steps="0,24", device="cpu",
                            progress=False)  # fmt: skip
    assert list(local["status"]) == ["ok", "ok"]
    # every tensor but the embedding is "other" under the replaced table
    assert (local["test_role_count.other"] == local["test_role_count.total"] - 1).all()
    pooled = polymap.extract(runs, features="test_role_count", steps="0,24", device="cpu",
                             jobs=2, executor="process", progress=False)  # fmt: skip
    cols = ["run", "step", "status", "test_role_count.other", "test_role_count.total"]
    pd.testing.assert_frame_equal(_sorted(pooled)[cols], _sorted(local)[cols])


def test_user_registered_feature_set_and_architecture_run_on_ray(
    ray_cluster, small_suite, monkeypatch
):
    _register_user_plugins(monkeypatch)
    runs = [small_suite / "pico-seed0"]
    local = polymap.extract(runs, features="test_role_count", steps="0,24", device="cpu",
                            progress=False)  # fmt: skip
    remote = polymap.extract(runs, features="test_role_count", steps="0,24", device="cpu",
                             executor="ray", progress=False)  # fmt: skip
    cols = ["run", "step", "status", "test_role_count.other", "test_role_count.total"]
    assert list(remote["status"]) == ["ok", "ok"], remote["error"].tolist()
    pd.testing.assert_frame_equal(_sorted(remote)[cols], _sorted(local)[cols])


def test_executor_registry_is_what_the_cli_offers():
    from polymap.cli import build_parser
    from polymap.errors import UsageError
    from polymap.executors import executors, register_executor

    assert executors() == ("local", "process", "ray")
    with pytest.raises(UsageError, match="taken"):
        register_executor("process", lambda **kw: None)
    parser = build_parser()
    extract = parser._subparsers._group_actions[0].choices["extract"]
    choices = next(a.choices for a in extract._actions if a.dest == "executor")
    assert tuple(choices) == executors()


def test_unguarded_script_gets_a_hint_not_just_out_of_memory(small_suite, tmp_path):
    """A script that calls extract(executor="process") without a __main__ guard: every
    spawned worker re-runs the script and dies at start; the row says what to check."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import polymap\n"
        f"t = polymap.extract([{str(small_suite / 'pico-seed0')!r}], steps='24', jobs=2,\n"
        "    executor='process', retries=0, features='hu2023', device='cpu', progress=False)\n"
        "print('ERROR:', t['error'].iloc[0])\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)  # fmt: skip
    line = next(x for x in done.stdout.splitlines() if x.startswith("ERROR:"))
    assert "worker process died" in line and "if __name__ == '__main__':" in line
