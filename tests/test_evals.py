"""Eval scores as features: lm-eval JSON ingestion (0.3 and 0.4), running real lm-eval on
suite checkpoints with a local task, the ``evals_native`` feature set, merging."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import edited_checkpoint

import polymap
from polymap.cli import main
from polymap.evals import EvalFileError, ingest, read_results_file
from polymap.evals.harness import HarnessError, run_harness
from polymap.evals.tasks import DEFAULT_TASK, write_last_word_task
from polymap.table import TableError, merge_tables, read_table


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# --- 0.3 format: the published Pythia evaluations -------------------------------------


def test_pythia_ingest_all_runs_and_published_values(pythia_evals):
    table, report = ingest(pythia_evals)
    assert report.ok and not report.duplicates and report.files == 16 * 27 + 2 * 15
    assert table["run"].nunique() == 16 and len(table) == 16 * 27
    assert set(table.groupby("run").size()) == {27}
    assert "pythia-160m" in set(table["run"]) and "pythia-1b-bf16" in set(table["run"])
    assert sorted(table.loc[table["run"] == "pythia-70m", "step"])[:4] == [0, 1, 2, 4]
    # every value is the one in the JSON file it came from
    for run, short, step, task, metric in [
        ("pythia-160m", "160m", 13000, "wsc", "acc"),
        ("pythia-70m", "70m", 143000, "lambada_openai", "acc"),
        ("pythia-12b-deduped", "12b-deduped", 512, "arc_challenge", "acc_norm"),
        ("pythia-410m", "410m", 0, "crows_pairs_english_age", "pct_stereotype"),
    ]:
        raw = json.loads(
            (pythia_evals / run / "zero-shot" / f"{short}_step{step}.json").read_text()
        )
        row = table[(table["run"] == run) & (table["step"] == step)].iloc[0]
        assert row[f"eval.{task}.{metric}"] == raw["results"][task][metric]
    # five-shot results keep their setting; zero-shot files of 1b-bf16 named "5shot" do not
    raw = json.loads((pythia_evals / "pythia-160m/five-shot/160m-5shot_step13000.json").read_text())
    row = table[(table["run"] == "pythia-160m") & (table["step"] == 13000)].iloc[0]
    assert row["eval.5shot.wsc.acc"] == raw["results"]["wsc"]["acc"]
    assert row["eval.wsc.acc"] != row["eval.5shot.wsc.acc"]
    raw = json.loads(
        (pythia_evals / "pythia-1b-bf16/zero-shot/1b-bf16-5shot_step128.json").read_text()
    )
    row = table[(table["run"] == "pythia-1b-bf16") & (table["step"] == 128)].iloc[0]
    assert raw["config"]["num_fewshot"] == 0
    assert row["eval.piqa.acc"] == raw["results"]["piqa"]["acc"]
    assert math.isnan(row["eval.5shot.piqa.acc"])
    assert row["eval.piqa.acc_stderr"] == raw["results"]["piqa"]["acc_stderr"]  # kept


def test_pythia_known_real_world_shape(pythia_evals):
    """lambada_openai of pythia-70m peaks around steps 23k-53k, then declines; tasks sit
    near chance before step 1000."""
    table, _ = ingest(pythia_evals / "pythia-70m")
    acc = table.set_index("step")["eval.lambada_openai.acc"]
    assert 23000 <= acc.idxmax() <= 53000 and acc[143000] < acc.max()
    assert table.loc[table["step"] < 1000, "eval.piqa.acc"].between(0.45, 0.6).all()


def test_cli_ingest_pythia(pythia_evals, tmp_path, capsys):
    out = tmp_path / "e.parquet"
    assert main(["evals", "ingest", str(pythia_evals), "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    assert table["run"].nunique() == 16 and len(table) == 432
    assert "eval.wsc.acc_stderr" in table.columns  # measurement noise kept by default
    assert "432 checkpoint(s) of 16 run(s)" in capsys.readouterr().out
    bare = tmp_path / "bare.parquet"
    assert main(["evals", "ingest", str(pythia_evals), "--out", str(bare), "--no-stderr"]) == 0
    assert not any(c.endswith("_stderr") for c in pd.read_parquet(bare).columns)


# --- 0.4 format: files written by really running lm-eval on suite checkpoints ----------


@pytest.fixture(scope="session")
def lm_eval_out(small_suite, tmp_path_factory):
    """lm-eval results for two suite runs at steps 0 and 24, on the local last-word task."""
    root = tmp_path_factory.mktemp("lmeval")
    os.environ.setdefault("HF_DATASETS_CACHE", str(root / "datasets-cache"))
    tasks = write_last_word_task(root / "tasks")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        sources = [small_suite / "pico-seed0", small_suite / "pico-seed2"]
        report = run_harness(
            sources, DEFAULT_TASK, out, include_path=tasks, steps="0,24", limit=16,
            device="cpu", progress=False,
        )  # fmt: skip
    assert not report.failed and len(report.written) == 4
    return {"out": out, "tasks": tasks, "suite": small_suite}


def _greedy_and_loglik(directory: Path, examples: list[dict]) -> tuple[float, float]:
    """Independent re-computation of the last-word task: accuracy (is the target the
    greedy continuation?) and perplexity exp(-mean log p(target | context))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    max_length = model.config.max_position_embeddings
    hits, logliks = [], []
    for ex in examples:
        context, continuation = ex["context"], " " + ex["target"]
        whole = tok.encode(context + continuation)
        ctx = tok.encode(context)
        cont = whole[len(ctx) :]
        ids = (ctx + cont)[-(max_length + 1) :][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        logp = logp[-len(cont) :]
        hits.append(logp.argmax(-1).tolist() == cont)
        logliks.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
    return float(np.mean(hits)), math.exp(-np.mean(logliks))


def test_lm_eval_files_ingest_with_values(lm_eval_out):
    out = lm_eval_out["out"]
    files = sorted(out.rglob("results_*.json"))
    assert [f.relative_to(out).parts[:2] for f in files] == [
        ("pico-seed0", "step0"), ("pico-seed0", "step24"),
        ("pico-seed2", "step0"), ("pico-seed2", "step24"),
    ]  # fmt: skip
    raw = json.loads(files[1].read_text())
    assert "acc,none" in raw["results"][DEFAULT_TASK] and raw["n-shot"][DEFAULT_TASK] == 0
    table, report = ingest(out, stderr=True)
    assert report.ok and list(zip(table["run"], table["step"], strict=True)) == [
        ("pico-seed0", 0), ("pico-seed0", 24), ("pico-seed2", 0), ("pico-seed2", 24),
    ]  # fmt: skip
    row = table.iloc[1]
    result = raw["results"][DEFAULT_TASK]
    assert row[f"eval.{DEFAULT_TASK}.acc"] == result["acc,none"]
    assert row[f"eval.{DEFAULT_TASK}.acc_stderr"] == result["acc_stderr,none"]
    assert row[f"eval.{DEFAULT_TASK}.perplexity"] == result["perplexity,none"]
    # the numbers are right: recompute the task on the first 16 examples independently
    examples = [
        json.loads(line)
        for line in (lm_eval_out["tasks"] / f"{DEFAULT_TASK}.jsonl").read_text().splitlines()
    ][:16]
    acc, ppl = _greedy_and_loglik(lm_eval_out["suite"] / "pico-seed0" / "step24", examples)
    assert row[f"eval.{DEFAULT_TASK}.acc"] == pytest.approx(acc)
    assert row[f"eval.{DEFAULT_TASK}.perplexity"] == pytest.approx(ppl, rel=1e-4)


def test_lm_eval_rerun_skips_finished_checkpoints(lm_eval_out):
    report = run_harness(
        [lm_eval_out["suite"] / "pico-seed0"], DEFAULT_TASK, lm_eval_out["out"],
        include_path=lm_eval_out["tasks"], steps="0,24", limit=16, device="cpu", progress=False,
    )  # fmt: skip
    assert report.skipped == 2 and not report.written and not report.failed


def test_lm_eval_unknown_task_is_a_clear_error(lm_eval_out, tmp_path):
    with pytest.raises(HarnessError, match="include-path"):
        run_harness(lm_eval_out["suite"], "no_such_task_xyz", tmp_path, progress=False)


def test_duplicates_keep_the_newest_and_are_reported(lm_eval_out, tmp_path):
    src = sorted(lm_eval_out["out"].rglob("results_*.json"))[1]  # pico-seed0 step24
    data = json.loads(src.read_text())
    first = tmp_path / "a" / "results_2024-01-01T00-00-00.000000.json"
    second = tmp_path / "b" / "results_2024-06-01T00-00-00.000000.json"
    for path, acc, date in ((first, 0.11, 1.0e9), (second, 0.22, 2.0e9)):
        path.parent.mkdir()
        data["results"][DEFAULT_TASK]["acc,none"] = acc
        data["date"] = date
        path.write_text(json.dumps(data))
    table, report = ingest([second, first])
    assert len(table) == 1 and table.loc[0, f"eval.{DEFAULT_TASK}.acc"] == 0.22
    assert len(report.duplicates) == 1 and str(second) in report.duplicates[0]
    assert "kept" in report.duplicates[0] and str(first) in report.duplicates[0]


def _v04(path: Path, results: dict, model_args: str | None = "pretrained=/x/run1/step5"):
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"model": "hf"} | ({"model_args": model_args} if model_args is not None else {})
    path.write_text(json.dumps({"results": results, "config": config, "n-shot": {}}))
    return path


