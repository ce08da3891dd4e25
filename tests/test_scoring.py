"""Scoring, labels and backtests on synthetic runs with planted outliers, plus online use."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_data import RandomTokens, tiny_reference

from polymap.cli import main
from polymap.phases import PhaseModel
from polymap.scoring import (
    RiskScorer,
    ScoringError,
    backtest,
    label_runs,
    score_paths,
    score_runs,
)

STEPS = np.array([0, 1, 2, 4, 8, 16, 32, 64] + list(range(100, 1001, 100)))


def runs_table(n_runs=10, outliers=("run3", "run7"), d=6, seed=0, loss=False):
    """Runs share a trajectory (features drift with log step, plus seed noise); outliers
    leave it from step 16 on (early), and their 'acc' collapses from step 800 (late).
    ``loss=True`` adds an ``evals_native.loss`` column (drawn from its own generator,
    so the other columns are unchanged): a curve falling from ~10.8 to ~3.8 nats, a
    persistent per-run offset (SD 0.01 nats) and checkpoint noise (SD 0.005)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=d)
    rows = []
    for r in range(n_runs):
        name = f"run{r}"
        wobble = rng.normal(scale=0.05, size=d)
        for step in STEPS:
            x = base * np.log1p(step) + wobble + rng.normal(scale=0.05, size=d)
            acc = 0.3 + 0.4 * np.log1p(step) / np.log1p(1000) + rng.normal(scale=0.005)
            if name in outliers:
                if step >= 16:
                    x = x + 1.5 * np.log1p(step / 16)
                if step >= 800:
                    acc -= 0.2
            rows.append(
                {
                    "run": name,
                    "step": int(step),
                    "acc": acc,
                    **{f"syn.f{j}": x[j] for j in range(d)},
                }
            )
    table = pd.DataFrame(rows)
    if loss:
        noise = np.random.default_rng(seed + 1000)
        runs = table["run"].unique()
        offset = dict(zip(runs, noise.normal(scale=0.01, size=len(runs)), strict=True))
        curve = 3.5 + 7.3 * (1.0 + table["step"].to_numpy(float)) ** -0.35
        table["evals_native.loss"] = (
            curve + table["run"].map(offset) + noise.normal(scale=0.005, size=len(table))
        )
    return table


@pytest.fixture(scope="module")
def table():
    return runs_table()


@pytest.mark.slow
def test_planted_outliers_rank_first_early(table):
    scores = score_runs(table, n_states=3, horizon=0.25)
    assert set(scores["run"].head(2)) == {"run3", "run7"}
    assert scores["flagged"].tolist()[:2] == [True, True] and scores["flagged"].sum() == 2
    assert scores["risk"].between(0, 1).all() and scores["risk"].notna().all()
    assert list(scores.columns[:3]) == ["run", "risk", "flagged"]
    top = scores.set_index("run").loc["run3"]
    assert top["first_deviation_step"] in (16, 32) and top["horizon_step"] == 250
    assert "syn.f" in top["explanation"]


@pytest.mark.slow
def test_nothing_after_the_horizon_changes_the_score(table):
    cut = 250
    before = score_runs(table, n_states=3, until_step=cut)
    changed = table.copy()
    late = changed["step"] > cut
    features = [c for c in table.columns if c.startswith("syn.")]
    changed.loc[late, features] = np.random.default_rng(9).normal(size=(late.sum(), 6)) * 50
    after = score_runs(changed, n_states=3, until_step=cut)
    pd.testing.assert_frame_equal(before, after)


