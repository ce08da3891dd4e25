"""Local lm-eval tasks built from text on disk, so lm-eval runs without the Hub.

:func:`write_last_word_task` writes a LAMBADA-style task (predict the last word of a
passage from the words before it; metrics ``acc`` = the word is the greedy continuation,
and ``perplexity`` of the word) as ``<name>.yaml`` + ``<name>.jsonl`` in a folder that
``polymap evals run --include-path`` (lm-eval's ``TaskManager(include_path=...)``) reads.
By default the passages come from the suite corpus's held-out split, which no suite run
trained on.

>>> folder = write_last_word_task("tasks/")                      # doctest: +SKIP
>>> sorted(p.name for p in folder.iterdir())                     # doctest: +SKIP
['suite_lastword.jsonl', 'suite_lastword.yaml']
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from polymap.atomic import write_text
from polymap.corpus import held_out_text
from polymap.errors import PolymapError

DEFAULT_TASK = "suite_lastword"
_WORD = re.compile(r"^[A-Za-z]{3,}$")

_YAML = """\
# Written by polymap (polymap.evals.tasks.write_last_word_task); a LAMBADA-style task
# on local data: the context is a passage without its last word, the target that word.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def last_word_examples(
    documents: list[str], min_words: int = 8, max_words: int = 48, limit: int = 500
) -> list[dict[str, str]]:
    """``{"context", "target"}`` pairs: passages of ``min_words``..``max_words`` words
    whose last word is alphabetic (trailing punctuation dropped).

    >>> last_word_examples(["one two three four five six seven eight nine words."], 8)
    [{'context': 'one two three four five six seven eight nine', 'target': 'words'}]
    """
    out = []
    for doc in documents:
        for paragraph in re.split(r"\n\s*\n", doc):
            words = paragraph.split()
            if len(words) < min_words:
                continue
            words = words[-max_words:]
            last = words[-1].rstrip(".,;:!?")
            if _WORD.match(last):
                out.append({"context": " ".join(words[:-1]), "target": last})
            if len(out) >= limit:
                return out
    return out


def write_last_word_task(
    folder: str | Path,
    corpus: str | Path | None = None,
    name: str = DEFAULT_TASK,
    limit: int = 500,
) -> Path:
    """Write the task YAML and its JSONL data into ``folder``; returns the folder.

    The target word is scored with its leading space (``" " + target``: lm-eval does not
    insert a delimiter for ``loglikelihood`` tasks). The YAML names the data file by
    absolute path (lm-eval resolves ``data_files``
    against the working directory, not the YAML's folder).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # held-out parts start where the split cut the document, often mid-word
    documents = [d.split(None, 1)[-1] for d in held_out_text(corpus)]
    examples = last_word_examples(documents, limit=limit)
    if not examples:
        raise PolymapError(f"{corpus or 'the suite corpus'}: no passages for a last-word task")
    data = folder / f"{name}.jsonl"
    write_text(data, "".join(json.dumps(e) + "\n" for e in examples))
    write_text(
        folder / f"{name}.yaml", _YAML.format(name=name, data=json.dumps(str(data.resolve())))
    )
    return folder