def test_bad_inputs_are_reported_and_the_rest_kept(tmp_path):
    good = _v04(tmp_path / "good.json", {"piqa": {"acc,none": 0.6, "acc_stderr,none": "N/A"}})
    truncated = tmp_path / "truncated.json"
    truncated.write_text(good.read_text()[:40])
    anonymous = _v04(tmp_path / "results_x.json", {"piqa": {"acc,none": 0.5}}, model_args=None)
    odd = _v04(
        tmp_path / "odd.json",
        {"arc": {"acc,none": [0.1, 0.2], "acc_norm,none": 0.4, "alias": "arc"}, "weird": 3},
        "pretrained=EleutherAI/pythia-70m,revision=step8",
    )
    table, report = ingest(tmp_path, stderr=True)
    problems = dict(report.problems)
    assert "not valid JSON" in problems[str(truncated)]
    assert "no step information" in problems[str(anonymous)]
    assert "unknown metric shape" in " ".join(r for f, r in report.problems if f == str(odd))
    assert "unknown result shape" in " ".join(r for f, r in report.problems if f == str(odd))
    assert sorted(zip(table["run"], table["step"], strict=True)) == [("pythia-70m", 8), ("run1", 5)]
    run1 = table[table["run"] == "run1"].iloc[0]
    assert run1["eval.piqa.acc"] == 0.6 and math.isnan(run1["eval.piqa.acc_stderr"])
    p70 = table[table["run"] == "pythia-70m"].iloc[0]
    assert p70["eval.arc.acc_norm"] == 0.4 and "eval.arc.acc" not in table.columns
    with pytest.raises(EvalFileError, match="not valid JSON"):
        read_results_file(truncated)


