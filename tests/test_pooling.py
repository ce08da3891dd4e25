"""Pooling groups (sizes, data orders) into one reference after per-group
standardisation, only when the leave-one-group-out check finds them exchangeable."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from polymap.cli import main
from polymap.nulls import draw
from polymap.phases import PhaseModel
from polymap.scoring import RiskScorer, ScoringError
from polymap.scoring.pooling import GroupStandardiser, PoolingError


def _groups(break_group: int | None = None, runs: int = 4, seed: int = 0) -> pd.DataFrame:
    """Three groups of one healthy process, each on its own affine scale (what sizes do
    to a weight norm); ``break_group``'s runs also drift apart late in training, in a
    way no per-group location and scale removes."""
    parts = []
    for g, (a, b) in enumerate([(1.0, 0.0), (3.0, 5.0), (0.5, -2.0)]):
        t = draw("phase_timing", n_runs=runs, seed=100 * seed + g)
        features = [c for c in t.columns if c.startswith("null.")]
        t[features] = t[features] * a + b
        if g == break_group:
            rng = np.random.default_rng(g)
            late = (t["step"] / t["step"].max()).to_numpy() ** 4
            for run in t["run"].unique():
                rows = (t["run"] == run).to_numpy()
                t.loc[rows, features] += np.outer(late[rows], rng.normal(0, 30, len(features)))
        t["run"] = f"g{g}-" + t["run"]
        t["model"] = f"s{g}"
        parts.append(t)
    return pd.concat(parts, ignore_index=True)


def test_standardiser_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    rows = [
        {"run": f"{g}{r}", "step": s, "size": g, "x": rng.normal(10 * (g == "b"), 1 + (g == "b"))}
        for g in "ab"
        for r in range(4)
        for s in (1, 10, 100)
    ]
    table = pd.DataFrame(rows)
    std = GroupStandardiser("size").fit(table, ["x"])
    got = std.transform(table, leave_out=True).set_index(["run", "step"])["x"]
    for g in "ab":
        part = table[table["size"] == g]
        residual = {}
        for (run, step), value in part.set_index(["run", "step"])["x"].items():
            others = part[(part["run"] != run) & (part["step"] == step)]["x"]
            residual[(run, step)] = value - float(np.median(others))
        values = np.array(list(residual.values()))
        scale = 1.4826 * np.median(np.abs(values - np.median(values)))
        for key, value in residual.items():
            assert got[key] == pytest.approx(value / scale)
        # a new run of the group: against the median of all the group's runs
        new = pd.DataFrame({"run": "new", "step": [1, 10, 100], "size": g, "x": [0.0, 1.0, 2.0]})
        median = part.groupby("step")["x"].median().to_numpy()
        expected = (np.array([0.0, 1.0, 2.0]) - median) / scale
        assert std.transform(new)["x"].to_numpy() == pytest.approx(expected)


@pytest.mark.slow
def test_exchangeable_groups_pool_and_survive_save(tmp_path):
    table = _groups()
    scorer = RiskScorer(phase_model=PhaseModel(n_states=2, restarts=1), pool_by="model")
    scorer.fit(table)
    check = scorer.pool_check_
    assert check["runs"] == 12 and check["passed"]
    assert check["flagged"] == sum(g["flagged"] for g in check["groups"].values())
    assert check["rate"] == pytest.approx(check["flagged"] / 12)
    # the calibration pools all 12 runs: the conformal floor is 1/13, not 1/5
    assert len(scorer.calibration_.runs_) == 12
    new = _groups(seed=1)
    new["run"] = "new-" + new["run"]
    before = scorer.score(new).set_index("run")
    scorer.save(tmp_path / "m")
    loaded = RiskScorer.load(tmp_path / "m")
    after = loaded.score(new).set_index("run")
    pd.testing.assert_series_equal(before["p_deviation"], after["p_deviation"])
    saved = json.loads((tmp_path / "m" / "scorer.json").read_text())
    assert saved["pooling"]["check"]["runs"] == 12
    from polymap.scoring.calibration import describe_scorer

    assert "Pooled reference: 12 runs in 3 groups by 'model'" in describe_scorer(tmp_path / "m")
    unknown = new[new["model"] == "s0"].assign(model="s9")
    with pytest.raises(ScoringError, match="s9.*does not have"):
        loaded.score(unknown)
    with pytest.raises(ScoringError, match="no such column"):
        loaded.score(new.drop(columns="model"))


@pytest.mark.slow
def test_groups_that_differ_in_shape_are_refused(tmp_path):
    table = _groups(break_group=1)
    with pytest.raises(PoolingError, match="not exchangeable.*s1 4/4"):
        RiskScorer(phase_model=PhaseModel(n_states=2, restarts=1), pool_by="model").fit(table)
    path = tmp_path / "f.parquet"
    table.to_parquet(path)
    out = tmp_path / "m"
    argv = ["fit", str(path), "--states", "2", "--restarts", "1", "--pool-by", "model", "-q"]
    assert main([*argv, "--out", str(out)]) == 1
    assert (out / "model.json").exists() and not (out / "scorer.json").exists()
    assert main([*argv, "--group-by", "model", "--out", str(tmp_path / "g")]) == 2
