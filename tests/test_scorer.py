"""RiskScorer: a scikit-learn estimator, scored on the fitted map's own configuration,
robust to one feature or one checkpoint, calibrated on healthy references, saved and
loaded without refitting, and treating broken checkpoints as evidence."""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from test_scoring import STEPS, runs_table

from polymap.cli import main
from polymap.phases import PhaseModel
from polymap.scoring import RiskScorer, ScoringError
from polymap.scoring.scorer import (
    deviation_evidence,
    lasting_mean,
    performance_z,
    persistent,
)


@pytest.fixture(scope="module")
def table():
    return runs_table()


@pytest.fixture(scope="module")
def fitted(table):
    return RiskScorer(phase_model=PhaseModel(n_states=3, restarts=2)).fit(table)


def test_clone_both_estimators():
    model = PhaseModel(n_states=4, covariance="full", features=["a.x"], random_state=3)
    copy = clone(model)
    assert copy is not model and copy.get_params() == model.get_params()
    scorer = RiskScorer(phase_model=model, alpha=0.01, z_clip=5.0)
    again = clone(scorer)
    assert again.alpha == 0.01 and again.z_clip == 5.0
    assert again.phase_model.get_params() == model.get_params()
    with pytest.raises(TypeError):
        RiskScorer(model)  # keyword-only, as scikit-learn asks


def test_planted_runs_flagged_healthy_not(fitted):
    scores = fitted.score_reference(horizon=0.25)
    assert list(scores.columns[:4]) == ["run", "risk", "flagged", "p_value"]
    assert set(scores.loc[scores["flagged"], "run"]) == {"run3", "run7"}
    assert scores["risk"].between(0, 1).all()
    top = scores.set_index("run").loc["run3"]
    assert top["p_value"] < 1e-3 and top["p_conformal"] >= 1 / 10
    assert top["first_flag_step"] in (16, 32, 64) and top["horizon_step"] == 250
    assert "syn.f" in top["explanation"]


def test_nothing_after_the_horizon_changes_the_backtest(table):
    cut = 250
    scorer = RiskScorer(phase_model=PhaseModel(n_states=3, restarts=1))
    before = clone(scorer).fit(table).score_reference(until_step=cut)
    changed = table.copy()
    late = changed["step"] > cut
    features = [c for c in table.columns if c.startswith("syn.")]
    changed.loc[late, features] = np.random.default_rng(9).normal(size=(late.sum(), 6)) * 50
    after = clone(scorer).fit(changed).score_reference(until_step=cut)
    pd.testing.assert_frame_equal(before, after)


def test_scored_on_the_maps_own_features_and_covariance(table, tmp_path):
    """`polymap score --model` used to refit with default features and diag covariance."""
    features = tmp_path / "f.parquet"
    table.to_parquet(features)
    args = ["fit", str(features), "--out", str(tmp_path / "m"), "--states", "2"]
    args += ["--features", "syn.f0,syn.f3", "--covariance", "full", "--restarts", "1", "-q"]
    assert main(args) == 0
    scorer = RiskScorer.load(tmp_path / "m")
    for model in scorer.loo_models_.values():
        assert model.preprocessor_.features == ["syn.f0", "syn.f3"]
        assert model.hmm_.covariance_type == "full" and model.n_states_ == 2
    # the backtest's likelihood signal equals a leave-one-out computation by hand with
    # a map of that configuration, fitted on the reference cut at the horizon
    cut = 250
    scores = scorer.score_reference(until_step=cut).set_index("run")
    part = table[table["step"] <= cut]
    again = PhaseModel(
        n_states=2, features=["syn.f0", "syn.f3"], covariance="full", restarts=1, n_folds=1
    ).fit(part[part["run"] != "run5"])
    loglik = again.score_checkpoints(part[part["run"] == "run5"], clip=8.0)["loglik"]
    expected = lasting_mean(persistent(-loglik.to_numpy(), 3))
    assert scores.loc["run5", "likelihood"] == pytest.approx(expected, rel=1e-9)
    out = tmp_path / "s.csv"
    assert main(["score", str(features), "--model", str(tmp_path / "m"), "--out", str(out)]) == 0
    saved = pd.read_csv(out)
    assert list(saved.columns[:4]) == ["run", "risk", "flagged", "p_value"]


