"""hu2023 against an independent, literal implementation of the published procedure."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from polymap import extract_checkpoint
from polymap.checkpoints import CheckpointRef
from polymap.synthetic import ARCHS

BUFFER_NAMES = (".attention.bias", ".attn.bias", "masked_bias", "inv_freq", "position_ids")


def literal_hu2023(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """The PolyPythias procedure written out plainly: two SVDs per matrix, concatenation."""
    sums = dict.fromkeys(
        ["l1", "l2", "l1_l2", "trace", "lambda_max", "trace_lambda", "mu_lambda"], 0.0
    )
    sigma, n_sigma, n = 0.0, 0, 0
    weights, biases = [], []
    for name, p in state.items():
        if name.endswith(BUFFER_NAMES) or not p.is_floating_point():
            continue
        if name.startswith("embed") or "norm" in name.lower():
            continue
        p = p.double()
        if name.endswith("weight"):
            w = p.view(p.shape[0], -1)
            l1, l2 = w.abs().sum().item(), torch.linalg.norm(w).item()
            lam = torch.linalg.matrix_norm(w, ord=2).item()
            s = torch.svd(w).S
            s[s < 1e-5] = 0
            tr = torch.trace(w).item()
            for key, value in zip(
                sums,
                [l1, l2, l1 / l2, tr, lam, tr / lam, s.mean().item()],
                strict=True,
            ):
                sums[key] += value
            if s.numel() > 1:
                sigma += s.var().item()
                n_sigma += 1
            n += 1
            weights.append(w.flatten())
        elif name.endswith("bias"):
            biases.append(p.view(p.shape[0], -1).flatten())
    out = {f"hu2023.{k}": v / n for k, v in sums.items()}
    out["hu2023.sigma_lambda"] = sigma / n_sigma
    for tag, parts in (("w", weights), ("b", biases)):
        if not parts:  # Llama has no biases
            out[f"hu2023.mu_{tag}"] = out[f"hu2023.median_{tag}"] = math.nan
            out[f"hu2023.sigma_{tag}"] = math.nan
            continue
        cat = torch.cat(parts)
        out[f"hu2023.mu_{tag}"] = cat.mean().item()
        out[f"hu2023.median_{tag}"] = cat.float().median().item()
        out[f"hu2023.sigma_{tag}"] = cat.var().item()
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("step", [0, 4])
def test_hu2023_matches_literal_procedure(tiny_runs, arch, step):
    directory = tiny_runs[arch] / f"step{step}"
    expected = literal_hu2023(load_file(directory / "model.safetensors"))
    row = extract_checkpoint(CheckpointRef(arch, step, str(directory)), "hu2023", "cpu")
    assert row["status"] == "ok", row["error"]
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-9, nan_ok=True), key
    assert row["hu2023.nonfinite_fraction"] == 0.0


def test_gpt_neox_keeps_embed_in_and_skips_embed_out(tiny_runs, tmp_path):
    directory = tiny_runs["gpt_neox"] / "step4"
    state = load_file(directory / "model.safetensors")
    base = extract_checkpoint(CheckpointRef("r", 4, str(directory)), "hu2023", "cpu")
    # Changing embed_out must not move anything; changing embed_in must.
    for name, should_change in (("embed_out.weight", False), ("gpt_neox.embed_in.weight", True)):
        changed = dict(state)
        changed[name] = state[name] * 3
        target = tmp_path / name
        target.mkdir()
        save_file(changed, target / "model.safetensors")
        row = extract_checkpoint(CheckpointRef("r", 4, str(target)), "hu2023", "cpu")
        moved = not math.isclose(row["hu2023.l1"], base["hu2023.l1"], rel_tol=1e-9)
        assert moved == should_change, name


def test_buffers_stored_in_old_pythia_files_are_ignored(tiny_runs, tmp_path):
    directory = tiny_runs["gpt_neox"] / "step4"
    state = load_file(directory / "model.safetensors")
    with_buffers = dict(state)
    n = 8
    for layer in range(2):
        prefix = f"gpt_neox.layers.{layer}.attention."
        with_buffers[prefix + "bias"] = torch.tril(torch.ones(1, 1, n, n, dtype=torch.bool))
        with_buffers[prefix + "masked_bias"] = torch.tensor(-1e9)
        with_buffers[prefix + "rotary_emb.inv_freq"] = torch.rand(4)
    save_file(with_buffers, tmp_path / "model.safetensors")
    a = extract_checkpoint(CheckpointRef("r", 4, str(directory)), "hu2023", "cpu")
    b = extract_checkpoint(CheckpointRef("r", 4, str(tmp_path)), "hu2023", "cpu")
    for key in a:
        if key.startswith("hu2023."):
            assert b[key] == pytest.approx(a[key], rel=1e-12), key


def test_fp16_checkpoint_is_upcast(tiny_runs, tmp_path):
    directory = tiny_runs["gpt_neox"] / "step4"
    state = {k: v.half() for k, v in load_file(directory / "model.safetensors").items()}
    save_file(state, tmp_path / "model.safetensors")
    expected = literal_hu2023(state)
    row = extract_checkpoint(CheckpointRef("r", 4, str(tmp_path)), "hu2023", "cpu")
    assert row["hu2023.median_w"] == expected["hu2023.median_w"]  # exact, same fp16 value
    assert row["hu2023.lambda_max"] == pytest.approx(expected["hu2023.lambda_max"], rel=1e-5)