def test_manifest_and_layout_give_run_and_step(tmp_path):
    _v04(tmp_path / "x" / "r.json", {"piqa": {"acc,none": 0.5}}, model_args=None)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,run,step\nx/r.json,runA,300\n")
    table, report = ingest(tmp_path / "x", manifest=manifest)
    assert report.ok and (table.loc[0, "run"], table.loc[0, "step"]) == ("runA", 300)
    laid = _v04(tmp_path / "y" / "seed3" / "3-shot" / "s_step40.json", {"t": {"acc": 0.3}}, None)
    record = read_results_file(laid)
    assert (record.run, record.step) == ("seed3", 40)
    in_step_dir = _v04(
        tmp_path / "z" / "runB" / "step7" / "results_1.json", {"t": {"acc": 1}}, None
    )
    assert (read_results_file(in_step_dir).run, read_results_file(in_step_dir).step) == ("runB", 7)


def test_cli_ingest_exit_codes(tmp_path, capsys):
    _v04(tmp_path / "in" / "good.json", {"piqa": {"acc,none": 0.6}})
    (tmp_path / "in" / "bad.json").write_text("{")
    out = tmp_path / "e.parquet"
    assert main(["evals", "ingest", str(tmp_path / "in"), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "bad.json" in text and "1 checkpoint(s) of 1 run(s)" in text
    assert read_table(out).loc[0, "eval.piqa.acc"] == 0.6
    assert main(["evals", "ingest", str(tmp_path / "nowhere"), "--out", str(out)]) == 1


# --- native evals -----------------------------------------------------------------------


def _reference_native(directory: Path, ids: torch.Tensor) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)  # transformers' own LM loss
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
    return loss, float((pred == ids[:, 1:]).float().mean())


def test_evals_native_matches_transformers_loss(small_suite):
    from polymap.features.probe import ProbeSpec, build_probe

    ckpt = small_suite / "pico-seed0" / "step24"
    spec = ProbeSpec(sequences=2, eval_sequences=6, length=32, batch_size=4)
    row = polymap.extract_checkpoint(
        polymap.CheckpointRef("pico-seed0", 24, str(ckpt)), "evals_native", "cpu", probe=spec
    )
    assert row["status"] == "ok", row["error"]
    probe = build_probe(spec, ckpt)
    assert probe.ids.shape == (2, 32) and probe.eval_ids.shape == (6, 32)
    assert torch.equal(probe.ids, probe.eval_ids[:2])  # statistics use the first rows
    loss, acc = _reference_native(ckpt, probe.eval_ids)
    assert row["evals_native.loss"] == pytest.approx(loss, rel=1e-5)
    assert row["evals_native.perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert row["evals_native.token_acc"] == pytest.approx(acc)
    # an untrained model is near-uniform over the 512-token vocabulary
    row0 = polymap.extract_checkpoint(
        polymap.CheckpointRef("pico-seed0", 0, str(small_suite / "pico-seed0" / "step0")),
        "evals_native", "cpu", probe=spec,
    )  # fmt: skip
    assert 400 < row0["evals_native.perplexity"] < 650 > row["evals_native.perplexity"]


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2", "llama"])
def test_evals_native_with_probe_tokens(tiny_runs, tmp_path, arch):
    from polymap.features.probe import ProbeSpec

    ids = np.random.default_rng(0).integers(0, 64, size=3 * 16)
    np.save(tmp_path / "probe.npy", ids)
    ckpt = tiny_runs[arch] / "step4"
    spec = ProbeSpec(sequences=1, eval_sequences=3, length=16, tokens=str(tmp_path / "probe.npy"))
    row = polymap.extract_checkpoint(
        polymap.CheckpointRef(arch, 4, str(ckpt)), "hu2023,evals_native", "cpu", probe=spec
    )
    assert row["status"] == "ok", row["error"]
    loss, acc = _reference_native(ckpt, torch.as_tensor(ids).reshape(3, 16))
    assert row["evals_native.loss"] == pytest.approx(loss, rel=1e-5)
    assert row["evals_native.token_acc"] == pytest.approx(acc)
    assert not math.isnan(row["hu2023.l2"])


def test_evals_native_bad_input(tiny_runs, tmp_path):
    from polymap.features.probe import ProbeSpec

    ref = polymap.CheckpointRef("gpt2", 4, str(tiny_runs["gpt2"] / "step4"))
    row = polymap.extract_checkpoint(ref, "hu2023,evals_native", "cpu")  # no tokenizer saved
    assert row["status"] == "warning" and "--probe-tokens" in row["error"]
    assert not math.isnan(row["hu2023.l2"]) and math.isnan(row["evals_native.loss"])
    (tmp_path / "short.txt").write_text("1 2 3")
    short = ProbeSpec(sequences=4, eval_sequences=4, length=16, tokens=str(tmp_path / "short.txt"))
    row = polymap.extract_checkpoint(ref, "evals_native", "cpu", probe=short)
    assert "fewer than one sequence" in row["error"]
    (tmp_path / "some.txt").write_text(" ".join(["5"] * 40))
    some = ProbeSpec(sequences=1, eval_sequences=4, length=16, tokens=str(tmp_path / "some.txt"))
    row = polymap.extract_checkpoint(ref, "evals_native", "cpu", probe=some)
    assert "2 of 4 sequences" in row["error"] and not math.isnan(row["evals_native.loss"])
    bert = polymap.CheckpointRef("bert", 4, str(tiny_runs["bert"] / "step4"))
    row = polymap.extract_checkpoint(bert, "evals_native", "cpu", probe=some)
    assert row["status"] == "warning" and "causal" in row["error"]


def test_evals_native_nan_weights_are_recorded(tiny_runs, tmp_path):
    from polymap.features.probe import ProbeSpec

    def plant_nan(tensors):
        name = next(n for n in tensors if "dense_h_to_4h.weight" in n)
        tensors[name][0, 0] = float("nan")

    ckpt = edited_checkpoint(tiny_runs["gpt_neox"] / "step4", tmp_path / "step4", plant_nan)
    np.save(tmp_path / "p.npy", np.arange(32) % 50)
    spec = ProbeSpec(sequences=2, eval_sequences=2, length=16, tokens=str(tmp_path / "p.npy"))
    row = polymap.extract_checkpoint(polymap.CheckpointRef("r", 4, str(ckpt)), "evals_native",
                                     "cpu", probe=spec)  # fmt: skip
    assert row["status"] == "nonfinite" and "non-finite logits" in row["error"]
    assert math.isnan(row["evals_native.loss"])


# --- merging and eval-only phase models ----------------------------------------------


def test_merge_weight_features_with_evals(lm_eval_out):
    weights = polymap.extract(
        [lm_eval_out["suite"] / "pico-seed0"], features="hu2023", steps="0,24", progress=False
    )
    evals, _ = ingest(lm_eval_out["out"])
    merged = merge_tables([weights, evals])
    assert len(merged) == 4  # outer join: pico-seed2 has evals only
    row = merged[(merged["run"] == "pico-seed0") & (merged["step"] == 24)].iloc[0]
    assert row["hu2023.l2"] == weights.loc[weights["step"] == 24, "hu2023.l2"].iloc[0]
    assert row[f"eval.{DEFAULT_TASK}.acc"] == evals.loc[1, f"eval.{DEFAULT_TASK}.acc"]
    assert row["feature_sets"] == "hu2023,eval"
    assert len(merge_tables([weights, evals], how="inner")) == 2
    with pytest.raises(TableError, match="repeats feature column"):
        merge_tables([evals, evals])


def test_phase_model_and_scorer_on_eval_only_table(pythia_evals):
    from polymap.phases import PhaseModel
    from polymap.scoring import RiskScorer

    table, _ = ingest(pythia_evals)
    columns = ["eval.lambada_openai.acc", "eval.piqa.acc", "eval.arc_easy.acc", "eval.sciq.acc"]
    model = PhaseModel(n_states=3, features=columns, random_state=0, restarts=2).fit(table)
    paths = model.predict(table)
    assert set(paths["state"]) == {0, 1, 2}
    first = paths.sort_values("step").groupby("run")["state"].first()
    last = paths.sort_values("step").groupby("run")["state"].last()
    assert (first != last).all()  # every run leaves its initial phase
    scores = RiskScorer(phase_model=model, features=columns).fit(table)
    scores = scores.score_reference(until_step=13000)
    assert len(scores) == 16 and scores["risk"].between(0, 1).all()
    assert scores["p_value"].between(0, 1).all()


@pytest.mark.slow
def test_pythia_eval_phases_example(pythia_evals, tmp_path, capsys):
    """The documented example runs and finds the size split it describes."""
    import runpy

    example = runpy.run_path(str(Path(__file__).parent.parent / "examples/pythia_eval_phases.py"))
    example["main"]([str(pythia_evals), "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "462 files -> 432 checkpoints of 16 runs" in text and "risk from checkpoints" in text
    paths = pd.read_csv(tmp_path / "model" / "paths.csv")
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == 16 and set(paths["run"]) == set(scores["run"])
    # early (chance-level) checkpoints share a state across all runs
    early = paths[paths["step"] <= 4].groupby("step")["state"].nunique()
    assert (early == 1).all()


def test_probe_is_saved_with_the_table_and_reproduces(small_suite, tmp_path):
    from polymap.features.probe import ProbeSpec

    out = tmp_path / "f.parquet"
    spec = ProbeSpec(sequences=2, eval_sequences=3, length=32)
    first = polymap.extract([small_suite / "pico-seed0"], out=out, features="evals_native",
                            steps="24", probe=spec, progress=False)  # fmt: skip
    saved = np.load(tmp_path / "f.parquet.probe.npy")
    meta = json.loads((tmp_path / "f.parquet.probe.json").read_text())
    assert saved.shape == (3, 32) and meta["spec"]["eval_sequences"] == 3
    again = polymap.extract([small_suite / "pico-seed0"], features="evals_native", steps="24",
                            probe=ProbeSpec(sequences=2, eval_sequences=3, length=32,
                                            tokens=str(tmp_path / "f.parquet.probe.npy")),
                            progress=False)  # fmt: skip
    assert again["evals_native.loss"].iloc[0] == first["evals_native.loss"].iloc[0]
    # extending the table with another probe re-extracts the model-level rows already there
    # (never a table whose loss was measured on two different probes)
    bigger = ProbeSpec(sequences=2, eval_sequences=5, length=32)
    extended = polymap.extract([small_suite / "pico-seed0"], out=out, features="evals_native",
                               steps="0,24", probe=bigger, progress=False)  # fmt: skip
    alone = polymap.extract([small_suite / "pico-seed0"], features="evals_native",
                            steps="0,24", probe=bigger, progress=False)  # fmt: skip
    assert extended["evals_native.loss"].tolist() == alone["evals_native.loss"].tolist()
    assert extended["evals_native.loss"].iloc[1] != first["evals_native.loss"].iloc[0]
    assert (
        json.loads((tmp_path / "f.parquet.probe.json").read_text())["spec"]["eval_sequences"] == 5
    )


def test_a_new_probe_recomputes_every_model_level_set_of_the_table(small_suite, tmp_path):
    """`gradients` was extracted on probe A; a later sweep asks only for `evals_native` on
    probe B: the table's gradients are recomputed on B too (never two probes in a table)."""
    from polymap.features.probe import ProbeSpec

    run, out = [small_suite / "pico-seed0"], tmp_path / "f.parquet"
    a = ProbeSpec(sequences=2, eval_sequences=2, length=32)
    b = ProbeSpec(sequences=2, eval_sequences=2, length=16)
    old = polymap.extract(run, out=out, features="evals_native,gradients", steps="24", probe=a,
                          progress=False)  # fmt: skip
    new = polymap.extract(run, out=out, features="evals_native", steps="24", probe=b,
                          progress=False)  # fmt: skip
    fresh = polymap.extract(run, features="evals_native,gradients", steps="24", probe=b,
                            progress=False)  # fmt: skip
    column = "gradients.total_norm"
    assert new[column].iloc[0] == fresh[column].iloc[0] != old[column].iloc[0]
    assert set(new["feature_sets"].iloc[0].split(",")) == {"evals_native", "gradients"}


def test_other_lm_eval_04_shapes(tmp_path):
    """model_args as a dict, the revision in config.model_revision, a Hub-cache snapshot
    path, top-level model_name, and group scores kept under "groups"."""
    path = tmp_path / "a.json"
    path.write_text(json.dumps({
        "results": {"mmlu_stem": {"acc,none": 0.3, "alias": " - stem"}},
        "groups": {"mmlu": {"acc,none": 0.31, "acc_stderr,none": 0.01, "alias": "mmlu"}},
        "config": {"model": "hf", "model_args": {"pretrained": "EleutherAI/pythia-410m-seed3"},
                   "model_revision": "step3000"},
        "n-shot": {"mmlu_stem": 5},
    }))  # fmt: skip
    record = read_results_file(path)
    assert (record.run, record.step) == ("pythia-410m-seed3", 3000)
    assert record.values[(5, "mmlu_stem")] == {"acc": 0.3}
    assert record.values[(0, "mmlu")] == {"acc": 0.31}
    snapshot = "/cache/hub/models--EleutherAI--pythia-70m/snapshots/0123abcd"
    path.write_text(json.dumps({
        "results": {"piqa": {"acc,none": 0.6}},
        "config": {"model_args": f"pretrained={snapshot}", "model_revision": "step143000"},
    }))  # fmt: skip
    assert (read_results_file(path).run, read_results_file(path).step) == ("pythia-70m", 143000)
    path.write_text(json.dumps({
        "results": {"piqa": {"acc,none": 0.6}}, "config": {"model_revision": "step8"},
        "model_name": "EleutherAI/pythia-v1.1-160m",
    }))  # fmt: skip
    assert (read_results_file(path).run, read_results_file(path).step) == ("pythia-160m", 8)


def test_stderr_columns_floor_the_deviation_and_are_not_features():
    from polymap.phases.preprocess import select_columns
    from polymap.scoring.score import feature_deviation

    rows = []
    for r in range(6):
        for step in (0, 10, 100):
            acc = 0.25 + 0.001 * r + (0.05 if r == 5 else 0.0)  # run 5 is 0.05 higher
            rows.append({"run": f"r{r}", "step": step, "eval.t.acc": acc,
                         "eval.t.acc_stderr": 0.1})  # fmt: skip
    table = pd.DataFrame(rows)
    assert select_columns(table, "eval") == ["eval.t.acc"]
    target, others = table[table["run"] == "r5"], table[table["run"] != "r5"]
    noisy, _ = feature_deviation(target, others, ["eval.t.acc"])
    exact, _ = feature_deviation(target.drop(columns="eval.t.acc_stderr"), others,
                                 ["eval.t.acc"])  # fmt: skip
    assert noisy == pytest.approx(0.05 / 0.1, rel=0.1)  # within its own noise: z ~ 0.5
    assert exact > 10 * noisy


def test_harness_runs_under_an_inherited_sigterm_handler(lm_eval_out, tmp_path):
    """``ray.init`` leaves a SIGTERM handler that calls ``sys.exit``; lm-eval's forked
    bootstrap pool then hung in ``terminate()`` (seen in the demo test after the Ray
    tests). The harness runs with SIGTERM at its default and puts the handler back."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal, sys
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        from polymap.evals.harness import run_harness
        from polymap.evals.tasks import DEFAULT_TASK

        def handler(signum, frame):  # what ray.init installs in the driver
            sys.exit(signum)

        signal.signal(signal.SIGTERM, handler)
        report = run_harness([{str(lm_eval_out["suite"] / "pico-seed0")!r}], DEFAULT_TASK,
                             {str(tmp_path / "out")!r}, include_path={str(lm_eval_out["tasks"])!r},
                             steps="24", limit=16, device="cpu", progress=False)
        assert not report.failed and len(report.written) == 1, report
        assert signal.getsignal(signal.SIGTERM) is handler
        print("restored")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0 and "restored" in done.stdout, done.stderr[-3000:]