def test_one_feature_at_two_checkpoints_does_not_flag():
    healthy = runs_table(outliers=(), seed=4)
    spiky = healthy.copy()
    rows = (spiky["run"] == "run5") & spiky["step"].isin([8, 16])
    spread = healthy.loc[healthy["step"] == 8, "syn.f2"].std()
    spiky.loc[rows, "syn.f2"] += 300 * spread  # z ~ 300 at two consecutive checkpoints
    scorer = RiskScorer(phase_model=PhaseModel(n_states=2, restarts=1)).fit(spiky)
    scores = scorer.score_reference(horizon=0.5).set_index("run")
    assert not scores["flagged"].any()
    # a deviation must last 3 checkpoints; its influence is bounded at z_clip
    alone = spiky[spiky["run"] == "run5"]
    per = deviation_evidence(alone, spiky[spiky["run"] != "run5"], ["syn.f2"], z_clip=8.0)
    assert per["evidence"].max() < 1.0  # two checkpoints of z ~ 300 leave no trace
    longer = spiky.copy()
    longer.loc[(longer["run"] == "run5") & (longer["step"] == 32), "syn.f2"] += 300 * spread
    alone = longer[longer["run"] == "run5"]
    per = deviation_evidence(alone, longer[longer["run"] != "run5"], ["syn.f2"], z_clip=8.0)
    assert per["evidence"].max() == pytest.approx(8.0)
    assert per.set_index("step").loc[32, "evidence"] == pytest.approx(8.0)


def test_one_persistent_signal_flags():
    """One signal alone (the others quiet) is enough: evidence combines by min p."""
    healthy = runs_table(outliers=(), seed=5)
    shifted = healthy.copy()
    rows = (shifted["run"] == "run2") & (shifted["step"] >= 16)
    for f in ("syn.f0", "syn.f1"):
        shifted.loc[rows, f] += 0.6  # ~12 noise SDs, in two features, from step 16 on
    scorer = RiskScorer(phase_model=PhaseModel(n_states=1, restarts=1)).fit(shifted)
    scores = scorer.score_reference(horizon=0.25).set_index("run")
    assert scores["flagged"].sum() == 1 and scores.loc["run2", "flagged"]
    assert scores.loc["run2", "p_value"] <= 0.05 and scores.loc["run2", "p_deviation"] < 0.025


def test_performance_z_by_hand():
    """Signed z against the other runs at the same step, spread floored at the typical
    between-run spread, positive = worse (a higher loss, a lower accuracy)."""
    rows = []
    values = {  # run -> (loss at steps 0, 10, 20), (accuracy at the same steps)
        "a": ((9.0, 5.0, 4.00), (0.10, 0.30, 0.40)),
        "b": ((9.1, 5.2, 4.10), (0.12, 0.22, 0.35)),
        "c": ((9.0, 5.1, 4.05), (0.15, 0.26, 0.50)),
        "d": ((9.3, 5.6, 4.40), (0.1, 0.1, 0.20)),
    }
    for run, (loss, acc) in values.items():
        for step, lv, av in zip((0, 10, 20), loss, acc, strict=True):
            rows.append({"run": run, "step": step, "e.loss": lv, "e.acc": av})
    table = pd.DataFrame(rows)
    target, others = table[table["run"] == "d"], table[table["run"] != "d"]
    steps, z = performance_z(target, others, ["e.loss", "e.acc"])
    assert steps.tolist() == [0, 10, 20]
    for j, (column, worse) in enumerate((("e.loss", 1.0), ("e.acc", -1.0))):
        per_step = [others.loc[others["step"] == s, column].to_numpy() for s in (0, 10, 20)]
        mads = [1.4826 * np.median(np.abs(v - np.median(v))) for v in per_step]
        typical = np.median(mads)
        for i, v in enumerate(per_step):
            expected = worse * (target[column].iloc[i] - np.median(v)) / max(mads[i], typical)
            assert z[i, j] == pytest.approx(expected, rel=1e-9)
    assert (z[1:] > 0).all()  # run d is worse on both from step 10
    assert z[0, 0] == pytest.approx(0.3 / (1.4826 * 0.05))  # step 0: MAD 0, floored


