"""Parameter names -> (layer, role, kind), one small table per architecture.

Every feature set aggregates "per role" and "per layer", so the name of a tensor in a
checkpoint must be mapped to what it *is*. Roles form a fixed vocabulary:

``embed, unembed, attn_qkv, attn_out, mlp_in, mlp_out, norm, other``

and the kind says whether the tensor is a ``weight``, a ``bias`` or a ``buffer`` (a
non-parameter stored in some checkpoints, such as GPT-NeoX's causal mask
``attention.bias`` or ``rotary_emb.inv_freq``; feature sets skip buffers, as
``named_parameters()`` would).

Adding an architecture is one :func:`register_architecture` call with its table. A name
no rule matches gets role ``other``, never an error.

Examples
--------
>>> arch = detect_architecture({"model_type": "gpt_neox"}, [])
>>> assign_role(arch, "gpt_neox.layers.3.attention.query_key_value.weight")
ParamRole(layer=3, role='attn_qkv', kind='weight')
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from polymap.errors import UsageError

ROLES = ("embed", "unembed", "attn_qkv", "attn_out", "mlp_in", "mlp_out", "norm", "other")


@dataclass(frozen=True)
class ParamRole:
    """Where a tensor sits in the network: its block index (None outside blocks),
    its role and its kind."""

    layer: int | None
    role: str
    kind: str


@dataclass(frozen=True)
class Architecture:
    """A name table for one architecture family.

    Parameters
    ----------
    name:
        Short identifier (``gpt_neox``).
    model_types:
        ``config.json`` ``model_type`` values that select this table.
    rules:
        ``(regex, role)`` pairs tried in order with ``re.search`` on the tensor name.
    layer_pattern:
        Regex whose first group is the block index.
    buffers:
        Regexes of names that are buffers, not parameters.
    transposed:
        True when linear weights are stored ``(in, out)`` (GPT-2's ``Conv1D``).
    signature:
        Regex that recognises the architecture from tensor names alone (used when
        config.json is missing).
    """

    name: str
    model_types: tuple[str, ...]
    rules: tuple[tuple[str, str], ...]
    layer_pattern: str
    buffers: tuple[str, ...] = ()
    transposed: bool = False
    signature: str = ""
    _compiled: list = field(default_factory=list, repr=False, compare=False)

    def compiled(self) -> list[tuple[re.Pattern, str]]:
        if not self._compiled:
            self._compiled.extend((re.compile(p), r) for p, r in self.rules)
        return self._compiled


_REGISTRY: dict[str, Architecture] = {}

# Buffers written by some versions of transformers into checkpoints (not parameters).
_COMMON_BUFFERS = (r"\.masked_bias$", r"\.inv_freq$", r"\.position_ids$", r"_float_tensor$")


def register_architecture(arch: Architecture, replace: bool = False) -> Architecture:
    """Add an architecture table; returns it, so it can decorate a constant. A different
    table under a name already taken is an error unless ``replace=True``."""
    for pattern, role in arch.rules:
        if role not in ROLES:
            raise UsageError(f"role {role!r} in rule {pattern!r} is not one of {ROLES}")
    known = _REGISTRY.get(arch.name)
    if known is not None and known != arch and not replace:
        raise UsageError(
            f"architecture name {arch.name!r} is already registered with other rules; "
            "pick another name or pass replace=True"
        )
    _REGISTRY[arch.name] = arch
    return arch


def architectures() -> dict[str, Architecture]:
    """The registered architectures by name."""
    return dict(_REGISTRY)


GENERIC = Architecture(
    name="generic",
    model_types=(),
    rules=(
        (r"(^|\.)(embed|wte|wpe|word_embeddings|embed_tokens|embed_in)", "embed"),
        (r"(^|\.)(lm_head|embed_out|unembed)", "unembed"),
        (r"(norm|ln_\d|ln_f|layernorm)", "norm"),
        (r"(query_key_value|qkv|q_proj|k_proj|v_proj|c_attn|query|key|value)", "attn_qkv"),
        (r"(o_proj|out_proj|attn.*(dense|c_proj)|attention.*dense)", "attn_out"),
        (r"(up_proj|gate_proj|fc1|c_fc|dense_h_to_4h|w1|w3|intermediate)", "mlp_in"),
        (r"(down_proj|fc2|dense_4h_to_h|w2|mlp.*c_proj)", "mlp_out"),
    ),
    layer_pattern=r"(?:layers|layer|h|blocks|block)\.(\d+)\.",
)

register_architecture(
    Architecture(
        name="gpt_neox",
        model_types=("gpt_neox",),
        rules=(
            (r"embed_in\.", "embed"),
            (r"(^|\.)embed_out\.|(^|\.)lm_head\.", "unembed"),
            (r"(input_layernorm|post_attention_layernorm|final_layer_norm)\.", "norm"),
            (r"attention\.query_key_value\.", "attn_qkv"),
            (r"attention\.dense\.", "attn_out"),
            (r"mlp\.dense_h_to_4h\.", "mlp_in"),
            (r"mlp\.dense_4h_to_h\.", "mlp_out"),
        ),
        layer_pattern=r"layers\.(\d+)\.",
        # Pythia checkpoints store the causal mask as `attention.bias` (a buffer).
        buffers=(r"attention\.bias$",),
        signature=r"gpt_neox\.|query_key_value",
    )
)

register_architecture(
    Architecture(
        name="gpt2",
        model_types=("gpt2",),
        rules=(
            (r"(^|\.)(wte|wpe)\.", "embed"),
            (r"(^|\.)lm_head\.", "unembed"),
            (r"(^|\.)(ln_1|ln_2|ln_f)\.", "norm"),
            (r"attn\.c_attn\.", "attn_qkv"),
            (r"attn\.c_proj\.", "attn_out"),
            (r"mlp\.c_fc\.", "mlp_in"),
            (r"mlp\.c_proj\.", "mlp_out"),
        ),
        layer_pattern=r"(?:^|\.)h\.(\d+)\.",
        # Old GPT-2 checkpoints store the causal mask as `attn.bias` (a buffer).
        buffers=(r"(^|\.)attn\.bias$",),
        transposed=True,
        signature=r"(^|\.)h\.\d+\.attn\.c_attn",
    )
)

register_architecture(
    Architecture(
        name="llama",
        model_types=("llama", "mistral", "olmo", "olmo2", "qwen2", "gemma"),
        rules=(
            (r"embed_tokens\.", "embed"),
            (r"(^|\.)lm_head\.", "unembed"),
            (r"(input_layernorm|post_attention_layernorm|q_norm|k_norm|(^|\.)norm)\.", "norm"),
            (r"(post_feedforward_layernorm|pre_feedforward_layernorm)\.", "norm"),
            (r"self_attn\.(q_proj|k_proj|v_proj|qkv_proj)\.", "attn_qkv"),
            (r"self_attn\.o_proj\.", "attn_out"),
            (r"mlp\.(gate_proj|up_proj|gate_up_proj)\.", "mlp_in"),
            (r"mlp\.down_proj\.", "mlp_out"),
        ),
        layer_pattern=r"layers\.(\d+)\.",
        signature=r"self_attn\.(q_proj|o_proj)",
    )
)

register_architecture(
    Architecture(
        name="bert",
        model_types=("bert", "roberta"),
        rules=(
            (r"embeddings\.LayerNorm\.", "norm"),
            (r"embeddings\.\w+_embeddings\.", "embed"),
            (r"LayerNorm\.", "norm"),
            (r"attention\.self\.(query|key|value)\.", "attn_qkv"),
            (r"attention\.output\.dense\.", "attn_out"),
            (r"intermediate\.dense\.", "mlp_in"),
            (r"layer\.\d+\.output\.dense\.", "mlp_out"),
            (r"predictions\.decoder\.|predictions\.bias$", "unembed"),
        ),
        layer_pattern=r"layer\.(\d+)\.",
        signature=r"attention\.self\.query",
    )
)


register_architecture(
    Architecture(
        name="torchtitan_llama",
        model_types=("torchtitan_llama",),
        rules=(
            (r"(^|\.)tok_embeddings\.", "embed"),
            (r"(^|\.)output\.", "unembed"),
            (r"(attention_norm|ffn_norm|(^|\.)norm)\.", "norm"),
            (r"attention\.(wq|wk|wv)\.", "attn_qkv"),
            (r"attention\.wo\.", "attn_out"),
            (r"feed_forward\.(w1|w3)\.", "mlp_in"),
            (r"feed_forward\.w2\.", "mlp_out"),
        ),
        layer_pattern=r"layers\.(\d+)\.",
        buffers=(r"(^|\.)freqs_cis$",),
        signature=r"attention\.wq\.|(^|\.)tok_embeddings\.",
    )
)

register_architecture(
    Architecture(
        name="olmo_core",
        model_types=("olmo_core",),
        rules=(
            (r"(^|\.)embeddings\.", "embed"),
            (r"lm_head\.w_out\.", "unembed"),
            (r"(attention_norm|feed_forward_norm|q_norm|k_norm|lm_head\.norm)\.", "norm"),
            (r"attention\.(w_q|w_k|w_v|w_qkv)\.", "attn_qkv"),
            (r"attention\.w_out\.", "attn_out"),
            (r"feed_forward\.(w1|w3)\.", "mlp_in"),
            (r"feed_forward\.w2\.", "mlp_out"),
        ),
        layer_pattern=r"blocks\.(\d+)\.",
        signature=r"attention\.w_q\.|lm_head\.w_out\.",
    )
)


_BUILTIN = dict(_REGISTRY)  # polymap's own tables, as registered above


def added_architectures() -> list[Architecture]:
    """Tables registered in this process that are not polymap's own (or replace one)."""
    return [a for n, a in _REGISTRY.items() if _BUILTIN.get(n) != a]


def detect_architecture(config: dict | None, names: Iterable[str]) -> Architecture:
    """Pick the table for a checkpoint from its config's ``model_type``, else from its
    tensor names; fall back to :data:`GENERIC` (which still assigns most roles)."""
    model_type = (config or {}).get("model_type")
    if model_type:
        for arch in _REGISTRY.values():
            if model_type in arch.model_types:
                return arch
    names = list(names)
    for arch in _REGISTRY.values():
        if arch.signature and any(re.search(arch.signature, n) for n in names):
            return arch
    return GENERIC


def is_known(arch: Architecture) -> bool:
    """False for the generic fallback table."""
    return arch.name in _REGISTRY


def assign_role(arch: Architecture, name: str) -> ParamRole:
    """Map one tensor name to its (layer, role, kind) under ``arch``."""
    match = re.search(arch.layer_pattern, name)
    layer = int(match.group(1)) if match else None
    if any(re.search(p, name) for p in arch.buffers + _COMMON_BUFFERS):
        return ParamRole(layer, "other", "buffer")
    kind = "bias" if name.endswith("bias") else "weight"
    for pattern, role in arch.compiled():
        if pattern.search(name):
            return ParamRole(layer, role, kind)
    return ParamRole(layer, "other", kind)
