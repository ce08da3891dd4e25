"""End-to-end extraction: formats, bad input, incremental and crash-safe writes, the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import polymap
import polymap.extraction as extract_module
from polymap.checkpoints import CheckpointRef, TensorReader, UnsafeCheckpointError
from polymap.cli import main
from polymap.synthetic import tiny_model
from polymap.table import FeatureStore, TableLockedError


def _features(df):
    return df[polymap.feature_columns(df)].reset_index(drop=True)


def test_sharded_and_bin_formats_give_the_same_features(tmp_path):
    model = tiny_model("gpt_neox", seed=5, hidden=64)
    model.save_pretrained(tmp_path / "single" / "step1")
    model.save_pretrained(tmp_path / "sharded" / "step1", max_shard_size="20KB")
    state = load_file(tmp_path / "single" / "step1" / "model.safetensors")
    (tmp_path / "bin" / "step1").mkdir(parents=True)
    shutil.copy(tmp_path / "single" / "step1" / "config.json", tmp_path / "bin" / "step1")
    torch.save(state, tmp_path / "bin" / "step1" / "pytorch_model.bin")
    assert (tmp_path / "sharded" / "step1" / "model.safetensors.index.json").exists()
    with TensorReader(tmp_path / "sharded" / "step1") as reader:
        assert len(reader.files) > 1
    tables = {
        k: polymap.extract(tmp_path / k, device="cpu", progress=False)
        for k in ("single", "sharded", "bin")
    }
    for name, table in tables.items():
        assert table["status"].tolist() == ["ok"], (name, table["error"].tolist())
    pd.testing.assert_frame_equal(_features(tables["single"]), _features(tables["sharded"]))
    pd.testing.assert_frame_equal(_features(tables["single"]), _features(tables["bin"]))


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited-by-polymap-test",))


def test_pickle_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "run" / "step1"
    ckpt.mkdir(parents=True)
    torch.save({"w": torch.ones(2, 2), "x": Exploit()}, ckpt / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle.*posix.system"):
        TensorReader(ckpt)
    row = polymap.extract_checkpoint(CheckpointRef("run", 1, str(ckpt)), device="cpu")
    assert row["status"] == "failed" and "refusing to unpickle" in row["error"]
    assert not (tmp_path / "exploited-by-polymap-test").exists()


@pytest.fixture
def bad_runs(runs_copy):
    """seed0 gets a truncated file (step2), a corrupt header (step4) and NaN/Inf weights
    (step1); seed1 loses its config (step1) and its weights (step2)."""
    seed0, seed1 = runs_copy / "seed0", runs_copy / "seed1"
    path = seed0 / "step2" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    path = seed0 / "step4" / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    path = seed0 / "step1" / "model.safetensors"
    state = load_file(path)
    w = state["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"]
    w[0, :5] = float("nan")
    w[1, 0] = float("inf")
    save_file(state, path)
    (seed1 / "step1" / "config.json").unlink()
    (seed1 / "step2" / "model.safetensors").unlink()
    return runs_copy


def test_bad_checkpoints_are_recorded_and_the_sweep_goes_on(bad_runs, tmp_path):
    out = tmp_path / "features.parquet"
    table = polymap.extract(bad_runs, out=out, device="cpu", progress=False)
    by = {(r.run, r.step): r for r in table.itertuples()}
    assert len(table) == 8
    assert by[("seed0", 2)].status == "failed" and "truncated" in by[("seed0", 2)].error
    assert "seed0/step2/model.safetensors" in by[("seed0", 2)].error
    assert by[("seed0", 4)].status == "failed" and "corrupt" in by[("seed0", 4)].error
    assert by[("seed1", 2)].status == "failed" and "no weights" in by[("seed1", 2)].error
    nan_row = table[(table.run == "seed0") & (table.step == 1)].iloc[0]
    assert nan_row["status"] == "nonfinite" and "6 non-finite" in nan_row["error"]
    n_included = sum(
        v.numel()
        for k, v in load_file(bad_runs / "seed0/step1/model.safetensors").items()
        if not k.startswith("embed") and "norm" not in k
    )
    assert nan_row["hu2023.nonfinite_fraction"] == pytest.approx(6 / n_included)
    assert np.isfinite(nan_row["hu2023.l1"]) and np.isfinite(nan_row["hu2023.median_w"])
    assert np.isfinite(nan_row["weights.mlp_in.fro"])
    assert nan_row["spectral.nonfinite_matrices"] == 1
    assert by[("seed1", 1)].status == "warning" and "config.json missing" in by[("seed1", 1)].error
    assert np.isfinite(table.loc[(table.run == "seed1") & (table.step == 1), "hu2023.l1"]).all()
    assert (table.loc[table.status == "ok", "hu2023.l1"].notna()).all()


def test_cli_exit_code_and_summary(bad_runs, tmp_path, capsys):
    out = tmp_path / "f.parquet"
    assert main(["extract", str(bad_runs), "--out", str(out), "--device", "cpu", "-q"]) == 1
    printed = capsys.readouterr().out
    assert "seed0 step 2: failed" in printed and "seed0 step 1: nonfinite" in printed
    assert main(["extract", str(tmp_path / "nope"), "--out", str(out), "-q"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["extract", str(bad_runs), "--out", str(out), "--features", "zzz", "-q"]) == 2


def test_incremental_rerun_computes_only_what_is_new(runs_copy, tmp_path, monkeypatch):
    out = tmp_path / "features.parquet"
    shutil.move(runs_copy / "seed1" / "step4", tmp_path / "held-back")
    first = polymap.extract(runs_copy, out=out, features="hu2023", device="cpu", progress=False)
    assert len(first) == 7
    calls = []
    original = extract_module.extract_checkpoint

    def counting(ref, *args, **kwargs):
        calls.append((ref.run, ref.step))
        return original(ref, *args, **kwargs)

    monkeypatch.setattr(extract_module, "extract_checkpoint", counting)
    again = polymap.extract(runs_copy, out=out, features="hu2023", device="cpu", progress=False)
    assert calls == []
    pd.testing.assert_frame_equal(again, first)
    shutil.move(tmp_path / "held-back", runs_copy / "seed1" / "step4")
    third = polymap.extract(runs_copy, out=out, features="hu2023", device="cpu", progress=False)
    assert calls == [("seed1", 4)] and len(third) == 8
    # A changed file is recomputed; a new feature set adds columns and keeps the old ones.
    save_file(
        load_file(runs_copy / "seed0/step2/model.safetensors"),
        runs_copy / "seed0/step2/model.safetensors",
        metadata={"format": "pt"},
    )
    calls.clear()
    polymap.extract(runs_copy, out=out, features="hu2023", device="cpu", progress=False)
    assert calls == [("seed0", 2)]
    calls.clear()
    both = polymap.extract(runs_copy, out=out, features="weights", device="cpu", progress=False)
    assert len(calls) == 8 and len(both) == 8
    assert both["hu2023.l1"].notna().all() and both["weights.mlp_in.fro"].notna().all()
    assert set(both["feature_sets"]) == {"hu2023,weights"}


def test_crash_leaves_written_rows_and_restart_completes(runs_copy, tmp_path, monkeypatch):
    out = tmp_path / "features.parquet"
    original = extract_module.extract_checkpoint
    seen = []

    def crashing(ref, *args, **kwargs):
        if len(seen) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-sweep
        seen.append(ref)
        return original(ref, *args, **kwargs)

    monkeypatch.setattr(extract_module, "extract_checkpoint", crashing)
    with pytest.raises(KeyboardInterrupt):
        polymap.extract(runs_copy, out=out, features="hu2023", device="cpu", progress=False)
    assert len(polymap.read_table(out)) == 3
    monkeypatch.setattr(extract_module, "extract_checkpoint", original)
    table = polymap.extract(runs_copy, out=out, features="hu2023", device="cpu", progress=False)
    assert len(table) == 8 and not table.duplicated(["run", "step"]).any()
    assert not (tmp_path / "features.parquet.parts").exists()


def test_second_sweep_on_the_same_table_is_refused(runs_copy, tmp_path):
    out = tmp_path / "features.parquet"
    with FeatureStore(out), pytest.raises(TableLockedError, match="being written by pid"):
        polymap.extract(runs_copy, out=out, device="cpu", progress=False)


@pytest.mark.slow
def test_process_pool_gives_the_same_table(runs_copy, tmp_path):
    one = polymap.extract(runs_copy, out=tmp_path / "a.parquet", device="cpu", progress=False)
    two = polymap.extract(
        runs_copy, out=tmp_path / "b.parquet", device="cpu", jobs=2, progress=False
    )
    pd.testing.assert_frame_equal(_features(one), _features(two))


@pytest.mark.slow
def test_console_script_runs(runs_copy, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "polymap")
    result = subprocess.run(
        [
            exe,
            "extract",
            str(runs_copy),
            "--out",
            str(tmp_path / "f.parquet"),
            "-q",
            "--features",
            "hu2023",
            "--steps",
            "0,4",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "4 checkpoint(s) of 2 run(s)" in result.stdout
    assert len(pd.read_parquet(tmp_path / "f.parquet")) == 4


def test_unknown_architecture_gets_generic_roles_and_a_warning(tiny_runs, tmp_path):
    state = load_file(tiny_runs["gpt_neox"] / "step4" / "model.safetensors")
    renamed = {
        k.replace("gpt_neox.layers", "backbone.blocks")
        .replace("gpt_neox.", "backbone.")
        .replace("attention.query_key_value", "mixer.in_proj"): v
        for k, v in state.items()
    }
    (tmp_path / "step4").mkdir()
    save_file(renamed, tmp_path / "step4" / "model.safetensors")
    (tmp_path / "step4" / "config.json").write_text('{"model_type": "mamba"}')
    row = polymap.extract_checkpoint(CheckpointRef("m", 4, str(tmp_path / "step4")), device="cpu")
    assert row["status"] == "warning" and "unknown architecture (mamba)" in row["error"]
    assert np.isfinite(row["hu2023.l1"]) and "weights.other.fro" in row
    assert row["weights.layer1.mlp_in.fro"] > 0  # dense_h_to_4h still recognised by name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_gpu_matches_cpu(tiny_runs):
    ref = CheckpointRef("neox", 4, str(tiny_runs["gpt_neox"] / "step4"))
    cpu = polymap.extract_checkpoint(ref, device="cpu")
    gpu = polymap.extract_checkpoint(ref, device="cuda")
    for key, value in cpu.items():
        if "." in key and isinstance(value, float) and np.isfinite(value):
            assert gpu[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
