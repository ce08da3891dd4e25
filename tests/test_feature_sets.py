"""weights and spectral features of a real tiny checkpoint against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from polymap import extract_checkpoint
from polymap.checkpoints import CheckpointRef
from polymap.features import feature_sets, get_feature_sets


def _row(tiny_runs, step=4, initial=True):
    run = tiny_runs["gpt_neox"]
    ref = CheckpointRef("neox", step, str(run / f"step{step}"))
    init = CheckpointRef("neox", 0, str(run / "step0")) if initial else None
    row = extract_checkpoint(ref, "weights,spectral", "cpu", initial=init)
    assert row["status"] == "ok", row["error"]
    return (
        row,
        load_file(run / f"step{step}" / "model.safetensors"),
        load_file(run / "step0" / "model.safetensors"),
    )


def test_weights_per_role_and_layer(tiny_runs):
    row, state, state0 = _row(tiny_runs)
    qkv = [k for k in state if k.endswith("query_key_value.weight")]
    allv = torch.cat([state[k].flatten().double() for k in qkv]).numpy()
    d = allv - allv.mean()
    assert row["weights.attn_qkv.fro"] == pytest.approx(np.sqrt((allv**2).sum()), rel=1e-7)
    assert row["weights.attn_qkv.rms"] == pytest.approx(np.sqrt((allv**2).mean()), rel=1e-7)
    assert row["weights.attn_qkv.std"] == pytest.approx(allv.std(ddof=1), rel=1e-7)
    kurt = (d**4).mean() / (d**2).mean() ** 2 - 3
    assert row["weights.attn_qkv.kurtosis"] == pytest.approx(kurt, rel=1e-6)
    assert row["weights.attn_qkv.max_abs"] == pytest.approx(np.abs(allv).max(), rel=1e-7)
    diff = sum(((state[k] - state0[k]).double() ** 2).sum().item() for k in qkv)
    base = sum((state0[k].double() ** 2).sum().item() for k in qkv)
    assert row["weights.attn_qkv.rel_dist"] == pytest.approx(math.sqrt(diff / base), rel=1e-7)
    w1 = state["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"].double()
    assert row["weights.layer1.mlp_out.fro"] == pytest.approx(torch.linalg.norm(w1).item())
    outliers = ((w1 - w1.mean()).abs() > 6 * w1.std()).sum().item() / w1.numel()
    assert row["weights.layer1.mlp_out.outlier_frac"] == pytest.approx(outliers)


def test_rel_dist_is_zero_at_step_zero_and_absent_without_it(tiny_runs):
    row, _, _ = _row(tiny_runs, step=0)
    assert row["weights.mlp_in.rel_dist"] == 0.0
    row, _, _ = _row(tiny_runs, initial=False)
    assert "weights.mlp_in.rel_dist" not in row


def test_planted_outlier_column_shows(tiny_runs, tmp_path):
    from safetensors.torch import save_file

    state = load_file(tiny_runs["gpt_neox"] / "step4" / "model.safetensors")
    w = state["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].clone()
    w[:8, 3] = 60 * w.std()  # part of one input column: 8 planted outliers
    state["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] = w
    save_file(state, tmp_path / "model.safetensors")
    row = extract_checkpoint(CheckpointRef("x", 4, str(tmp_path)), "weights", "cpu")
    assert row["weights.layer0.mlp_in.outlier_frac"] >= 8 / w.numel()
    assert row["weights.layer1.mlp_in.outlier_frac"] < row["weights.layer0.mlp_in.outlier_frac"]


def test_spectral_against_svd(tiny_runs):
    row, state, _ = _row(tiny_runs)
    mats = [state[k].double() for k in state if k.endswith("dense_h_to_4h.weight")]
    svs = [torch.linalg.svdvals(m) for m in mats]
    norms = [s[0].item() for s in svs]
    assert row["spectral.mlp_in.spectral_norm.mean"] == pytest.approx(np.mean(norms), rel=1e-7)
    assert row["spectral.mlp_in.spectral_norm.max"] == pytest.approx(max(norms), rel=1e-7)
    stable = [(s**2).sum().item() / s[0].item() ** 2 for s in svs]
    assert row["spectral.mlp_in.stable_rank.mean"] == pytest.approx(np.mean(stable), rel=1e-7)
    assert row["spectral.layer0.mlp_in.sv_mean"] == pytest.approx(svs[0].mean().item(), rel=1e-7)
    assert np.isfinite(row["spectral.mlp_in.alpha.mean"])
    assert row["spectral.nonfinite_matrices"] == 0


def test_registry_lookup():
    # custom sets registered by users: tests/test_executors.py (every executor) and
    # tests/test_cli.py (a second meaning for a name is refused)
    with pytest.raises(ValueError, match="unknown feature set.*'nope'.*available"):
        get_feature_sets("hu2023,nope")
    assert {"hu2023", "weights", "spectral"} <= set(feature_sets())
    assert [s.name for s in get_feature_sets(None)] == ["hu2023", "weights", "spectral"]
    named = get_feature_sets(" spectral, hu2023 ,spectral")  # spaces, repeats
    assert [s.name for s in named] == ["spectral", "hu2023"]
    with pytest.raises(ValueError, match="no feature sets"):
        get_feature_sets(" , ")