def test_persistent_performance_gap_flags_where_the_deviation_cannot():
    """A loss 0.12 nats above the others' (~8 between-run SDs) from step 16 on: tiny
    next to the loss's 7-nat fall over training, so the deviation (spread floored at 5%
    of the range) does not see it; the performance signal does, and says so."""
    healthy = runs_table(outliers=(), seed=7, loss=True)
    worse = healthy.copy()
    rows = (worse["run"] == "run4") & (worse["step"] >= 16)
    worse.loc[rows, "evals_native.loss"] += 0.12
    scorer = RiskScorer(phase_model=PhaseModel(n_states=1, restarts=1)).fit(worse)
    assert scorer.performance_features_ == ["evals_native.loss"]
    scores = scorer.score_reference(horizon=0.25).set_index("run")
    assert scores["flagged"].sum() == 1 and scores.loc["run4", "flagged"]
    top = scores.loc["run4"]
    assert top["p_performance"] < 0.025 and top["p_deviation"] > 0.05
    assert "evals_native.loss" in top["explanation"] and top["first_flag_step"] <= 250
    blind = RiskScorer(phase_model=PhaseModel(n_states=1, restarts=1), performance="none")
    scores = blind.fit(worse).score_reference(horizon=0.25).set_index("run")
    assert not scores["flagged"].any() and scores["performance"].isna().all()


def test_phase_warnings_reported_once(caplog):
    """Every leave-one-run-out model drops the same constant column; the user reads it
    once, with the count, whether the fits run here or in worker processes."""
    table = runs_table(outliers=(), seed=3)
    table["syn.flat"] = 1.0
    for jobs in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            RiskScorer(phase_model=PhaseModel(n_states=2, restarts=1), n_jobs=jobs).fit(table)
        said = [r.getMessage() for r in caplog.records if "syn.flat" in r.getMessage()]
        assert len(said) == 1 and "constant" in said[0] and "(x11:" in said[0], said
    assert logging.getLogger("polymap.phases").propagate  # restored after the call
    # a phase model alone still says it, also while a scorer collects in another thread
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        scorer = RiskScorer(phase_model=PhaseModel(n_states=2, restarts=1))
        worker = threading.Thread(target=scorer.fit, args=(table,))
        worker.start()
        PhaseModel(n_states=2, restarts=1).fit(table)
        worker.join()
    said = [(r.name, r.getMessage()) for r in caplog.records if "syn.flat" in r.getMessage()]
    assert sorted(name for name, _ in said) == [
        "polymap.phases.preprocess",
        "polymap.scoring.scorer",
    ], said
    assert logging.getLogger("polymap.phases").propagate


@pytest.mark.slow
def test_false_alarm_rate_on_healthy_references():
    """20 healthy-only references of 12 runs: 240 scored runs at alpha 0.05, with a
    probe loss (a persistent per-run offset, as seeds have), so the performance signal
    takes part in the decision too."""
    flagged, scored = 0, 0
    for seed in range(20):
        healthy = runs_table(n_runs=12, outliers=(), seed=100 + seed, loss=True)
        scorer = RiskScorer(phase_model=PhaseModel(n_states=2, restarts=1), alpha=0.05)
        scores = scorer.fit(healthy).score_reference(horizon=0.25)
        flagged += int(scores["flagged"].sum())
        scored += len(scores)
    rate = flagged / scored
    assert scored >= 200
    assert rate <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / scored)


def test_broken_checkpoints_are_evidence(table):
    features = [c for c in table.columns if c.startswith("syn.")]
    broken = table.copy()
    broken.loc[(broken["run"] == "run1") & broken["step"].isin([32, 64]), features] = np.nan
    broken.loc[broken["run"] == "run9", features] = np.nan
    broken["status"] = "ok"
    broken.loc[broken["run"] == "run9", "status"] = "failed"
    scorer = RiskScorer(phase_model=PhaseModel(n_states=3, restarts=1)).fit(broken)
    scores = scorer.score_reference(horizon=0.25).set_index("run")
    assert len(scores) == 10  # the all-failed run is reported, the others scored
    assert scores.loc["run1", "flagged"] and scores.loc["run1", "risk"] == 1.0
    assert "non-finite" in scores.loc["run1", "explanation"]
    assert scores.loc["run1", "first_flag_step"] == 32
    assert scores.loc["run9", "flagged"] and "failed" in scores.loc["run9", "explanation"]
    assert {"run3", "run7"} <= set(scores.index[scores["flagged"]])
    # a broken checkpoint *after* the horizon does not count at that horizon
    early = scorer.score_reference(until_step=16).set_index("run")
    assert not early.loc["run1", "flagged"]


