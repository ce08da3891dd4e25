"""``evals_native``: quick language-modelling evals of each checkpoint on the probe text.

The checkpoint runs as a causal LM over the probe's eval rows (``eval_sequences`` x
``length``: 64 x 128 = 8,192 tokens by default; by default the suite
corpus's held-out split; ``--probe-text FILE`` or ``--probe-tokens FILE`` otherwise),
batched, on the GPU when there is one. Over every next-token prediction of the batch:

- ``loss``: mean cross-entropy in nats (the validation loss);
- ``perplexity``: ``exp(loss)``;
- ``token_acc``: share of positions whose most likely next token is the true one.

A forward pass that produces NaN/Inf logits (a diverged run) gives NaN values and a
warning; that is itself a signal.

>>> polymap.extract("runs/", features="evals_native")          # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch

from polymap.features.base import FeatureSet, register_feature_set


@register_feature_set
class EvalsNative(FeatureSet):
    name = "evals_native"
    needs_model = True
    documentation = {
        "evals_native.loss": "mean next-token cross-entropy (nats) on the probe text",
        "evals_native.perplexity": "exp(loss): the probe text's perplexity",
        "evals_native.token_acc": "share of probe positions where the argmax token is right",
    }

    def start(self) -> None:
        self.values = {k: float("nan") for k in self.documentation}

    @torch.no_grad()
    def add_model(self, model, probe) -> None:
        device = next(model.parameters()).device
        if probe.eval_warning:
            self.warnings.append(f"evals_native: {probe.eval_warning}")
        total_loss, correct, count, nonfinite = 0.0, 0, 0, False
        for batch in probe.eval_ids.split(self.context.probe.batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            target = batch[:, 1:]
            if not torch.isfinite(logits).all():
                nonfinite = True
                break
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total_loss += float(loss)
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
        if nonfinite:
            self.warnings.append("evals_native: the forward pass produced non-finite logits")
            return
        loss = total_loss / count
        self.values = {
            "evals_native.loss": loss,
            "evals_native.perplexity": math.exp(loss) if loss < 700 else float("inf"),
            "evals_native.token_acc": correct / count,
        }

    def finish(self) -> dict[str, float]:
        return dict(self.values)