@pytest.mark.slow
def test_partial_and_new_runs_are_scored(table):
    reference = table[~table["run"].isin(["run3", "run7"])]
    newcomers = runs_table(n_runs=10, seed=0)
    partial = newcomers[(newcomers["run"] == "run7") & (newcomers["step"] <= 64)].assign(
        run="live-bad"
    )
    healthy = newcomers[(newcomers["run"] == "run1") & (newcomers["step"] <= 64)].assign(
        run="live-ok"
    )
    scores = score_runs(reference, 3, targets=pd.concat([partial, healthy]), until_step=64)
    by = scores.set_index("run")
    assert by.loc["live-bad", "flagged"] and not by.loc["live-ok", "flagged"]
    assert by.loc["live-bad", "n_checkpoints"] == (STEPS <= 64).sum()
    empty = newcomers[(newcomers["run"] == "run2") & (newcomers["step"] > 600)].assign(
        run="late-starter"
    )
    late = score_runs(reference, 3, targets=empty, until_step=64).iloc[0]
    assert late["risk"] == 0.0 and not late["flagged"] and late["n_checkpoints"] == 0
    assert "no checkpoint before the horizon" in late["explanation"]


def test_label_cli_on_a_suite_uses_the_suites_rule(tmp_path, capsys):
    """`polymap label SUITE --metric val_loss` agrees with the suite's manifest rule: a
    healthy run 0.0155 nats above the others late (under the suite's 0.03-nat band) is
    not marked, though the generic default (10% of a small late change) would mark it."""
    from polymap.suite import instability_labels, run_logs

    rng = np.random.default_rng(0)
    steps = np.arange(0, 401, 10)
    for r in range(10):
        run = tmp_path / "suite" / f"nano-seed{r}"
        run.mkdir(parents=True)
        loss = 3 + np.exp(-steps / 50) + rng.normal(0, 0.0005, len(steps))
        loss = loss + (0.0155 * (steps >= 195) if r == 9 else 0)
        pd.DataFrame({"step": steps, "val_loss": loss}).to_csv(run / "eval_log.csv", index=False)
    out = tmp_path / "labels.csv"
    assert main(["label", str(tmp_path / "suite"), "--metric", "val_loss", "--out", str(out)]) == 0
    assert "the suite's rule (gap 0.03 nats" in capsys.readouterr().out
    got = pd.read_csv(out).set_index("run")["unstable"]
    manifest_rule = instability_labels(run_logs(tmp_path / "suite")).set_index("run")["unstable"]
    pd.testing.assert_series_equal(got, manifest_rule.astype(bool), check_names=False)
    assert not got.any()
    generic = label_runs(run_logs(tmp_path / "suite"), "val_loss").set_index("run")["unstable"]
    assert generic["nano-seed9"]  # what the old default said


def test_label_cli_reads_train_logs(tmp_path, capsys):
    for r in range(4):
        run = tmp_path / "runs" / f"seed{r}"
        run.mkdir(parents=True)
        steps = np.arange(1, 201)
        loss = 4 * np.exp(-steps / 60) + 2 + (0.6 * (steps >= 150) if r == 1 else 0)
        pd.DataFrame({"step": steps, "loss": loss}).to_csv(run / "train_log.csv", index=False)
    out = tmp_path / "labels.csv"
    assert main(["label", str(tmp_path / "runs"), "--metric", "loss", "--out", str(out)]) == 0
    labels = pd.read_csv(out).set_index("run")
    assert labels["unstable"].tolist() == [False, True, False, False]
    assert 150 <= labels.loc["seed1", "onset_step"] <= 152
    capsys.readouterr()


def test_path_timing_counts():
    from polymap.scoring.score import path_divergence

    others = pd.DataFrame(
        [
            {"run": f"r{r}", "step": int(s), "state": int(i >= 8)}
            for r in range(5)
            for i, s in enumerate(STEPS)
        ]
    )
    on_time = others[others["run"] == "r0"].assign(run="t")
    late = on_time.assign(state=[int(i >= 12) for i in range(len(STEPS))])
    assert path_divergence(on_time, others) == 0.0
    assert path_divergence(late, others) > 4 / len(STEPS)


