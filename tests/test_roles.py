"""Roles for each architecture, on the names real transformers checkpoints store."""

from __future__ import annotations

import pytest

from polymap import TensorReader
from polymap.checkpoints import read_config
from polymap.roles import GENERIC, assign_role, detect_architecture

EXPECTED = {
    "gpt_neox": {
        "gpt_neox.embed_in.weight": (None, "embed", "weight"),
        "embed_out.weight": (None, "unembed", "weight"),
        "gpt_neox.layers.1.attention.query_key_value.weight": (1, "attn_qkv", "weight"),
        "gpt_neox.layers.1.attention.query_key_value.bias": (1, "attn_qkv", "bias"),
        "gpt_neox.layers.0.attention.dense.weight": (0, "attn_out", "weight"),
        "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (0, "mlp_in", "weight"),
        "gpt_neox.layers.0.mlp.dense_4h_to_h.bias": (0, "mlp_out", "bias"),
        "gpt_neox.layers.0.input_layernorm.weight": (0, "norm", "weight"),
        "gpt_neox.final_layer_norm.bias": (None, "norm", "bias"),
    },
    "gpt2": {
        "transformer.wte.weight": (None, "embed", "weight"),
        "transformer.wpe.weight": (None, "embed", "weight"),
        "transformer.h.1.attn.c_attn.weight": (1, "attn_qkv", "weight"),
        "transformer.h.1.attn.c_proj.bias": (1, "attn_out", "bias"),
        "transformer.h.0.mlp.c_fc.weight": (0, "mlp_in", "weight"),
        "transformer.h.0.mlp.c_proj.weight": (0, "mlp_out", "weight"),
        "transformer.h.0.ln_1.weight": (0, "norm", "weight"),
        "transformer.ln_f.bias": (None, "norm", "bias"),
    },
    "llama": {
        "model.embed_tokens.weight": (None, "embed", "weight"),
        "lm_head.weight": (None, "unembed", "weight"),
        "model.layers.1.self_attn.q_proj.weight": (1, "attn_qkv", "weight"),
        "model.layers.1.self_attn.k_proj.weight": (1, "attn_qkv", "weight"),
        "model.layers.1.self_attn.v_proj.weight": (1, "attn_qkv", "weight"),
        "model.layers.1.self_attn.o_proj.weight": (1, "attn_out", "weight"),
        "model.layers.0.mlp.gate_proj.weight": (0, "mlp_in", "weight"),
        "model.layers.0.mlp.up_proj.weight": (0, "mlp_in", "weight"),
        "model.layers.0.mlp.down_proj.weight": (0, "mlp_out", "weight"),
        "model.layers.0.input_layernorm.weight": (0, "norm", "weight"),
        "model.norm.weight": (None, "norm", "weight"),
    },
    "bert": {
        "bert.embeddings.word_embeddings.weight": (None, "embed", "weight"),
        "bert.embeddings.LayerNorm.weight": (None, "norm", "weight"),
        "bert.encoder.layer.1.attention.self.query.weight": (1, "attn_qkv", "weight"),
        "bert.encoder.layer.1.attention.self.value.bias": (1, "attn_qkv", "bias"),
        "bert.encoder.layer.1.attention.output.dense.weight": (1, "attn_out", "weight"),
        "bert.encoder.layer.1.attention.output.LayerNorm.weight": (1, "norm", "weight"),
        "bert.encoder.layer.0.intermediate.dense.weight": (0, "mlp_in", "weight"),
        "bert.encoder.layer.0.output.dense.weight": (0, "mlp_out", "weight"),
        "bert.encoder.layer.0.output.LayerNorm.bias": (0, "norm", "bias"),
        "cls.predictions.bias": (None, "unembed", "bias"),
        "cls.predictions.transform.dense.weight": (None, "other", "weight"),
    },
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_roles_of_real_checkpoint_names(tiny_runs, arch):
    directory = tiny_runs[arch] / "step1"
    with TensorReader(directory) as reader:
        names = reader.names()
        detected = detect_architecture(read_config(directory), names)
    assert detected.name == arch
    assert set(EXPECTED[arch]) <= set(names), set(EXPECTED[arch]) - set(names)
    for name, (layer, role, kind) in EXPECTED[arch].items():
        got = assign_role(detected, name)
        assert (got.layer, got.role, got.kind) == (layer, role, kind), name
    # Every block matrix of a known architecture has a specific role.
    for name in names:
        got = assign_role(detected, name)
        if got.layer is not None:
            assert got.role != "other", name


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_detection_from_names_alone(tiny_runs, arch):
    with TensorReader(tiny_runs[arch] / "step1") as reader:
        assert detect_architecture(None, reader.names()).name == arch


def test_buffers_and_unknown_names():
    neox = detect_architecture({"model_type": "gpt_neox"}, [])
    assert assign_role(neox, "gpt_neox.layers.0.attention.bias").kind == "buffer"
    assert assign_role(neox, "gpt_neox.layers.0.attention.rotary_emb.inv_freq").kind == "buffer"
    assert assign_role(neox, "gpt_neox.layers.0.attention.query_key_value.bias").kind == "bias"
    gpt2 = detect_architecture({"model_type": "gpt2"}, [])
    assert assign_role(gpt2, "h.0.attn.bias").kind == "buffer"
    assert assign_role(gpt2, "h.0.attn.c_attn.bias").kind == "bias"
    unknown = detect_architecture({"model_type": "mamba"}, ["backbone.mixer.A_log"])
    assert unknown is GENERIC
    assert assign_role(unknown, "backbone.layers.3.mixer.A_log").role == "other"
    assert assign_role(unknown, "backbone.layers.3.mixer.A_log").layer == 3
