"""Hostile inputs: every case of the hostile-input issue gets a clear error naming the
file/field/run/step and loses nothing already written. Checkpoints are real (tiny
GPT-NeoX models saved by transformers) and corrupted here; lm-eval files and model
directories are also fuzzed with hypothesis."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from polymap.checkpoints import CheckpointRef, SourceError, resolve_sources
from polymap.checkpoints.ref import RefError
from polymap.cli import main
from polymap.evals import ingest
from polymap.extraction import extract, extract_checkpoint
from polymap.phases import PhaseInputError, PhaseModel
from polymap.synthetic import make_tiny_run
from polymap.table import TableError, read_table


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """One real checkpoint (step 0 and 1 of a tiny GPT-NeoX run)."""
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_run(root / "run", steps=(0, 1), seed=0)
    return root / "run"


def _copy(tiny: Path, tmp_path: Path, name: str = "bad") -> Path:
    run = tmp_path / name
    shutil.copytree(tiny, run)
    return run


def _row(directory: Path, step: int = 1) -> dict:
    return extract_checkpoint(CheckpointRef("r", step, str(directory)), "hu2023", "cpu")


# -- 1. a corrupt shard index is one failed row, not a dead sweep --------------------------
@pytest.mark.parametrize(
    "index",
    ["{", '{"weight_map": []}', '{"weight_map": {"a": 5}}', '{"weight_map": {}}'],
)
@pytest.mark.parametrize("name", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_corrupt_shard_index_is_a_failed_row(tiny, tmp_path, index, name):
    run = _copy(tiny, tmp_path)
    (run / "step1" / name).write_text(index)
    out = tmp_path / "f.parquet"
    for _ in range(2):  # a restart does not die at the same checkpoint either
        table = extract(run, out=out, features="hu2023", progress=False)
    rows = table.set_index("step")
    assert rows.loc[0, "status"] == "ok"
    assert rows.loc[1, "status"] == "failed" and name in rows.loc[1, "error"]


def test_corrupt_shard_index_with_two_workers(tiny, tmp_path):
    run = _copy(tiny, tmp_path)
    (run / "step1" / "model.safetensors.index.json").write_text("{")
    table = extract(run, out=tmp_path / "f.parquet", features="hu2023", jobs=2, progress=False)
    assert sorted(table["status"]) == ["failed", "ok"]


# -- 3. steps that do not fit in int64 -------------------------------------------------------
def test_huge_steps_are_refused_by_name(tiny, tmp_path, caplog):
    run = _copy(tiny, tmp_path)
    shutil.copytree(run / "step1", run / f"step{2**63}")
    shutil.copytree(run / "step1", run / "step99999999999999999999999")
    refs = resolve_sources([run])
    assert sorted(r.step for r in refs) == [0, 1]
    assert "step9223372036854775808" in caplog.text and "2**63" in caplog.text
    with pytest.raises(RefError, match="between 0 and 2"):
        CheckpointRef("r", 2**63, str(run / "step1"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"run,step,path\nr,{2**63},{run / 'step1'}\n")
    with pytest.raises(SourceError, match=r"m.csv:2: .*between 0 and 2\*\*63"):
        resolve_sources([manifest])


# -- 8. no silent "ok" ------------------------------------------------------------------------
def test_checkpoints_without_tensors_fail(tiny, tmp_path):
    run = _copy(tiny, tmp_path)
    weights = run / "step1" / "model.safetensors"
    save_file({}, str(weights))
    row = _row(run / "step1")
    assert row["status"] == "failed" and "hold no tensors" in row["error"]
    weights.unlink()
    torch.save({}, run / "step1" / "pytorch_model.bin")
    row = _row(run / "step1")
    assert row["status"] == "failed" and "hold no tensors" in row["error"]


def test_overflowing_weights_are_nonfinite(tiny, tmp_path):
    run = _copy(tiny, tmp_path)
    weights = run / "step1" / "model.safetensors"
    tensors = {k: v * 1e30 for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    row = _row(run / "step1")
    assert row["status"] == "nonfinite" and "overflow" in row["error"]


def test_one_tensor_in_two_files_is_an_error(tiny, tmp_path):
    run = _copy(tiny, tmp_path)
    weights = run / "step1" / "model.safetensors"
    shutil.copy(weights, run / "step1" / "model-copy.safetensors")
    row = _row(run / "step1")
    assert row["status"] == "failed" and "also in another weight file" in row["error"]


def test_shard_index_pointing_outside_the_checkpoint(tiny, tmp_path):
    run = _copy(tiny, tmp_path)
    names = list(load_file(str(run / "step1" / "model.safetensors")))
    index = {"weight_map": {n: "../../other/model.safetensors" for n in names}}
    (run / "step1" / "model.safetensors.index.json").write_text(json.dumps(index))
    row = _row(run / "step1")
    assert row["status"] == "failed" and "outside the checkpoint" in row["error"]


@pytest.mark.parametrize("shape", [(0, 32), ()])
def test_empty_or_scalar_tensors_name_the_tensor(tiny, tmp_path, shape):
    run = _copy(tiny, tmp_path)
    weights = run / "step1" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(n for n in tensors if n.endswith("attention.dense.weight"))
    tensors[name] = torch.zeros(shape)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    for sets in ("hu2023", "weights", "spectral"):
        row = extract_checkpoint(CheckpointRef("r", 1, str(run / "step1")), sets, "cpu")
        if shape == (0, 32):  # an empty weight is never an "ok" row of NaN
            assert row["status"] == "failed" and "is empty" in row["error"], sets
        if row["status"] == "failed":  # whatever a feature set makes of it: named
            assert name in row["error"] and str(run / "step1") in row["error"], sets


def test_unknown_model_type_with_known_names_is_a_warning(tiny, tmp_path):
    run = _copy(tiny, tmp_path)
    config = json.loads((run / "step1" / "config.json").read_text())
    config["model_type"] = "my_private_arch"
    (run / "step1" / "config.json").write_text(json.dumps(config))
    row = _row(run / "step1")
    assert row["status"] == "warning" and "my_private_arch" in row["error"]


# -- 9. run names and steps ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "run, step, message",
    [("../../escaped", 1, "path separator"), ("", 1, "empty"), ("r", -5, "between 0")],
)
def test_manifest_names_and_steps(tiny, tmp_path, run, step, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"run,step,path\n{run},{step},{tiny / 'step1'}\n")
    with pytest.raises(SourceError, match=message):
        resolve_sources([manifest])
    out = tmp_path / "lm"
    assert main(["evals", "run", str(manifest), "--tasks", "x", "--out", str(out)]) == 1
    assert not (tmp_path.parent / "escaped").exists()


# -- 2. malformed lm-eval files: one skipped-file line each, never an abort ----------------
GOOD_RESULTS = {
    "results": {"piqa": {"acc": 0.6, "acc_stderr": 0.01}},
    "config": {"model_args": "pretrained=EleutherAI/pythia-70m,revision=step1000"},
}


def _good_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "evals"
    folder.mkdir()
    (folder / "good.json").write_text(json.dumps(GOOD_RESULTS))
    return folder


HOSTILE_RESULTS = {
    "config_str": lambda g: {**g, "config": "x"},
    "model_args_list": lambda g: {**g, "config": {"model_args": ["a"]}},
    "model_args_int": lambda g: {**g, "config": {"model_args": 5}},
    "configs_str": lambda g: {**g, "configs": "x"},
    "configs_list": lambda g: {**g, "configs": [1]},
    "nshot_inf": lambda g: {**g, "n-shot": {"piqa": math.inf}},
    "fewshot_nan": lambda g: {**g, "config": {**g["config"], "num_fewshot": math.nan}},
    "date_400_digits": lambda g: {**g, "date": int("9" * 400)},
    "revision_huge": lambda g: {
        **g,
        "config": {"model_args": f"pretrained=a/b,revision=step{10**30}"},
    },
    "metric_inf": lambda g: {**g, "results": {"piqa": {"acc": math.inf}}},
}


def test_malformed_lm_eval_files_are_skipped_lines(tmp_path):
    folder = _good_folder(tmp_path)
    for name, make in HOSTILE_RESULTS.items():
        (folder / f"{name}.json").write_text(json.dumps(make(GOOD_RESULTS)))  # NaN/Infinity
    (folder / "deep.json").write_text('{"results": {"piqa": {"acc": 0.5}}, "x": ' + "[" * 50000
                                      + "]" * 50000 + "}")  # fmt: skip
    (folder / "bom.json").write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(
            {**GOOD_RESULTS, "config": {"model_args": "pretrained=x/bom,revision=step2"}}
        ).encode()  # fmt: skip
    )
    os.symlink("loop2.json", folder / "loop1.json")
    os.symlink("loop1.json", folder / "loop2.json")
    table, report = ingest(folder, stderr=True)
    skipped = {Path(f).stem for f, _ in report.problems}
    assert set(HOSTILE_RESULTS) - {"date_400_digits"} <= skipped  # a bad date is just no date
    assert {"deep", "loop1", "loop2"} <= skipped and "bom" not in skipped
    reasons: dict[str, str] = {}
    for f, r in report.problems:
        reasons[Path(f).stem] = reasons.get(Path(f).stem, "") + r + "; "
    assert "'config' is str" in reasons["config_str"]
    assert "'n-shot.piqa'" in reasons["nshot_inf"] and "not finite" in reasons["metric_inf"]
    assert "2**63" in reasons["revision_huge"] and "nested too deeply" in reasons["deep"]
    assert set(table["run"]) == {"pythia-70m", "bom"}
    assert np.isfinite(table["eval.piqa.acc"]).all()
    out = tmp_path / "e.parquet"
    assert main(["evals", "ingest", str(folder), "--out", str(out)]) == 1  # some skipped
    assert len(read_table(out)) == 2


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["step1", "pretrained=a/b,revision=step7", "N/A", "acc,none", "../.."]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "results",
                    "config",
                    "configs",
                    "n-shot",
                    "groups",
                    "model_args",
                    "num_fewshot",
                    "date",
                    "model_name",
                    "piqa",
                    "acc",
                    "acc_stderr",
                    "alias",
                    "revision",
                    "x",
                ]
            )
            | st.text(max_size=6),
            children,
            max_size=5,
        )
    ),  # fmt: skip
    max_leaves=25,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=JSON)
def test_ingest_fuzz_only_skips(tmp_path_factory, document):
    folder = _good_folder(tmp_path_factory.mktemp("fuzz"))
    (folder / "fuzz.json").write_text(json.dumps(document))
    table, report = ingest(folder, stderr=True)  # never raises
    assert "pythia-70m" in set(table["run"])
    numbers = table[[c for c in table.columns if c.startswith("eval.")]].to_numpy(float)
    assert not np.isinf(numbers).any()


FIELDS = [("config",), ("config", "model_args"), ("config", "num_fewshot"), ("configs",),
          ("configs", "piqa"), ("configs", "piqa", "num_fewshot"), ("n-shot",),
          ("n-shot", "piqa"), ("date",), ("results", "piqa"), ("results", "piqa", "acc"),
          ("results", "piqa", "acc_stderr"), ("groups",), ("model_name",),
          ("config", "model_revision")]  # fmt: skip


def _mutated(path: tuple[str, ...], value) -> dict:
    """GOOD_RESULTS with the field at ``path`` set to ``value`` (parents created)."""
    document = json.loads(json.dumps(GOOD_RESULTS))
    node = document
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return document


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from(FIELDS), value=JSON)
def test_ingest_fuzz_one_field_of_a_good_file(tmp_path_factory, path, value):
    # mutation fuzzing: a good results file with one field replaced by anything
    folder = _good_folder(tmp_path_factory.mktemp("field"))
    (folder / "mutant.json").write_text(json.dumps(_mutated(path, value)))
    table, report = ingest(folder, stderr=True)  # never raises
    assert "pythia-70m" in set(table["run"])
    numbers = table[[c for c in table.columns if c.startswith("eval.")]].to_numpy(float)
    assert not np.isinf(numbers).any()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=200))
def test_ingest_fuzz_bytes(tmp_path_factory, raw):
    folder = _good_folder(tmp_path_factory.mktemp("bytes"))
    (folder / "raw.json").write_bytes(raw)
    table, report = ingest(folder)
    assert "pythia-70m" in set(table["run"])


# -- 4. tampered model directories ----------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from test_scoring import runs_table

    from polymap.phases import fit_model_dir

    directory = tmp_path_factory.mktemp("model") / "m"
    fit_model_dir(runs_table(), directory, n_states=3, restarts=1)
    return directory


def _tamper(model_dir: Path, tmp_path: Path, meta=None, arrays=None, files=None) -> Path:
    target = tmp_path / "tampered"
    shutil.copytree(model_dir, target)
    if meta is not None:
        data = json.loads((target / "model.json").read_text())
        (target / "model.json").write_text(json.dumps(meta(data)))
    if arrays is not None:
        with np.load(target / "arrays.npz") as npz:
            current = {k: npz[k] for k in npz.files}
        np.savez(target / "arrays.npz", **arrays(current))
    for name, text in (files or {}).items():
        (target / name).write_text(text)
    return target


def _set(key, value):
    def change(data):
        data = dict(data)
        data[key] = value
        return data

    return change


def _drop(key):
    return lambda data: {k: v for k, v in data.items() if k != key}


def _array(name, make):
    def change(arrays):
        arrays = dict(arrays)
        arrays[name] = make(arrays[name])
        return arrays

    return change


TAMPERED = {
    "missing params": dict(meta=_drop("params")),
    "missing n_states": dict(meta=_drop("n_states")),
    "list as model.json": dict(meta=lambda d: [d]),
    "n_states 0": dict(meta=_set("n_states", 0)),
    "n_states six": dict(meta=_set("n_states", "six")),
    "n_states 99": dict(meta=_set("n_states", 99)),
    "format_version string": dict(meta=_set("format_version", "1")),
    "no means": dict(arrays=lambda a: {k: v for k, v in a.items() if k != "means"}),
    "no transmat": dict(arrays=lambda a: {k: v for k, v in a.items() if k != "transmat"}),
    "NaN transmat": dict(arrays=_array("transmat", lambda t: np.full_like(t, np.nan))),
    "4x4 transmat for K=3": dict(arrays=_array("transmat", lambda t: np.full((4, 4), 0.25))),
    "wrong-shape means": dict(arrays=_array("means", lambda m: m[:, :-1])),
    "wrong-shape scaler": dict(arrays=_array("scaler_scale", lambda s: s[:-1])),
    "negative startprob": dict(arrays=_array("startprob", lambda p: p * -1 + 2 * p.max())),
    "zero variance": dict(arrays=_array("covars", lambda c: c * 0)),
    "graph.json {}": dict(files={"graph.json": "{}"}),
    "paths.csv wrong columns": dict(files={"paths.csv": "a,b\n1,2\n"}),
    "truncated npz": dict(files={"arrays.npz": "PK\x03\x04 garbage"}),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_model_dirs_are_clear_errors(model_dir, tmp_path, case, capsys):
    target = _tamper(model_dir, tmp_path, **TAMPERED[case])
    if case not in ("graph.json {}", "paths.csv wrong columns"):
        with pytest.raises(PhaseInputError):
            PhaseModel.load(target)
    verb = ["export", str(target), "--out", str(tmp_path / "x")]
    if case != "paths.csv wrong columns":
        verb = ["describe", str(target)]
    assert main(verb) == 1, case  # a data error
    message = capsys.readouterr().err
    assert str(target) in message and "Traceback" not in message


ARRAY_NAMES = ["startprob", "transmat", "means", "covars", "scaler_center", "scaler_scale"]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key=st.sampled_from(["n_states", "covariance", "params", "preprocessing", "train_runs",
                         "format", "reason", "n_degenerate"]),
    value=JSON,
    name=st.sampled_from(ARRAY_NAMES),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    fill=st.floats(allow_nan=True, allow_infinity=True),
    which=st.sampled_from(["meta", "array", "both"]),
)  # fmt: skip
def test_model_dir_fuzz_only_package_errors(model_dir, tmp_path_factory, key, value, name,
                                           shape, fill, which):  # fmt: skip
    tmp = tmp_path_factory.mktemp("fuzz-model")
    meta = _set(key, value) if which in ("meta", "both") else None
    arrays = _array(name, lambda _: np.full(shape, fill)) if which in ("array", "both") else None
    target = _tamper(model_dir, tmp, meta=meta, arrays=arrays)
    try:
        model = PhaseModel.load(target)
    except PhaseInputError:
        return
    from test_scoring import runs_table

    model.predict(runs_table())  # what loads is usable


# -- 7. workers die with their driver --------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_sigkill_of_the_driver_ends_its_workers(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(2):
        make_tiny_run(runs / f"seed{seed}", steps=tuple(range(12)), seed=seed)
    driver = subprocess.Popen(
        [sys.executable, "-m", "polymap", "extract", str(runs), "--jobs", "2", "--features",
         "hu2023,weights,spectral", "--out", str(tmp_path / "f.parquet"), "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 60
    children: set[int] = set()
    while time.time() < deadline and driver.poll() is None:
        children = _children(driver.pid)
        if len(children) >= 3:  # the resource tracker and two spawned workers
            break
        time.sleep(0.2)
    assert driver.poll() is None and len(children) >= 3, "workers did not start in time"
    time.sleep(1.0)  # let the workers get to their initializer
    children |= {g for c in children for g in _children(c)}
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(c) for c in children):
        time.sleep(0.2)
    assert not [c for c in children if _alive(c)]


# -- 5. output paths are checked before any work ---------------------------------------------
def test_bad_output_paths_fail_before_computing(tmp_path, capsys, monkeypatch):
    from test_scoring import runs_table

    features = tmp_path / "features.parquet"
    runs_table().to_parquet(features)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")

    def no_work(*args, **kwargs):
        raise AssertionError("the computation must not start")

    monkeypatch.setattr(PhaseModel, "fit", no_work)
    for argv in (
        ["fit", str(features), "--out", str(blocker / "model")],
        ["score", str(features), "--model", str(tmp_path), "--out", str(tmp_path)],
        ["backtest", str(features), "--labels", "x.csv", "--out", str(blocker)],
        ["label", str(features), "--metric", "acc", "--out", str(blocker / "l.csv")],
        ["merge", str(features), "--out", str(blocker / "m.parquet")],
    ):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "--out" in err and ("a-file" in err or str(tmp_path) in err), err


# -- 6. tables ------------------------------------------------------------------------------------
def test_missing_and_conflicting_tables(tmp_path, capsys):
    from test_scoring import runs_table

    assert main(["merge", "/nonexistent.parquet", "--out", str(tmp_path / "m.parquet")]) == 1
    assert "/nonexistent.parquet: no such file" in capsys.readouterr().err
    assert not (tmp_path / "m.parquet").exists()
    assert main(["fit", "/nonexistent.parquet", "--out", str(tmp_path / "m")]) == 1
    assert "no such file" in capsys.readouterr().err
    table = runs_table()
    twice = pd.concat([table, table.iloc[:3]])
    twice.to_parquet(tmp_path / "same.parquet")
    assert len(read_table(tmp_path / "same.parquet")) == len(table)  # identical: dropped
    conflict = table.iloc[[4]].assign(acc=-1.0)
    pd.concat([table, conflict]).to_parquet(tmp_path / "conflict.parquet")
    with pytest.raises(TableError, match=r"\[\['run0', 8\]\]"):
        read_table(tmp_path / "conflict.parquet")


# -- 10. numeric arguments -------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["extract", "x", "--out", "f.parquet", "--jobs", "0"], "--jobs"),
        (["extract", "x", "--out", "f.parquet", "--jobs", "-4"], "--jobs"),
        (["extract", "x", "--out", "f.parquet", "--retries", "-1"], "--retries"),
        (["suite", "--out", "s", "--jobs", "0"], "--jobs"),
        (["demo", "--n-seeds", "2"], "--n-seeds"),
        (["demo", "--seeds", "2"], "--n-seeds"),  # the deprecated spelling
        (["fit", "f.parquet", "--out", "m", "--restarts", "0"], "--restarts"),
    ],
)
def test_numeric_flags_are_checked_up_front(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_messages_name_the_flag_or_file(tmp_path, capsys):
    from test_scoring import runs_table

    features = tmp_path / "features.parquet"
    runs_table().to_parquet(features)
    (tmp_path / "empty.csv").write_text("")
    assert main(["backtest", str(features), "--labels", str(tmp_path / "empty.csv"),
                 "--out", str(tmp_path / "bt")]) == 1  # fmt: skip
    assert "--labels" in capsys.readouterr().err
    assert main(["backtest", str(features), "--labels", "l.csv", "--horizons", "abc",
                 "--out", str(tmp_path / "bt")]) == 2  # fmt: skip
    assert "--horizons" in capsys.readouterr().err
    assert main(["label", "/nonexistent", "--metric", "acc", "--out", str(tmp_path / "l.csv")]) == 1
    assert "TABLE /nonexistent: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("hostile", ["ESCAPE", "../escaped", "a/b", ".."])
def test_group_values_never_become_paths_outside_out(tmp_path, capsys, hostile):
    """`fit --group-by model` named each group's folder with the value as it was: an
    absolute value replaced --out, `../x` climbed out of it (exit 0)."""
    from polymap.nulls import draw

    outside = tmp_path / "outside"
    value = str(outside) if hostile == "ESCAPE" else hostile
    table = draw("offsets", n_runs=6, seed=0)
    table["model"] = np.where(table["run"].isin(["run0", "run1", "run2"]), "ok", value)
    path = tmp_path / "f.parquet"
    table.to_parquet(path)
    out = tmp_path / "work" / "out"
    argv = ["fit", str(path), "--group-by", "model", "--states", "1", "--restarts", "1"]
    assert main([*argv, "--out", str(out), "-q"]) == 1
    assert "group value" in capsys.readouterr().err
    assert not outside.exists() and not (tmp_path / "work" / "escaped").exists()
    assert not (out / "ok").exists()  # checked before any fit: nothing half-written
    # a crafted groups.json is refused where it is read, not followed
    model = tmp_path / "m"
    model.mkdir()
    (model / "groups.json").write_text(json.dumps({"group_by": "model", "groups": [value]}))
    assert main(["describe", str(model)]) == 1
    assert "groups.json: group value" in capsys.readouterr().err


def test_rule_numbers_out_of_range_are_usage_errors_before_any_work(tmp_path, capsys):
    """A NaN gap or a negative spike threshold marked most healthy runs unstable (exit 0);
    `lasting=0` every run; `jobs=0`; `--horizons 1.5` exited 1 after loading."""
    import polymap
    from polymap.errors import UsageError
    from polymap.scoring import label_runs

    missing = str(tmp_path / "missing.parquet")  # never read: the flags fail first
    for flags in (["--min-gap", "nan"], ["--min-gap", "-1"], ["--min-gap", "inf"],
                  ["--spike", "nan"], ["--spike", "-5"], ["--spike", "inf"]):  # fmt: skip
        out = tmp_path / "l.csv"
        assert main(["label", missing, "--metric", "acc", *flags, "--out", str(out)]) == 2, flags
        assert not out.exists()
    assert "must be a finite number" in capsys.readouterr().err
    table = pd.DataFrame({"run": list("aabbcc"), "step": [1, 2] * 3, "acc": [0.5, 0.6] * 3})
    for bad in ({"lasting": 0}, {"min_gap": float("nan")}, {"spike": -5.0}):
        with pytest.raises(UsageError):
            label_runs(table, "acc", **bad)
    with pytest.raises(UsageError, match="jobs=0"):
        polymap.extract(tmp_path, jobs=0)
    assert main(["backtest", missing, "--labels", "l.csv", "--horizons", "0.25,1.5",
                 "--out", str(tmp_path / "b")]) == 2  # fmt: skip
    assert "(0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", ".metadata"])
def test_a_fifo_in_place_of_a_checkpoint_file_is_refused_not_waited_on(tmp_path, name):
    """`open()` on a FIFO named model.safetensors blocked the sweep forever."""
    run = tmp_path / "runs" / "seed0"
    (checkpoint,) = make_tiny_run(run, steps=(0,), seed=0)
    if name == ".metadata":  # a DCP checkpoint's metadata
        for file in checkpoint.iterdir():
            file.unlink()
    else:
        (checkpoint / name).unlink()
    os.mkfifo(checkpoint / name)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(" ".join(str(i % 50) for i in range(64)))
    out = tmp_path / "f.parquet"
    sets = "hu2023,evals_native" if name == "config.json" else "hu2023"  # one that loads it
    cmd = [sys.executable, "-m", "polymap", "extract", str(tmp_path / "runs"), "--out", str(out),
           "--features", sets, "--probe-tokens", str(tokens), "-q"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    row = pd.read_parquet(out).iloc[0] if out.exists() else None
    assert row is not None and f"{name}: a FIFO, not a weight file; refused" in row["error"]
    if name == "config.json":  # the weights are still read; the model-level set is skipped
        assert row["status"] == "warning" and not math.isnan(row["hu2023.l2"])
    else:
        assert done.returncode == 1 and row["status"] == "failed", done.stderr[-2000:]


@pytest.mark.parametrize(
    ("column", "value", "why"),
    [("step", 0.4, "not a whole number"), ("step", -3, "outside 0 <= step"),
     ("step", "ten", "not a number"), ("step", float("nan"), "not a number"),
     ("step", np.uint64(2**63 + 5), "beyond int64"), ("run", "", "empty run name"),
     ("status", "exploded", "not one of"), ("seed", "seven", "not a number")],
)  # fmt: skip
def test_feature_table_key_columns_are_validated_on_read(tmp_path, column, value, why):
    """Fractional steps were truncated (0.4 -> 0), negative ones accepted, uint64 steps
    >= 2^63 wrapped negative, any status string accepted; words were tracebacks."""
    from polymap.table import TableError, read_table

    good = {"run": ["a", "a", "b"], "step": [0, 1, 2], "status": ["ok", "ok", "ok"],
            "seed": ["1", "1", "2"]}  # fmt: skip
    table = pd.DataFrame({"run": good["run"], "step": good["step"], "x.f": [1.0, 2.0, 3.0]})
    if isinstance(value, np.uint64):
        table["step"] = np.array([0, 1, value], dtype=np.uint64)
    elif isinstance(value, str):  # a column of words (Parquet stores one type a column)
        table[column] = [*good[column][:2], value] if column != "step" else ["0", "1", value]
    else:
        table[column] = np.array([*good[column][:2], value], dtype=float)
    path = tmp_path / "t.parquet"
    table.to_parquet(path)
    with pytest.raises(TableError, match=rf"t\.parquet: column '{column}': {why}.*row 2"):
        read_table(path)
