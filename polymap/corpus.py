"""The suite's text and tokenizer: real English available on every machine, or a file.

The default corpus is Python's own documentation topics (``pydoc_data.topics``, ~465k
characters, shipped with CPython); a plain-text ``--corpus`` file is split into
paragraphs. The last 10% of every document is held out for validation. A byte-level BPE
tokenizer is trained on the training split with the ``tokenizers`` library and saved in
the Hugging Face format, so
``AutoTokenizer.from_pretrained`` loads it from any checkpoint directory offline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from polymap.errors import PolymapError

EOS = "<|endoftext|>"
VALIDATION_FRACTION = 0.1


class CorpusError(PolymapError, ValueError):
    """An empty, unreadable or too small corpus."""


@dataclass
class Corpus:
    """Token ids of the training and validation splits, and the tokenizer."""

    train: torch.Tensor
    validation: torch.Tensor
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    digest: str  # sha1 of the text and tokenizer settings: identifies the corpus

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def _documents(corpus: str | Path | None) -> list[str]:
    if corpus is None:
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    path = Path(corpus)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CorpusError(f"--corpus {path}: cannot read ({err})") from err
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise CorpusError(f"--corpus {path}: empty")
    return docs


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """Training parts (first 90% of each document) and held-out parts (the rest)."""
    cuts = [int(len(d) * (1 - VALIDATION_FRACTION)) for d in docs]
    train = [d[:c] for d, c in zip(docs, cuts, strict=True)]
    held_out = [d[c:] for d, c in zip(docs, cuts, strict=True) if d[c:].strip()]
    return train, held_out


def held_out_text(corpus: str | Path | None = None) -> list[str]:
    """The held-out (validation) parts of the corpus's documents, as text.

    >>> len(held_out_text()) > 50
    True
    """
    return split_documents(_documents(corpus))[1]


def load_corpus(corpus: str | Path | None = None, vocab_size: int = 512) -> Corpus:
    """Read, split and tokenise the corpus (deterministic for the same text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = _documents(corpus)
    train_docs, val_docs = split_documents(docs)
    if sum(len(d) for d in train_docs) < 20_000:
        raise CorpusError(
            f"corpus too small ({sum(len(d) for d in docs)} characters); need at least ~25k"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    eos = tokenizer.convert_tokens_to_ids(EOS)

    def encode(parts: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for doc in parts:
            ids.extend(tok.encode(doc).ids)
            ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)

    digest = hashlib.sha1(("\x00".join(docs) + f"|{vocab_size}").encode()).hexdigest()[:12]
    return Corpus(encode(train_docs), encode(val_docs), tokenizer, digest)
