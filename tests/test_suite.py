"""polymap suite: layout, schedule, determinism, loading, resumption and bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import SMALL

import polymap
from polymap.cli import main
from polymap.corpus import CorpusError
from polymap.suite import (
    SuiteError,
    build,
    checkpoint_steps,
    learning_rate,
    measure_instability,
)


def test_schedule():
    steps = checkpoint_steps(400)
    assert steps[0] == 0 and steps[-1] == 400 and 25 <= len(steps) <= 40
    assert steps[1:5] == [1, 2, 4, 8]
    gaps = {b - a for a, b in zip(steps[5:-2], steps[6:-1], strict=True)}
    assert gaps == {13}
    assert learning_rate(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert learning_rate(55, 100, 1.0, 10, period=0.5) == pytest.approx(0.1)
    assert learning_rate(100, 100, 1.0, 10, period=0.5) == pytest.approx(1.0)


def test_layout_logs_and_manifest(small_suite):
    manifest = json.loads((small_suite / "manifest.json").read_text())
    runs = {r["run"]: r for r in manifest["runs"]}
    assert sorted(runs) == ["pico-seed0", "pico-seed1", "pico-seed2"]
    assert [runs[r]["planted"] for r in sorted(runs)] == [False, False, True]
    assert runs["pico-seed2"]["config"]["lr_period"] == 0.5
    expected = checkpoint_steps(24)
    for name in runs:
        dirs = sorted(int(p.name[4:]) for p in (small_suite / name).glob("step*"))
        assert dirs == expected
        with open(small_suite / name / "train_log.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert [int(r["step"]) for r in rows] == list(range(1, 25))
        assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "tokens"}
        assert int(rows[-1]["tokens"]) == 24 * 16 * 64
        with open(small_suite / name / "eval_log.csv") as fh:
            assert [int(r["step"]) for r in csv.DictReader(fh)] == expected
        assert not list(small_suite.glob("*.partial"))


def test_checkpoints_load_offline_and_extract(small_suite, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = small_suite / "pico-seed0" / "step24"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenizer("def f(x): return x", return_tensors="pt").input_ids
    assert model.config.model_type == "gpt_neox" and model.config.use_parallel_residual
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.25  # Pythia's rotary_pct
    assert not model.config.tie_word_embeddings
    assert model(ids).logits.shape[-1] == len(tokenizer)
    table = polymap.extract(small_suite, features="hu2023", device="cpu", progress=False)
    assert len(table) == 3 * len(checkpoint_steps(24))
    assert (table["status"] == "ok").all()


@pytest.mark.slow
def test_bit_identical_and_independent_of_jobs(small_suite, tmp_path):
    other = tmp_path / "again"
    build(other, jobs=2, **SMALL)
    for path in small_suite.glob("*/step*/model.safetensors"):
        twin = other / path.relative_to(small_suite)
        assert path.read_bytes() == twin.read_bytes(), path


def test_resume_keeps_finished_runs_and_restarts_partial(small_suite, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(small_suite, out)
    kept = out / "pico-seed0" / "step24" / "model.safetensors"
    mtime = kept.stat().st_mtime_ns
    shutil.rmtree(out / "pico-seed1")
    (out / "pico-seed1.partial" / "step0").mkdir(parents=True)  # an interrupted run
    build(out, **SMALL)
    assert kept.stat().st_mtime_ns == mtime
    assert not (out / "pico-seed1.partial").exists()
    rebuilt = out / "pico-seed1" / "step24" / "model.safetensors"
    original = small_suite / "pico-seed1" / "step24" / "model.safetensors"
    assert rebuilt.read_bytes() == original.read_bytes()


def test_bad_input_fails_before_training(tmp_path, small_suite):
    with pytest.raises(SuiteError, match=r"unknown size\(s\) \['giga'\]"):
        build(tmp_path / "a", sizes="giga", progress=False)
    with pytest.raises(SuiteError, match="seeds '1,x'"):
        build(tmp_path / "a", seeds="1,x", progress=False)
    with pytest.raises(SuiteError, match=r"--unstable seeds \[7\] are not among"):
        build(tmp_path / "a", seeds="0-3", unstable="7", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(CorpusError, match="empty"):
        build(tmp_path / "a", corpus=empty, progress=False)
    with pytest.raises(CorpusError, match="cannot read"):
        build(tmp_path / "a", corpus=tmp_path / "missing.txt", progress=False)
    with pytest.raises(SuiteError, match="holds a different run"):
        build(small_suite, **{**SMALL, "steps": 30})
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").glob("pico-*"))
    assert main(["suite", "--out", str(tmp_path / "b"), "--sizes", "giga", "-q"]) == 2


def test_measure_instability(tmp_path):
    log = tmp_path / "eval_log.csv"
    log.write_text("step,val_loss\n0,6.0\n10,5.0\n20,4.5\n30,4.52\n40,4.6\n50,4.4\n")
    assert measure_instability(log) == (True, 40)
    log.write_text("step,val_loss\n0,6.0\n10,5.0\n20,4.5\n30,4.52\n")
    assert measure_instability(log) == (False, None)
    log.write_text("step,val_loss\n0,6.0\n10,nan\n")
    assert measure_instability(log) == (True, 10)


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    """``polymap demo`` at 3 seeds x 24 steps; returns (out, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            ["demo", "--out", str(out), "--n-seeds", "3", "--train-steps", "24", "--jobs", "1"]
        )
    assert code == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_demo_reduced_configuration(reduced_demo, capsys):
    out, printed = reduced_demo
    assert "Training map: K=" in printed and "Risk at 25% of training" in printed
    assert "nano-seed2" in printed
    # 24 steps are too short for the planted defect to show: the backtest says why.
    assert "backtest skipped: labels need both stable and unstable runs" in printed
    for name in ("scores.csv", "labels.csv", "model/graph.json", "evals.parquet"):
        assert (out / name).exists(), name
    assert "Report: " in printed and "Done in" in printed
    table = polymap.read_table(out / "features.parquet")
    assert len(table) == 3 * len(checkpoint_steps(24)) and (table["status"] == "ok").all()
    assert table["evals_native.loss"].notna().all()
    # real lm-eval ran on 8 checkpoints per run and was ingested
    evals = polymap.read_table(out / "evals.parquet")
    assert len(evals) == 3 * 8 and evals["eval.suite_lastword.acc"].between(0, 1).all()
    assert len(list((out / "lm-eval" / "results").rglob("results_*.json"))) == 24
    report = out / "report"
    for name in (
        "report.html",
        "training_map.png",
        "training_map.svg",
        "training_map.dot",
        "training_map.json",
        "timelines.png",
        "risk.png",
        "selection.png",
    ):
        assert (report / name).stat().st_size > 0, name
    # A second run reuses the suite, the table and lm-eval's results.
    capsys.readouterr()
    assert (
        main(["demo", "--out", str(out), "--n-seeds", "3", "--train-steps", "24", "--jobs", "1"])
        == 0
    )
    assert len(list((out / "lm-eval" / "results").rglob("results_*.json"))) == 24  # none redone


