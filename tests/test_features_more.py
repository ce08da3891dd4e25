"""The richer feature sets (shape, embedding, drift, activations, gradients) on constructed
inputs with known answers, on tiny GPT-NeoX / GPT-2 / Llama models, and with NaN weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import edited_checkpoint
from safetensors.torch import load_file
from scipy import stats

import polymap
from polymap.checkpoints import CheckpointRef
from polymap.features.activations import _attention_stats, transformer_blocks
from polymap.features.drift import subspace_overlap, top_right_singular_vectors
from polymap.features.embedding import cosine_matrix, structure_drift
from polymap.features.probe import ProbeSpec
from polymap.features.shape import fit_student_t, ks_distances, tail_ratio


def _plant_nan(tensors):
    name = next(n for n in tensors if "attention.dense.weight" in n)
    tensors[name][0, 0] = float("nan")


def _probe(tmp_path, vocab=64, rows=4, length=16) -> ProbeSpec:
    ids = np.random.default_rng(0).integers(0, vocab, size=rows * length)
    np.save(tmp_path / "probe.npy", ids)
    return ProbeSpec(
        sequences=rows,
        eval_sequences=rows,
        length=length,
        batch_size=2,
        tokens=str(tmp_path / "probe.npy"),
    )


# --- shape ------------------------------------------------------------------------------


@pytest.mark.parametrize("nu", [3.0, 5.0, 12.0])
def test_student_t_nu_is_recovered(nu):
    x = np.random.default_rng(int(nu)).standard_t(nu, 16384) * 0.02 + 0.003
    fitted, loc, scale = fit_student_t(x)
    assert fitted == pytest.approx(nu, rel=0.15)
    assert loc == pytest.approx(0.003, abs=0.002) and scale == pytest.approx(0.02, rel=0.05)
    # agrees with scipy's generic maximum-likelihood fit
    ref_nu, _, _ = stats.t.fit(x)
    assert fitted == pytest.approx(ref_nu, rel=0.05)


def test_gaussian_is_nu_max_and_ks_prefers_the_right_family():
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal(16384)
    assert fit_student_t(gauss)[0] > 200
    g_gauss, g_logistic = ks_distances(gauss)
    assert g_gauss < 0.015 < g_logistic
    logistic = rng.logistic(size=16384)
    l_gauss, l_logistic = ks_distances(logistic)
    assert l_logistic < 0.015 < l_gauss
    assert tail_ratio(gauss) == pytest.approx(3.2905 / 2.5758, rel=0.05)
    assert tail_ratio(rng.standard_t(3, 200_000)) > 1.6


def test_shape_set_on_planted_heavy_tails(tiny_runs, tmp_path):
    """Replace one MLP matrix by Student-t(4) entries: its role's nu drops to ~4 while the
    Gaussian-initialised roles stay near-Gaussian."""
    rng = np.random.default_rng(0)
    replaced = {}

    def heavy_tails(tensors):
        for name in [n for n in tensors if "dense_h_to_4h.weight" in n]:
            sample = rng.standard_t(4, tensors[name].shape) * 0.02
            tensors[name] = replaced[name] = torch.tensor(sample, dtype=torch.float32)

    ckpt = edited_checkpoint(tiny_runs["gpt_neox"] / "step0", tmp_path / "step0", heavy_tails)
    names, tensors = sorted(replaced), replaced
    row = polymap.extract_checkpoint(CheckpointRef("r", 0, str(ckpt)), "shape", "cpu")
    assert row["status"] == "ok", row["error"]
    assert row["shape.mlp_in.nu"] == pytest.approx(4, rel=0.3)
    assert row["shape.mlp_in.kurtosis"] > 1.5
    assert row["shape.attn_out.nu"] > 30
    assert row["shape.mlp_in.ks_gauss"] > row["shape.attn_out.ks_gauss"]
    # per layer kurtosis equals numpy's on that matrix
    first = names[0]
    layer = int(first.split(".")[2])
    expected = stats.kurtosis(tensors[first].double().numpy().reshape(-1))
    assert row[f"shape.layer{layer}.mlp_in.kurtosis"] == pytest.approx(expected, rel=1e-6)
    # deterministic: the subsample is seeded by tensor names
    again = polymap.extract_checkpoint(CheckpointRef("r", 0, str(ckpt)), "shape", "cpu")
    assert again["shape.mlp_in.nu"] == row["shape.mlp_in.nu"]


# --- embedding and drift ----------------------------------------------------------------


def test_embedding_structure_and_drift_numbers(neox_runs):
    ref = CheckpointRef("seed0", 4, str(neox_runs / "seed0" / "step4"))
    initial = CheckpointRef("seed0", 0, str(neox_runs / "seed0" / "step0"))
    row = polymap.extract_checkpoint(ref, "embedding", "cpu", initial=initial)
    emb = load_file(neox_runs / "seed0" / "step4" / "model.safetensors")["gpt_neox.embed_in.weight"]
    emb0 = load_file(neox_runs / "seed0" / "step0" / "model.safetensors")[
        "gpt_neox.embed_in.weight"
    ]
    assert row["embedding.in_norm"] == pytest.approx(float(emb.double().norm()), rel=1e-9)
    sub = emb[:256].double().numpy()
    unit = sub / np.linalg.norm(sub, axis=1, keepdims=True)
    cos = unit @ unit.T
    off = cos[~np.eye(len(cos), dtype=bool)]
    assert row["embedding.in_cos_mean"] == pytest.approx(off.mean(), abs=1e-9)
    sub0 = emb0[:256].double().numpy()
    unit0 = sub0 / np.linalg.norm(sub0, axis=1, keepdims=True)
    off0 = (unit0 @ unit0.T)[~np.eye(len(cos), dtype=bool)]
    assert row["embedding.in_struct_drift"] == pytest.approx(
        1 - np.corrcoef(off, off0)[0, 1], abs=1e-9
    )
    x = torch.randn(30, 8, dtype=torch.float64)
    assert structure_drift(cosine_matrix(x), cosine_matrix(x)) == pytest.approx(0, abs=1e-12)
    assert structure_drift(cosine_matrix(x), cosine_matrix(torch.randn(30, 8))) > 0.5


def test_subspace_overlap_known_answers():
    torch.manual_seed(0)
    u = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64)).Q
    s = torch.tensor([10.0, 9, 8, 7, 6, 5, 4, 3] + [0.1] * 56, dtype=torch.float64)
    v = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64)).Q
    w = (u[:, :48] * s[:48]) @ v.T
    top = top_right_singular_vectors(w, 8)
    assert subspace_overlap(top, v[:, :8]) == pytest.approx(1.0, abs=1e-6)
    assert subspace_overlap(top, v[:, 8:16]) == pytest.approx(0.0, abs=1e-6)
    half = torch.cat([v[:, :4], v[:, 20:24]], dim=1)
    assert subspace_overlap(top, half) == pytest.approx(0.5, abs=1e-6)


def test_drift_against_final_and_initial(neox_runs):
    run = neox_runs / "seed0"
    refs = [CheckpointRef("seed0", s, str(run / f"step{s}")) for s in (0, 1, 2, 4)]
    table = polymap.extract(refs, features="drift", device="cpu", progress=False)
    last = table[table["step"] == 4].iloc[0]
    first = table[table["step"] == 0].iloc[0]
    assert last["drift.mlp_in.rel_dist_final"] == 0.0
    assert last["drift.mlp_in.subspace_final"] == pytest.approx(1.0, abs=1e-9)
    assert first["drift.mlp_in.rel_dist_init"] == 0.0
    w0 = load_file(run / "step0" / "model.safetensors")
    w4 = load_file(run / "step4" / "model.safetensors")
    names = [n for n in w0 if "dense_h_to_4h.weight" in n]
    num = sum(float((w0[n].double() - w4[n].double()).pow(2).sum()) for n in names)
    den = sum(float(w4[n].double().pow(2).sum()) for n in names)
    assert first["drift.mlp_in.rel_dist_final"] == pytest.approx(math.sqrt(num / den), rel=1e-6)
    # a run without its final checkpoint in the sweep: compared with its latest one
    partial = polymap.extract(refs[:3], features="drift", device="cpu", progress=False)
    assert partial[partial["step"] == 2].iloc[0]["drift.mlp_in.rel_dist_final"] == 0.0


# --- activations and gradients ----------------------------------------------------------


def test_attention_stats_on_known_logits():
    logits = torch.tensor([[0.0, -1e9, -1e9], [0.0, 2.0, -1e9], [1.0, -3.0, 0.5]])
    probs = torch.softmax(logits.double(), -1)[None, None]
    entropy_sum, spread, rows = _attention_stats(probs)
    assert rows == 2 and spread == pytest.approx(4.0)
    expected = sum(float(-(p * p.log()).sum()) for p in (probs[0, 0, 1, :2], probs[0, 0, 2]))
    assert entropy_sum == pytest.approx(expected)


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2", "llama"])
def test_activation_hooks_match_hidden_states(tiny_runs, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    spec = _probe(tmp_path)
    ckpt = tiny_runs[arch] / "step4"
    row = polymap.extract_checkpoint(CheckpointRef(arch, 4, str(ckpt)),
                                     "activations,gradients", "cpu", probe=spec)  # fmt: skip
    assert row["status"] == "ok", row["error"]
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    ids = torch.as_tensor(np.load(spec.tokens)).reshape(4, 16)
    n_layers = len(transformer_blocks(model))
    captured = {}

    def keep(i):
        return lambda m, a, o: captured.__setitem__(i, o[0] if isinstance(o, tuple) else o)

    hooks = [b.register_forward_hook(keep(i)) for i, b in enumerate(transformer_blocks(model))]
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    for h in hooks:
        h.remove()
    for i in range(n_layers):
        assert row[f"activations.layer{i}.max_abs"] == pytest.approx(
            float(captured[i].abs().max()), rel=1e-5
        )
    assert row["activations.logit_norm"] == pytest.approx(
        float(out.logits.norm(dim=-1).mean()), rel=1e-4
    )
    assert row["activations.log_partition"] == pytest.approx(
        float(torch.logsumexp(out.logits, -1).mean()), rel=1e-5
    )
    # gradients: the global norm equals a direct backward pass of the same loss
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    total = math.sqrt(
        sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    )
    assert row["gradients.loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert row["gradients.total_norm"] == pytest.approx(total, rel=1e-4)


def test_scaled_attention_logits_scale_the_spread(tiny_runs, tmp_path):
    """Multiplying the query projection by 3 multiplies every pre-softmax logit by 3."""
    spec = _probe(tmp_path)
    base = tiny_runs["llama"] / "step4"

    def scale_queries(tensors):
        for name in [n for n in tensors if "q_proj.weight" in n]:
            tensors[name] = tensors[name] * 3

    scaled = edited_checkpoint(base, tmp_path / "scaled", scale_queries)
    rows = [
        polymap.extract_checkpoint(CheckpointRef("r", 4, str(p)), "activations", "cpu", probe=spec)
        for p in (base, scaled)
    ]
    # layer 0 sees the same input: its logits are exactly 3x; later layers see changed input
    key = "activations.layer0.attn_logit_spread"
    assert rows[1][key] == pytest.approx(3 * rows[0][key], rel=1e-4)
    assert (
        rows[1]["activations.layer1.attn_logit_spread"]
        > rows[0]["activations.layer1.attn_logit_spread"]
    )
    assert rows[1]["activations.layer0.attn_entropy"] < rows[0]["activations.layer0.attn_entropy"]


def test_planted_outlier_dimension_is_found(tiny_runs, tmp_path):
    """A huge bias on one output dimension of every MLP makes that residual dimension an
    outlier: outlier_dims = 1 / hidden size."""
    spec = _probe(tmp_path)
    sizes = []

    def plant(tensors):
        for name in [n for n in tensors if n.endswith("mlp.dense_4h_to_h.bias")]:
            tensors[name][3] = 500.0
            sizes.append(tensors[name].numel())

    ckpt = edited_checkpoint(tiny_runs["gpt_neox"] / "step4", tmp_path / "outlier", plant)
    hidden = sizes[0]
    row = polymap.extract_checkpoint(
        CheckpointRef("r", 4, str(ckpt)), "activations", "cpu", probe=spec
    )
    assert row["activations.layer1.outlier_dims"] == pytest.approx(1 / hidden)
    assert row["activations.max_abs"] > 400


def test_nan_weights_are_recorded_not_hidden(tiny_runs, tmp_path):
    spec = _probe(tmp_path)
    ckpt = edited_checkpoint(tiny_runs["gpt_neox"] / "step4", tmp_path / "nan", _plant_nan)
    row = polymap.extract_checkpoint(CheckpointRef("r", 4, str(ckpt)),
                                     "shape,activations,gradients", "cpu", probe=spec)  # fmt: skip
    assert row["status"] == "nonfinite"
    assert row["activations.nonfinite"] == 1.0 and "activations: the forward pass" in row["error"]
    assert "gradients: non-finite" in row["error"]
    assert math.isfinite(row["shape.attn_out.nu"])  # finite entries still describe the shape


def test_planted_outlier_column_shows_in_shape_and_activations(tiny_runs, tmp_path):
    """One input column of every attention output matrix scaled 40x: heavy tails in
    that role's weights, and large activations, while other roles are untouched."""
    spec = _probe(tmp_path)

    def outlier_column(tensors):
        for name in [n for n in tensors if n.endswith("attention.dense.weight")]:
            tensors[name][:, 5] *= 40

    base = tiny_runs["gpt_neox"] / "step4"
    planted = edited_checkpoint(base, tmp_path / "col", outlier_column)
    before, after = (
        polymap.extract_checkpoint(CheckpointRef("r", 4, str(p)), "shape,activations", "cpu",
                                   probe=spec)
        for p in (base, planted)
    )  # fmt: skip
    assert after["shape.attn_out.kurtosis"] > before["shape.attn_out.kurtosis"] + 5
    assert after["shape.attn_out.tail_ratio"] > before["shape.attn_out.tail_ratio"]
    assert after["shape.attn_out.nu"] < before["shape.attn_out.nu"]
    assert after["shape.mlp_in.kurtosis"] == before["shape.mlp_in.kurtosis"]
    assert after["activations.max_abs"] > before["activations.max_abs"]