def test_new_partial_runs_scored_without_refit(tmp_path, monkeypatch):
    table = runs_table(loss=True)
    reference = table[~table["run"].isin(["run3", "run7"])]
    scorer = RiskScorer(phase_model=PhaseModel(n_states=3, restarts=1)).fit(reference)
    assert scorer.performance_features_ == ["evals_native.loss"]
    scorer.save(tmp_path / "m")
    loaded = RiskScorer.load(tmp_path / "m")

    def no_fit(*args, **kwargs):
        raise AssertionError("scoring a new run must not refit anything")

    monkeypatch.setattr(PhaseModel, "fit", no_fit)
    newcomers = runs_table(n_runs=10, seed=0, loss=True)
    bad = newcomers[(newcomers["run"] == "run7") & (newcomers["step"] <= 64)].assign(run="bad")
    ok = newcomers[(newcomers["run"] == "run1") & (newcomers["step"] <= 64)].assign(run="ok")
    scores = loaded.score(pd.concat([bad, ok]), until_step=64).set_index("run")
    assert scores.loc["bad", "flagged"] and not scores.loc["ok", "flagged"]
    assert scores.loc["bad", "n_checkpoints"] == (STEPS <= 64).sum()
    direct = scorer.score(pd.concat([bad, ok]), until_step=64).set_index("run")
    pd.testing.assert_frame_equal(scores, direct)
    assert scores["p_performance"].notna().all()
    # the saved reference side (whole-run |z|, performance z and paths) is what
    # recomputing gives
    monkeypatch.undo()
    assert set(loaded.reference_performance_) == set(loaded.loo_models_)
    for run, (steps, z) in loaded._whole_run_performance().items():
        np.testing.assert_array_equal(loaded.reference_performance_[run][0], steps)
        np.testing.assert_array_equal(loaded.reference_performance_[run][1], z)
    for run, (steps, z) in loaded._whole_run_z().items():
        np.testing.assert_array_equal(loaded.reference_z_[run][0], steps)
        np.testing.assert_array_equal(loaded.reference_z_[run][1], z)
    for key, states in loaded._whole_run_paths().items():
        np.testing.assert_array_equal(loaded.reference_paths_[key], states)
    monkeypatch.setattr(PhaseModel, "fit", no_fit)
    late = newcomers[(newcomers["run"] == "run2") & (newcomers["step"] > 600)].assign(run="late")
    row = loaded.score(late, until_step=64).iloc[0]
    assert row["risk"] == 0.0 and not row["flagged"] and row["n_checkpoints"] == 0
    # a live run without some columns (rel_dist needs its step 0) is scored on the rest
    fewer = loaded.score(bad.drop(columns=["syn.f1"]), until_step=64).iloc[0]
    assert fewer["flagged"] and "syn.f1" not in fewer["explanation"]
    with pytest.raises(ScoringError, match="lack all"):
        loaded.score(bad[["run", "step"]], until_step=64)


def test_old_model_dir_gets_a_clear_message(table, tmp_path, capsys):
    PhaseModel(n_states=2, restarts=1).fit(table).save(tmp_path / "old")
    with pytest.raises(ScoringError, match="refit with `polymap fit`"):
        RiskScorer.load(tmp_path / "old")
    live = tmp_path / "live.parquet"
    table.head(20).to_parquet(live)
    out = str(tmp_path / "s.csv")
    assert (
        main(["score", "--model", str(tmp_path / "old"), "--targets", str(live), "--out", out]) == 2
    )
    assert "no saved scorer" in capsys.readouterr().err
    assert (
        main(["score", "--model", str(tmp_path / "nope"), "--targets", str(live), "--out", out])
        == 2
    )
    assert "no such model directory" in capsys.readouterr().err
    # with the reference table, a scorer is fitted with the old directory's map
    reference = tmp_path / "f.parquet"
    table.to_parquet(reference)
    args = ["score", str(reference), "--model", str(tmp_path / "old"), "--horizon", "0.25"]
    assert main([*args, "--out", out]) == 0
    assert set(pd.read_csv(out).loc[lambda d: d["flagged"], "run"]) == {"run3", "run7"}
    with pytest.raises(ScoringError, match="alpha"):
        RiskScorer(alpha=1.5).fit(table)
