"""The fixed probe batch that model-level feature sets run through each checkpoint.

A :class:`ProbeSpec` says where the tokens come from (picklable, sent to workers):

* ``tokens``: a file of token ids (``.npy`` integer array, never unpickled, or a text file
  of whitespace-separated integers) — for models without a tokenizer;
* ``text``: a UTF-8 text file, tokenised with the checkpoint's own tokenizer;
* neither: the suite corpus's held-out split (Python's documentation topics).

The ids are cut into rows of ``length`` tokens (``length`` capped by the model's
context): the statistics of model internals (``activations``, ``gradients``, ...) run over
the first ``sequences`` rows, the evals (``evals_native``'s loss and accuracy) over the first
``eval_sequences`` rows. A loss needs more tokens than an activation statistic: on the
instability zoo, the 1,024-token probe's loss did not separate runs trained on repeated
data from healthy ones at 25% of training (AUROC 0.53) while 8,192 tokens did (1.00, as the
suite's own 16k-token validation loss; ``benchmarks/bench_probe.py``). A probe too short
for that many rows uses the full rows it has (a warning is recorded) and one shorter than a
single row is an error.

>>> spec = ProbeSpec(sequences=2, eval_sequences=3, length=4, tokens=None, text=None)
>>> probe = Probe.from_ids(list(range(13)), spec)
>>> probe.ids.tolist(), probe.eval_ids.shape
([[0, 1, 2, 3], [4, 5, 6, 7]], torch.Size([3, 4]))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from polymap.checkpoints.reader import CheckpointError, check_regular
from polymap.features.base import FeatureUnavailableError

# Model types whose transformers "causal LM" class is only meaningful with is_decoder=True.
ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "deberta", "deberta-v2"}
)


@dataclass(frozen=True)
class ProbeSpec:
    """Where probe tokens come from and the batch shape."""

    sequences: int = 8
    eval_sequences: int = 64
    length: int = 128
    batch_size: int = 8
    tokens: str | None = None
    text: str | None = None


@dataclass
class Probe:
    """``eval_ids``: ``(eval_sequences, length)`` int64 token ids; ``ids``: the first
    ``sequences`` of them; ``warning`` / ``eval_warning``: set when the text is too short
    for ``sequences`` / ``eval_sequences`` rows."""

    eval_ids: torch.Tensor
    sequences: int
    warning: str | None = None
    eval_warning: str | None = None

    @property
    def ids(self) -> torch.Tensor:
        """The rows that statistics of model internals run over."""
        return self.eval_ids[: self.sequences]

    @classmethod
    def from_ids(cls, ids, spec: ProbeSpec, max_length: int | None = None) -> Probe:
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64).reshape(-1))
        length = min(spec.length, max_length or spec.length)
        wanted = max(spec.sequences, spec.eval_sequences)
        rows = min(wanted, ids.numel() // length)
        if rows < 1:
            raise FeatureUnavailableError(
                f"probe has {ids.numel()} tokens, fewer than one sequence of {length}; "
                "give a longer --probe-text/--probe-tokens or a smaller --probe-length"
            )

        def short(n: int) -> str | None:
            return f"probe gives {rows} of {n} sequences of {length} tokens" if rows < n else None

        return cls(
            ids[: rows * length].reshape(rows, length),
            spec.sequences,
            short(spec.sequences),
            short(spec.eval_sequences),
        )

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.eval_ids.numpy().tobytes()).hexdigest()[:12]


def _read_token_file(path: str) -> np.ndarray:
    file = Path(path)
    try:
        if file.suffix == ".npy":
            return np.load(file, allow_pickle=False).reshape(-1)
        return np.array(file.read_text().split(), dtype=np.int64)
    except (OSError, ValueError) as err:
        raise FeatureUnavailableError(
            f"--probe-tokens {file}: cannot read token ids ({err})"
        ) from err


@lru_cache(maxsize=8)
def _probe_text(path: str | None) -> str:
    if path is None:
        from polymap.corpus import held_out_text

        return "\n\n".join(held_out_text())
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FeatureUnavailableError(f"--probe-text {path}: cannot read ({err})") from err


# token ids of the probe text per (tokenizer content digest, text): every checkpoint of a
# run (and of every run sharing the tokenizer) reuses them; keyed by the directory they
# were first read from, each checkpoint re-tokenized the text (0.09 s of the 0.33 s a
# nano checkpoint's evals_native cost)
_TOKENIZED: dict[tuple[str, str | None], tuple[int, ...]] = {}


def _tokenize(tokenizer_dir: str, digest: str, text_path: str | None) -> tuple[int, ...]:
    key = (digest, text_path)
    if key not in _TOKENIZED:
        if len(_TOKENIZED) >= 8:
            _TOKENIZED.pop(next(iter(_TOKENIZED)))
        _TOKENIZED[key] = _encode(tokenizer_dir, text_path)
    return _TOKENIZED[key]


def _encode(tokenizer_dir: str, text_path: str | None) -> tuple[int, ...]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FeatureUnavailableError(
            f"{tokenizer_dir}: no tokenizer to encode the probe text ({type(err).__name__}); "
            "give token ids with --probe-tokens FILE"
        ) from err
    return tuple(tokenizer(_probe_text(text_path))["input_ids"])


def _tokenizer_digest(directory: Path) -> str:
    h = hashlib.sha1()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"):
        file = directory / name
        if file.exists():
            h.update(check_regular(file).read_bytes())
    return h.hexdigest()


def build_probe(spec: ProbeSpec, directory: Path, max_length: int | None = None) -> Probe:
    """The probe for the checkpoint in ``directory`` (cached per tokenizer)."""
    if spec.tokens is not None:
        return Probe.from_ids(_read_token_file(spec.tokens), spec, max_length)
    digest = _tokenizer_digest(directory)
    if digest == hashlib.sha1().hexdigest():
        raise FeatureUnavailableError(
            f"{directory}: the checkpoint has no tokenizer files; give token ids with "
            "--probe-tokens FILE"
        )
    ids = _tokenize(str(directory), digest, spec.text)
    return Probe.from_ids(ids, spec, max_length)


def load_causal_lm(directory: Path, device: torch.device):
    """The checkpoint as a float32 transformers causal LM in eval mode on ``device``, with
    eager attention (so attention probabilities can be returned).

    Weights load through transformers (safetensors; ``.bin`` only with
    ``weights_only=True``); a model type without a causal-LM head is
    :class:`FeatureUnavailableError`.
    """
    import transformers

    for name in ("config.json", "model.safetensors"):  # transformers would block on a FIFO
        if (Path(directory) / name).exists():
            try:
                check_regular(Path(directory) / name)
            except CheckpointError as err:
                raise FeatureUnavailableError(str(err)) from None
    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    if config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False):
        raise FeatureUnavailableError(
            f"{config.model_type} is an encoder (bidirectional), not a causal language model"
        )
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, local_files_only=True, attn_implementation="eager"
        )
    except ValueError as err:
        raise FeatureUnavailableError(f"not a causal language model ({err})") from err
    return model.to(device).eval()


def max_positions(config: dict | None) -> int | None:
    """The model's context length from its config, when it says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance((config or {}).get(key), int):
            return int(config[key])
    return None
