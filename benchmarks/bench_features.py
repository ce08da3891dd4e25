"""Cost of each feature set per checkpoint next to the cost of loading the checkpoint.

On a Pythia-160M-shaped random GPT-NeoX checkpoint (fp32 safetensors, as bench_extract.py
builds), in one process, interleaved over ``--repeats``:

- ``load (read)``: read every tensor (what parameter-level sets stream through);
- ``load (model)``: build the transformers model from the checkpoint (what model-level
  sets need: ``AutoModelForCausalLM.from_pretrained``);
- each feature set alone through ``extract_checkpoint`` (which includes its load), and the
  cost it adds = its time minus the matching load.

Also the ``shape`` subsample error: ``nu`` and ``ks_gauss`` from the documented
subsample against the same statistics on every entry of the role.

    .venv/bin/python benchmarks/bench_features.py --size 160m --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {"70m": (512, 6, 8), "160m": (768, 12, 12)}
SETS = ("hu2023", "weights", "spectral", "shape", "embedding", "drift", "evals_native",
        "activations", "gradients")  # fmt: skip


def build(size: str, root: Path) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from polymap.synthetic import pythia_config

    hidden, layers, heads = SIZES[size]
    paths = []
    for step in (0, 1000):
        path = root / f"pythia-{size}" / f"step{step}"
        if not (path / "model.safetensors").exists():
            torch.manual_seed(step)
            GPTNeoXForCausalLM(pythia_config(hidden, layers, heads, 50304, 2048)).save_pretrained(
                path
            )
            vocab = {chr(33 + i): i for i in range(90)}
            tok = Tokenizer(models.WordLevel(vocab, unk_token="!"))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="!").save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def drop_page_cache() -> bool:
    """Cold-cache timings: ask the kernel to drop clean page cache (needs root)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def time_read(path: Path) -> float:
    from polymap.checkpoints import TensorReader

    started = time.perf_counter()
    with TensorReader(path) as reader:
        for name in reader.names():
            reader.get(name)
    return time.perf_counter() - started


def time_model(path: Path) -> float:
    from polymap.features.probe import load_causal_lm

    started = time.perf_counter()
    load_causal_lm(path, torch.device("cpu"))
    return time.perf_counter() - started


def time_set(name: str, path: Path, initial: Path) -> float:
    from polymap.checkpoints import CheckpointRef
    from polymap.extraction import extract_checkpoint
    from polymap.features.probe import ProbeSpec

    ref = CheckpointRef("r", 1000, str(path))
    first = CheckpointRef("r", 0, str(initial))
    started = time.perf_counter()
    row = extract_checkpoint(ref, name, "cpu", initial=first, probe=ProbeSpec(), final=ref)
    elapsed = time.perf_counter() - started
    assert row["status"] in ("ok", "warning"), row["error"]
    return elapsed


def shape_error(path: Path) -> list[str]:
    from polymap.checkpoints import TensorReader
    from polymap.features.shape import fit_student_t, ks_distances
    from polymap.roles import assign_role, detect_architecture

    lines = []
    with TensorReader(path) as reader:
        arch = detect_architecture(None, reader.names())
        for role in ("attn_qkv", "mlp_in"):
            parts = []
            for name in reader.names():
                r = assign_role(arch, name)
                if r.role == role and r.kind == "weight":
                    w = reader.get(name).double().reshape(-1)
                    parts.append(((w - w.mean()) / w.std()).numpy())
            full = np.concatenate(parts)
            rng = np.random.default_rng(0)
            big = full[rng.choice(full.size, 1_000_000, replace=False)]
            nus = [fit_student_t(full[rng.choice(full.size, 16384, replace=False)])[0]
                   for _ in range(5)]  # fmt: skip
            kss = [ks_distances(full[rng.choice(full.size, 16384, replace=False)])[0]
                   for _ in range(5)]  # fmt: skip
            lines.append(
                f"| {role} | {full.size:,} | {fit_student_t(big)[0]:.1f} | "
                f"{min(nus):.1f}-{max(nus):.1f} | {ks_distances(full)[0]:.4f} | "
                f"{min(kss):.4f}-{max(kss):.4f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="160m", choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "polymap-feat"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    initial, path = build(args.size, Path(args.workdir))
    time_set("hu2023", path, initial)  # warm caches and imports
    time_set("activations", path, initial)
    times: dict[str, list[float]] = {"read": [], "model": [], **{s: [] for s in SETS}}
    cold = False
    for _ in range(args.repeats):
        cold = drop_page_cache()
        times["read"].append(time_read(path))
        drop_page_cache()
        times["model"].append(time_read(path) + time_model(path))
        for name in SETS:
            drop_page_cache()
            times[name].append(time_set(name, path, initial))
    med = {k: statistics.median(v) for k, v in times.items()}
    cache = "cold page cache (dropped before each)" if cold else "warm page cache"
    print(f"Pythia-{args.size}-shaped fp32 checkpoint, {os.cpu_count()} threads, "
          f"torch {torch.__version__}, median of {args.repeats}, {cache}")  # fmt: skip
    print("| what | median s | added over its load (s) | added / load |")
    print("|---|---|---|---|")
    print(f"| load: read every tensor | {med['read']:.2f} | | |")
    print(f"| load: read + build the transformers model | {med['model']:.2f} | | |")
    for name in SETS:
        from polymap.features import feature_sets

        model_level = feature_sets()[name].needs_model
        load = med["model"] if model_level else med["read"]
        added = med[name] - load
        print(f"| {name}{' (model-level)' if model_level else ''} | {med[name]:.2f} | "
              f"{added:.2f} | {added / load:.2f}x |")  # fmt: skip
    print()
    print("shape subsample (16,384 entries per role, 5 draws) against a 1M-entry fit (nu)")
    print("and every entry (KS):")
    print("| role | entries | nu, 1M entries | nu, 16k (5 draws) | KS gauss, all | KS, 16k |")
    print("|---|---|---|---|---|---|")
    for line in shape_error(path):
        print(line)


if __name__ == "__main__":
    main()
