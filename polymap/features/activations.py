"""``activations``: the residual stream, attention and output logits on the probe batch.

Residual-stream outliers grow fast, peak in the middle blocks and decline; attention
logits and output logits drift before a run diverges. One forward pass over the probe
batch (eager attention, so the attention probabilities are available), with a forward
hook on every transformer block (the model's ``ModuleList`` of ``num_hidden_layers``
blocks; works for any transformers causal LM):

- ``activations.layer<L>.max_abs``: largest ``|x|`` of the block's output (residual stream);
- ``activations.layer<L>.top5_mean``: mean of its 5 largest ``|x|``;
- ``activations.layer<L>.outlier_dims``: share of hidden dimensions whose largest ``|x|``
  over the batch exceeds ``OUTLIER_FACTOR`` (6) times the median dimension's;
- ``activations.layer<L>.attn_entropy``: mean entropy (nats) of the attention rows
  (causal positions only; heads and rows averaged);
- ``activations.layer<L>.attn_logit_spread``: the largest pre-softmax logit spread of
  any attention row, ``max_j s_ij - min_j s_ij``. Softmax hides a per-row constant, so
  this (recovered exactly as ``log p_ij`` differences) is what can be measured from the
  probabilities; it grows in proportion to the logit scale (query-key growth);
- aggregates ``activations.max_abs`` (over blocks), ``activations.peak_layer`` (block of
  the largest ``|x|``, as a fraction of depth), ``activations.attn_logit_spread`` (max
  over layers) and ``activations.attn_entropy`` (mean);
- ``activations.logit_norm``: mean L2 norm of the output logit vectors;
  ``activations.log_partition``: mean ``logsumexp`` of the logits (its drift over
  checkpoints is the output-logit drift precursor).

A forward pass producing NaN/Inf is recorded (``activations.nonfinite`` = 1, a warning)
rather than hidden.
"""

from __future__ import annotations

import math

import torch

from polymap.features.base import FeatureSet, FeatureUnavailableError, register_feature_set