def test_external_paths():
    rows = []
    for r in range(8):
        for i, step in enumerate(STEPS):
            state = 0 if i < 6 else (1 if i < 12 else 2)
            if r == 5 and i >= 4:
                state = 3  # a detour nobody else takes
            rows.append({"run": f"r{r}", "step": int(step), "state": state})
    scores = score_paths(pd.DataFrame(rows), until_step=300)
    assert scores.iloc[0]["run"] == "r5" and scores.iloc[0]["flagged"]
    assert scores["flagged"].sum() == 1


def test_labels_find_late_drops_and_spikes_not_clean_runs(table):
    labels = label_runs(table, "acc")
    by = labels.set_index("run")
    assert set(labels.loc[labels["unstable"], "run"]) == {"run3", "run7"}
    assert by.loc["run3", "onset_step"] == 800
    loss_rows = []
    for r in range(6):
        for step in range(0, 500, 10):
            loss = 5 * np.exp(-step / 150) + 2 + 0.002 * ((r * 7 + step) % 5)
            if r == 2 and step >= 300:
                loss += 0.5  # a spike that stays
            loss_rows.append({"run": f"r{r}", "step": step, "val_loss": loss})
    loss_labels = label_runs(pd.DataFrame(loss_rows), "val_loss").set_index("run")
    assert loss_labels["unstable"].sum() == 1 and loss_labels.loc["r2", "unstable"]
    assert 300 <= loss_labels.loc["r2", "onset_step"] <= 320


@pytest.mark.slow
def test_backtest_and_bad_inputs(table, tmp_path):
    labels = label_runs(table, "acc")
    model = PhaseModel(n_states=3, restarts=1)
    result = backtest(table, labels, horizons=(0.1, 0.25), out=tmp_path, phase_model=model)
    assert (result["auroc"] == 1.0).all() and (result["average_precision"] == 1.0).all()
    assert result.loc[result["horizon"] == 0.25, "median_lead_steps"].item() >= 700
    assert (tmp_path / "backtest.csv").exists() and (tmp_path / "backtest.png").exists()
    # paths wherever a table is taken: the same answer from files
    table.to_parquet(tmp_path / "features.parquet")
    labels.to_csv(tmp_path / "labels.csv", index=False)
    again = backtest(tmp_path / "features.parquet", tmp_path / "labels.csv", horizons=(0.25,),
                     phase_model=model)  # fmt: skip
    assert again["auroc"].tolist() == result.loc[result["horizon"] == 0.25, "auroc"].tolist()
    with pytest.raises(ScoringError, match="at least 3"):
        score_runs(table[table["run"].isin(["run0", "run1"])], 2)
    with pytest.raises(ScoringError, match="not in the features table"):
        backtest(table, labels.assign(run=labels["run"] + "x"), phase_model=model)
    with pytest.raises(ScoringError, match="both stable and unstable"):
        backtest(table, labels.assign(unstable=False), phase_model=model)
    with pytest.raises(ScoringError, match="lacks reference feature"):
        score_runs(table, 3, targets=table.drop(columns=["syn.f1"]).head(5), until_step=8)
    with pytest.raises(ScoringError, match="horizon"):
        score_runs(table, 3, horizon=1.5)