@pytest.mark.slow
def test_walkthrough_notebook_runs_on_the_demo_outputs(reduced_demo):
    """The walkthrough notebook executes top to bottom on the demo's outputs."""
    demo_out, _ = reduced_demo
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = Path(__file__).parent.parent / "notebooks" / "walkthrough.ipynb"
    notebook = nbformat.read(path, as_version=4)
    os.environ["POLYMAP_DEMO_OUT"] = str(demo_out)
    try:
        client = nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )  # fmt: skip
        client.execute()
    finally:
        os.environ.pop("POLYMAP_DEMO_OUT", None)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
    assert (demo_out / "notebook-model" / "graph.json").exists()


def test_training_map_on_a_suite(small_suite, tmp_path, capsys):
    features = tmp_path / "f.parquet"
    polymap.extract(small_suite, out=features, features="hu2023", device="cpu", progress=False)
    out = tmp_path / "model"
    assert main(["fit", str(features), "--out", str(out), "--restarts", "2", "-q"]) == 0
    capsys.readouterr()
    assert main(["describe", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Why K=" in text and "held-out log-likelihood" in text and "state 0" in text


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _lr_column(run: Path) -> list[str]:
    with open(run / "train_log.csv") as fh:
        return [r["lr"] for r in csv.DictReader(fh)]


def test_every_defect_differs_from_the_healthy_run_only_by_itself(small_suite, tmp_path):
    """One planted seed per defect against the healthy run of the same seed: same config
    except the defect (and the schedule for the schedule defect), same step-0 weights,
    same logged LR unless the defect is the schedule; the manifest records it all."""
    from polymap.suite.defects import DEFECTS

    healthy = small_suite / "pico-seed1"
    healthy_spec = json.loads((healthy / "run.json").read_text())
    for name, defect in DEFECTS.items():
        out = tmp_path / name
        build(out, sizes="pico", seeds="1", steps=24, unstable="1", defect=name, progress=False)
        run = out / "pico-seed1"
        spec = json.loads((run / "run.json").read_text())
        changed = {k for k in spec if spec[k] != healthy_spec[k]}
        allowed = {"planted", "defect", "strength"}
        if name == "lr_schedule":
            allowed |= {"peak_lr", "lr_period"}
        assert changed <= allowed and {"planted", "defect", "strength"} <= changed, name
        assert spec["strength"] == defect.default
        if name != "lr_schedule":
            assert _lr_column(run) == _lr_column(healthy), name
        else:
            assert _lr_column(run) != _lr_column(healthy)
        start, other = _tensors(run / "step0"), _tensors(healthy / "step0")
        assert all((start[k] == other[k]).all() for k in other), name
        end, other_end = _tensors(run / "step24"), _tensors(healthy / "step24")
        assert any((end[k] != other_end[k]).any() for k in other_end), name
        manifest = json.loads((out / "manifest.json").read_text())
        (entry,) = manifest["runs"]
        assert entry["defect"] == name and entry["strength"] == defect.default
        assert entry["planted"] and isinstance(entry["unstable"], bool)
        assert "onset_step" in entry


def test_defect_arguments(tmp_path, capsys):
    from polymap.suite import run_specs
    from polymap.suite.defects import DEFECTS, round_mantissa

    assert main(["suite", "--list-defects"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(DEFECTS)
    assert all("strength" in line for line in lines)
    specs = run_specs(["pico"], "0-1", 24, unstable="1")  # no --defect: today's default
    assert specs[1].defect == "lr_schedule" and specs[1].strength == 4.0
    assert specs[1].peak_lr == pytest.approx(4 * specs[0].peak_lr)
    assert specs[1].lr_period == 0.5 and specs[0].defect == ""
    weak = run_specs(["pico"], "0-1", 24, unstable="1", defect="lr_schedule:2")[1]
    assert weak.peak_lr == pytest.approx(2 * specs[0].peak_lr)
    for bad in ("nope", "precision:99", "data_repeat:x"):
        with pytest.raises(SuiteError):
            run_specs(["pico"], "0-1", 24, unstable="1", defect=bad)
    with pytest.raises(SuiteError, match="no --unstable"):
        run_specs(["pico"], "0-1", 24, unstable="", defect="precision")
    assert main(["suite", "--out", str(tmp_path / "x"), "--defect", "nope", "-q"]) == 2
    # 7 mantissa bits = bfloat16: the rounding agrees with torch's own bf16 cast
    import torch

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(round_mantissa(x, 7), x.to(torch.bfloat16).to(torch.float32))
    capsys.readouterr()


def test_build_leaves_the_callers_torch_state_alone(tmp_path):
    import torch

    before_threads = torch.get_num_threads()
    torch.set_num_threads(max(2, before_threads))
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    try:
        build(tmp_path / "s", sizes="pico", seeds="0", steps=20, unstable="", progress=False,
              jobs=1)  # fmt: skip
        assert torch.get_num_threads() == threads  # not left at the training's 1 thread
        assert torch.are_deterministic_algorithms_enabled() == deterministic
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        torch.set_num_threads(before_threads)