OUTLIER_FACTOR = 6.0
TOP_K = 5


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The model's blocks: the ``ModuleList`` with ``num_hidden_layers`` entries (the
    longest list when the config does not say)."""
    layers = getattr(model.config, "num_hidden_layers", None) or getattr(
        model.config, "n_layer", None
    )
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    matching = [m for m in lists if len(m) == layers] or sorted(lists, key=len)[-1:]
    if not matching:
        raise FeatureUnavailableError("no list of transformer blocks found for hooks")
    return list(matching[0])


class _BlockStats:
    def __init__(self):
        self.max_abs = 0.0
        self.top: torch.Tensor | None = None
        self.dim_max: torch.Tensor | None = None
        self.nonfinite = False

    def add(self, hidden: torch.Tensor) -> None:
        a = hidden.detach().float().abs()
        if not torch.isfinite(a).all():
            self.nonfinite = True
            a = torch.nan_to_num(a, nan=0.0, posinf=0.0)
        flat = a.reshape(-1)
        top = flat.topk(min(TOP_K, flat.numel())).values
        self.top = top if self.top is None else torch.cat([self.top, top]).topk(top.numel()).values
        self.max_abs = max(self.max_abs, float(top[0]))
        dim_max = a.reshape(-1, a.shape[-1]).amax(0)
        self.dim_max = dim_max if self.dim_max is None else torch.maximum(self.dim_max, dim_max)


def _attention_stats(probs: torch.Tensor) -> tuple[float, float, int]:
    """(sum of row entropies, largest row logit spread, number of rows) for ``(B, H, T, T)``
    causal attention probabilities; rows with fewer than two positions are skipped."""
    p = probs.detach().double()
    t = p.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=p.device).tril()
    rows = causal.sum(-1) >= 2  # positions with at least two keys
    p = p[..., rows, :]
    mask = causal[rows]
    positive = (p > 0) & mask
    logp = torch.where(positive, p.clamp_min(1e-300).log(), torch.zeros_like(p))
    entropy = -(p * logp).sum(-1)
    high = torch.where(positive, logp, torch.full_like(p, -math.inf)).amax(-1)
    low = torch.where(positive, logp, torch.full_like(p, math.inf)).amin(-1)
    spread = float((high - low).max()) if p.numel() else math.nan
    return float(entropy.sum()), spread, int(entropy.numel())


@register_feature_set
class Activations(FeatureSet):
    name = "activations"
    needs_model = True
    documentation = {
        "activations.layer<L>.max_abs": "largest |x| of the residual stream after block L",
        "activations.layer<L>.top5_mean": "mean of its 5 largest |x|",
        "activations.layer<L>.outlier_dims": "share of dims whose max |x| > 6x the median dim's",
        "activations.layer<L>.attn_entropy": "mean attention entropy (nats) in layer L",
        "activations.layer<L>.attn_logit_spread": "largest max-min pre-softmax logit of a row",
        "activations.max_abs / peak_layer": "largest |x| over blocks and where (depth fraction)",
        "activations.logit_norm": "mean L2 norm of the output logits",
        "activations.log_partition": "mean logsumexp of the output logits",
        "activations.nonfinite": "1 if the forward pass produced NaN/Inf",
    }

    def start(self) -> None:
        self.values: dict[str, float] = {}

    @torch.no_grad()
    def add_model(self, model, probe) -> None:
        blocks = transformer_blocks(model)
        stats = [_BlockStats() for _ in blocks]
        hooks = []
        for block, stat in zip(blocks, stats, strict=True):

            def hook(module, args, output, stat=stat):
                hidden = output[0] if isinstance(output, tuple) else output
                stat.add(hidden)

            hooks.append(block.register_forward_hook(hook))
        device = next(model.parameters()).device
        n_layers = len(blocks)
        entropy_sum = [0.0] * n_layers
        spread = [0.0] * n_layers
        count = [0] * n_layers
        norm_sum = logz_sum = 0.0
        tokens = 0
        nonfinite = False
        try:
            for batch in probe.ids.split(self.context.probe.batch_size):
                out = model(input_ids=batch.to(device), output_attentions=True)
                logits = out.logits.float()
                if not torch.isfinite(logits).all():
                    nonfinite = True
                    logits = torch.nan_to_num(logits)
                norm_sum += float(logits.norm(dim=-1).sum())
                logz_sum += float(torch.logsumexp(logits, dim=-1).sum())
                tokens += logits.shape[0] * logits.shape[1]
                for i, probs in enumerate(out.attentions or ()):
                    if probs is None or i >= n_layers:
                        continue
                    e, s, c = _attention_stats(torch.nan_to_num(probs))
                    entropy_sum[i] += e
                    spread[i] = max(spread[i], s)
                    count[i] += c
        finally:
            for handle in hooks:
                handle.remove()
        values: dict[str, float] = {}
        for i, stat in enumerate(stats):
            prefix = f"activations.layer{i}"
            values[f"{prefix}.max_abs"] = stat.max_abs
            values[f"{prefix}.top5_mean"] = (
                float(stat.top.mean()) if stat.top is not None else math.nan
            )
            if stat.dim_max is not None:
                median = float(stat.dim_max.median())
                values[f"{prefix}.outlier_dims"] = (
                    float((stat.dim_max > OUTLIER_FACTOR * median).float().mean())
                    if median > 0
                    else math.nan
                )
            if count[i]:
                values[f"{prefix}.attn_entropy"] = entropy_sum[i] / count[i]
                values[f"{prefix}.attn_logit_spread"] = spread[i]
            nonfinite |= stat.nonfinite
        maxima = [s.max_abs for s in stats]
        values["activations.max_abs"] = max(maxima)
        values["activations.peak_layer"] = maxima.index(max(maxima)) / max(1, n_layers - 1)
        spreads = [spread[i] for i in range(n_layers) if count[i]]
        entropies = [entropy_sum[i] / count[i] for i in range(n_layers) if count[i]]
        values["activations.attn_logit_spread"] = max(spreads) if spreads else math.nan
        values["activations.attn_entropy"] = (
            sum(entropies) / len(entropies) if entropies else math.nan
        )
        values["activations.logit_norm"] = norm_sum / tokens
        values["activations.log_partition"] = logz_sum / tokens
        values["activations.nonfinite"] = float(nonfinite)
        if nonfinite:
            self.warnings.append("activations: the forward pass produced NaN/Inf")
        self.values = values

    def finish(self) -> dict[str, float]:
        return dict(self.values)