def test_cli_score_label_backtest(table, tmp_path, capsys):
    features = tmp_path / "f.parquet"
    table.to_parquet(features)
    assert (
        main(
            [
                "fit",
                str(features),
                "--out",
                str(tmp_path / "m"),
                "--states",
                "3",
                "--restarts",
                "1",
                "--jobs",
                "1",
                "-q",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "score",
                str(features),
                "--model",
                str(tmp_path / "m"),
                "--horizon",
                "0.25",
                "--out",
                str(tmp_path / "s.csv"),
            ]
        )
        == 0
    )
    scores = pd.read_csv(tmp_path / "s.csv")
    assert list(scores.columns[:3]) == ["run", "risk", "flagged"]
    assert (
        main(
            [
                "score",
                "--paths",
                str(tmp_path / "m" / "paths.csv"),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )
    assert main(["label", str(features), "--metric", "acc", "--out", str(tmp_path / "l.csv")]) == 0
    assert pd.read_csv(tmp_path / "l.csv")["unstable"].sum() == 2
    assert (
        main(
            [
                "backtest",
                str(features),
                "--labels",
                str(tmp_path / "l.csv"),
                "--model",
                str(tmp_path / "m"),
                "--horizons",
                "0.25",
                "--out",
                str(tmp_path / "bt"),
            ]
        )
        == 0
    )
    assert main(["score", "--out", str(tmp_path / "x.csv")]) == 2
    capsys.readouterr()


def test_online_monitor_and_trainer_callback(tmp_path):
    from polymap.scoring.online import InstabilityWarning, RiskMonitor, risk_callback
    from polymap.synthetic import tiny_model

    reference = tiny_reference(tmp_path, steps=(0, 1, 2, 4))
    monitor = RiskMonitor(reference, tmp_path / "model", run="live", alpha=0.05)
    model = tiny_model("gpt_neox", seed=11)
    first = monitor.observe(model, step=0)
    assert not first["flagged"] and first["p_value"] > 0.05 and first["step"] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with __import__("torch").no_grad():
            for p in model.parameters():
                p.mul_(25)  # a wildly off run
        early = [monitor.observe(model, step=s) for s in (1, 2)]
        bad = monitor.observe(model, step=4)
    # a deviation must last 3 checkpoints (persistence) before it can flag
    assert not any(r["flagged"] for r in early)
    assert bad["risk"] >= 0.95 and bad["flagged"] and bad["p_value"] <= 0.05
    assert any(issubclass(w.category, InstabilityWarning) for w in caught)
    assert risk_callback(reference, tmp_path / "model").monitor is not None


def _train(model, out, callback_args, max_steps=20):
    from transformers import Trainer, TrainingArguments

    from polymap.scoring.online import attach_risk_callback

    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=5, logging_steps=5,
        per_device_train_batch_size=4, learning_rate=1e-2, report_to=["tensorboard"],
        use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(model.config.vocab_size))
    callback = attach_risk_callback(trainer, *callback_args)
    trainer.train()
    return trainer, callback


@pytest.mark.slow
def test_trainer_callback_reaches_tensorboard(tmp_path):
    from polymap.scoring.online import ArchitectureMismatchWarning
    from polymap.synthetic import tiny_model

    reference = tiny_reference(tmp_path)
    trainer, callback = _train(tiny_model("gpt_neox", seed=7), tmp_path / "out",
                               (reference, tmp_path / "model", "live"))  # fmt: skip
    # through Trainer.log: in the log history and in the TensorBoard event file
    logged = [h for h in trainer.state.log_history if "polymap/risk" in h]
    assert [h["step"] for h in logged] == [5, 10, 15, 20]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    # the Trainer's TensorBoard logger files training-time metrics under train/
    assert {"train/polymap/risk", "train/polymap/p_value", "train/polymap/flagged"} <= set(
        accumulator.Tags()["scalars"]
    )
    risks = accumulator.Scalars("train/polymap/risk")
    assert [e.step for e in risks] == [5, 10, 15, 20]
    assert [e.value for e in risks] == pytest.approx([h["polymap/risk"] for h in logged])
    seconds = [r["seconds"] for r in callback.monitor.risks]
    print(f"\nscoring seconds per save: {[round(s, 3) for s in seconds]}")
    # the flag history at each save is what `score --until-step` gives the same
    # checkpoints afterwards (the any-look rule: the same answer online and offline)
    live = pd.DataFrame(callback.monitor.history)
    scorer = RiskScorer.load(tmp_path / "model")
    for result in callback.monitor.risks:
        again = scorer.score(live, until_step=result["step"]).iloc[0]
        assert bool(again["flagged"]) == bool(result["flagged"]), result["step"]
        assert again["p_value"] == pytest.approx(result["p_value"], rel=1e-9)
    # a model of another architecture is not scored (warned once)
    with pytest.warns(ArchitectureMismatchWarning, match="not comparable"):
        other, _ = _train(tiny_model("gpt2", seed=7), tmp_path / "gpt2",
                          (reference, tmp_path / "model", "gpt2"), max_steps=10)  # fmt: skip
    assert not [h for h in other.state.log_history if "polymap/risk" in h]


# -- labels on eval scores: noise, scale, floor; like with like ------------------------------
def _collapse_table(seed=0):
    from polymap.evals.synthetic import STEPS as EVAL_STEPS
    from polymap.evals.synthetic import eval_trajectories, phased_accuracy

    steps = tuple(sorted(set(EVAL_STEPS) | {50000, 60000, 70000}))

    def accuracy(run, step):  # a 104-item task (WSC-sized): SE ~0.045 at chance
        if run == "r3" and step >= 50000:
            return 0.25  # a real collapse back to chance
        return phased_accuracy(step, n_items=104)

    return eval_trajectories(runs=10, tasks=1, n_items=104, steps=steps, accuracy=accuracy,
                             seed=seed)  # fmt: skip


def test_labels_on_noisy_accuracies_mark_only_the_collapse():
    for seed in range(5):
        table = _collapse_table(seed)
        labels = label_runs(table, "eval.t0.acc").set_index("run")
        assert labels.index[labels["unstable"]].tolist() == ["r3"], seed
        assert labels.loc["r3", "onset_step"] == 50000
    # the old defaults (a 0.05 spike rule on any metric, no noise or floor) mark noise
    old = label_runs(table.drop(columns=["eval.t0.acc_stderr"]), "eval.t0.acc", spike=0.05,
                     min_gap=0.0)  # fmt: skip
    assert old["unstable"].sum() > 1


def test_labels_nothing_at_the_floor():
    # every run at chance the whole time (a task the models never learn): no labels
    from polymap.evals.synthetic import eval_trajectories

    table = eval_trajectories(runs=10, tasks=1, n_items=104, accuracy=lambda r, s: 0.25, seed=1)
    assert not label_runs(table, "eval.t0.acc")["unstable"].any()


def test_label_group_by_compares_like_with_like(tmp_path, capsys):
    big = _collapse_table(0).assign(model="big")
    small = _collapse_table(1).assign(model="small")
    small = small[small["run"].isin(["r0", "r1", "r2", "r3"])]
    small["run"] = "s" + small["run"]
    # a smaller model: it learns less (0.4 where the big one reaches 0.6), not unstable
    small["eval.t0.acc"] = np.where(small["step"] >= 1000, small["eval.t0.acc"] - 0.2,
                                    small["eval.t0.acc"])  # fmt: skip
    table = pd.concat([big, small], ignore_index=True)
    mixed = label_runs(table, "eval.t0.acc")
    # against all runs, the smaller model widens the band: the big run's collapse is missed
    assert "r3" not in set(mixed.loc[mixed["unstable"], "run"])
    grouped = label_runs(table, "eval.t0.acc", group_by="model")
    assert sorted(grouped.loc[grouped["unstable"], "run"]) == ["r3", "sr3"]
    path = tmp_path / "evals.parquet"
    table.to_parquet(path)
    out = tmp_path / "labels.csv"
    assert main(["label", str(path), "--metric", "eval.t0.acc", "--group-by", "model",
                 "--out", str(out)]) == 0  # fmt: skip
    written = pd.read_csv(out)
    assert sorted(written.loc[written["unstable"], "run"]) == ["r3", "sr3"]
    assert set(written["model"]) == {"big", "small"}


def test_backtest_group_by(table, tmp_path):
    grouped = table.assign(model=np.where(table["run"].isin([f"run{i}" for i in range(5)]),
                                          "a", "b"))  # fmt: skip
    labels = label_runs(table, "acc")
    result = backtest(grouped, labels, horizons=(0.25,), out=tmp_path, group_by="model",
                      phase_model=PhaseModel(n_states=3, restarts=1))  # fmt: skip
    assert result["auroc"].item() == 1.0
    scores = pd.read_csv(tmp_path / "scores_h0.25.csv")
    assert set(scores["model"]) == {"a", "b"} and len(scores) == 10
    assert set(scores.loc[scores["flagged"], "run"]) == {"run3", "run7"}


def test_pythia_core_task_labels_by_size_mark_no_run(pythia_evals):
    from polymap.evals import ingest

    table, _ = ingest(pythia_evals, stderr=True)
    table = table.assign(size=table["run"].str.extract(r"pythia-([\d.]+[mb])", expand=False))
    for task in ("arc_easy", "lambada_openai", "piqa", "sciq", "winogrande", "wsc"):
        labels = label_runs(table, f"eval.{task}.acc", group_by="size")
        assert not labels["unstable"].any(), task


def test_pythia_label_cli_group_by_model(pythia_evals, tmp_path):
    evals = tmp_path / "evals.parquet"
    assert main(["evals", "ingest", str(pythia_evals), "--stderr", "--out", str(evals)]) == 0
    out = tmp_path / "labels.csv"
    assert main(["label", str(evals), "--metric", "eval.arc_easy.acc", "--group-by", "model",
                 "--out", str(out)]) == 0  # fmt: skip
    labels = pd.read_csv(out)
    assert len(labels) == 16 and not labels["unstable"].any()


def test_score_cli_group_by_and_grouped_model_dir(table, tmp_path):
    grouped = table.assign(model=np.where(table["run"].isin([f"run{i}" for i in range(5)]),
                                          "a", "b"))  # fmt: skip
    features = tmp_path / "features.parquet"
    grouped.to_parquet(features)
    model = tmp_path / "m"
    assert main(["fit", str(features), "--out", str(model), "--group-by", "model",
                 "--states", "3", "--restarts", "1", "-q"]) == 0  # fmt: skip
    out = tmp_path / "scores.csv"
    # a grouped MODEL_DIR implies --group-by: each run against its own group's runs
    assert main(["score", str(features), "--model", str(model), "--horizon", "0.25",
                 "--out", str(out)]) == 0  # fmt: skip
    scores = pd.read_csv(out)
    assert set(scores["model"]) == {"a", "b"} and len(scores) == 10
    assert set(scores.loc[scores["flagged"], "run"]) == {"run3", "run7"}
    # the same from a plain map, grouped on the command line
    plain = tmp_path / "plain"
    assert main(["fit", str(features), "--out", str(plain), "--states", "3", "--restarts",
                 "1", "-q"]) == 0  # fmt: skip
    assert main(["score", str(features), "--model", str(plain), "--group-by", "model",
                 "--horizon", "0.25", "--out", str(out)]) == 0  # fmt: skip
    again = pd.read_csv(out)
    assert set(again.loc[again["flagged"], "run"]) == {"run3", "run7"}
    assert main(["score", str(features), "--model", str(plain), "--group-by", "nope",
                 "--out", str(out)]) == 2  # fmt: skip


@pytest.mark.slow
def test_stop_decision_reaches_every_rank(tmp_path):
    """``stop=True`` under ``torchrun --nproc_per_node 2`` (gloo, CPU, a real Trainer):
    only rank 0 scores, its decision is broadcast, and both ranks end at the step of the
    first flag (before, rank 1 trained on and waited for rank 0 in its next collective)."""
    import json
    import subprocess
    import sys

    reference = tiny_reference(tmp_path)
    reference.to_parquet(tmp_path / "reference.parquet")
    worker = Path(__file__).with_name("ddp_stop_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(worker), str(tmp_path)]  # fmt: skip
    # ~20 s here; without the broadcast rank 1 waits for rank 0 in its next collective
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    first = ranks[0]["flagged"][0]
    assert ranks[0]["stopped_at"] == ranks[1]["stopped_at"] == first < 60
