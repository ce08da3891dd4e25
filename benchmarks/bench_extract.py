"""hu2023 and full-default extraction against the literal two-SVD baseline, side by side.

Builds a Pythia-shaped GPT-NeoX checkpoint (random init, fp32 safetensors), then times,
each in a fresh subprocess so peak RSS is measured per method:

- ``baseline``: the published procedure written literally: the whole state dict loaded,
  per weight matrix ``torch.linalg.matrix_norm(ord=2)`` plus ``torch.svd`` (two full
  SVDs), medians over the concatenated weights;
- ``polymap hu2023``: ``extract_checkpoint(..., "hu2023")``;
- ``floor``: read every tensor and do one float64 Gram product per 2-D matrix (the least
  any exact spectral method must do);
- ``polymap default``: hu2023 + weights + spectral.

Usage::

    python benchmarks/bench_extract.py [--size 160m|70m|14m] [--repeats 3]

Each method runs once untimed and once timed in its subprocess: the steady-state cost
per checkpoint of a sweep (one-time costs such as thread-pool start-up and BLAS
initialisation are paid once per sweep; ``BENCH_WARMUP=0`` times the cold first call).
Prints a Markdown table (median seconds, ratios, peak RSS above the interpreter's) and the
largest relative difference of any hu2023 value from the literal procedure run in
float64.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # Pythia shapes (hidden, layers, heads)
    "14m": (128, 6, 4),
    "70m": (512, 6, 8),
    "160m": (768, 12, 12),
    "410m": (1024, 24, 16),
}


def build(size: str, directory: Path) -> Path:
    import torch
    from transformers import GPTNeoXForCausalLM

    from polymap.synthetic import pythia_config

    hidden, layers, heads = SIZES[size]
    path = directory / f"pythia-{size}-shaped"
    if (path / "model.safetensors").exists():
        return path
    torch.manual_seed(0)
    config = pythia_config(hidden, layers, heads, 50304, 2048)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    return path


def baseline(path: Path, dtype=None) -> dict:
    """The published procedure, literally (in the checkpoint's dtype, or ``dtype``)."""
    import torch
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    keys = ["l1", "l2", "l1_l2", "trace", "lambda_max", "trace_lambda", "mu_lambda", "sigma_lambda"]
    sums = dict.fromkeys(keys, 0.0)
    n = 0
    weights, biases = [], []
    for name, p in state.items():
        if name.startswith("embed") or "norm" in name.lower():
            continue
        if name.endswith("weight"):
            w = p.view(p.shape[0], -1)
            l1, l2 = w.abs().sum().item(), torch.linalg.norm(w).item()
            lam = torch.linalg.matrix_norm(w, ord=2).item()
            s = torch.svd(w).S
            s[s < 1e-5] = 0
            tr = torch.trace(w).item()
            vals = [l1, l2, l1 / l2, tr, lam, tr / lam, s.mean().item(), s.var().item()]
            for k, v in zip(keys, vals, strict=True):
                sums[k] += v
            n += 1
            weights.append(w.flatten())
        elif name.endswith("bias"):
            biases.append(p.flatten())
    out = {f"hu2023.{k}": v / n for k, v in sums.items()}
    for tag, parts in (("w", weights), ("b", biases)):
        cat = torch.cat(parts)
        out[f"hu2023.mu_{tag}"] = cat.mean().item()
        out[f"hu2023.median_{tag}"] = cat.median().item()
        out[f"hu2023.sigma_{tag}"] = cat.var().item()
    return out


def floor(path: Path) -> dict:

    from polymap.checkpoints import TensorReader

    with TensorReader(path) as reader:
        for name in reader.names():
            t = reader.get(name).float()
            if t.dim() == 2:
                tall = t if t.shape[0] >= t.shape[1] else t.T
                d = tall.double()
                (d.T @ d).sum()
    return {}


def polymap_sets(path: Path, sets: str) -> dict:
    from polymap import CheckpointRef, extract_checkpoint

    row = extract_checkpoint(CheckpointRef("bench", 0, str(path)), sets, "cpu")
    assert row["status"] == "ok", row["error"]
    return {k: v for k, v in row.items() if k.startswith("hu2023.")}


def reference64(path: Path) -> dict:
    import torch

    return baseline(path, torch.float64)


METHODS = {
    "reference64": reference64,
    "baseline": baseline,
    "floor": floor,
    "hu2023": lambda p: polymap_sets(p, "hu2023"),
    "default": lambda p: polymap_sets(p, "hu2023,weights,spectral"),
}


def child(method: str, path: str) -> None:
    import resource

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    import polymap  # noqa: F401  (import cost outside the timed region)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if os.environ.get("BENCH_WARMUP", "1") == "1":  # steady state, as in a sweep
        METHODS[method](Path(path))
    start = time.perf_counter()
    values = METHODS[method](Path(path))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"seconds": seconds, "rss0_mb": rss0 / 1024, "peak_mb": peak / 1024, "values": values}
        )
    )


def run_child(method: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="160m", choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "polymap-bench"))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    path = build(args.size, Path(args.workdir))
    size_mb = (path / "model.safetensors").stat().st_size / 2**20
    with open(path / "model.safetensors", "rb") as fh:  # header: largest tensor
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    largest = (
        max(
            v["data_offsets"][1] - v["data_offsets"][0]
            for k, v in header.items()
            if k != "__metadata__"
        )
        / 2**20
    )
    truth = run_child("reference64", path)["values"]  # accuracy only, untimed
    timed = [m for m in METHODS if m != "reference64"]
    results: dict[str, list[dict]] = {m: [] for m in timed}
    for _ in range(args.repeats):  # interleaved, so drift hits every method alike
        for method in timed:
            results[method].append(run_child(method, path))
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in results.items()}

    def worst(method: str) -> tuple[float, str]:
        values = results[method][0]["values"]
        return max(
            (abs(values[k] - ref) / abs(ref) if ref else abs(values[k]), k)
            for k, ref in truth.items()
        )

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
        f"torch threads {os.environ.get('BENCH_THREADS', os.cpu_count())}"
    )
    print(
        f"checkpoint: Pythia-{args.size}-shaped GPT-NeoX, fp32 safetensors, "
        f"{size_mb:.0f} MiB, largest tensor {largest:.0f} MiB; repeats {args.repeats}\n"
    )
    print("| method | median s | vs baseline | vs floor | peak RSS - baseline RSS (MiB) |")
    print("|---|---|---|---|---|")
    for method, label in (
        ("baseline", "baseline: literal two-SVD hu2023"),
        ("hu2023", "polymap hu2023"),
        ("floor", "floor: read + one f64 Gram per matrix"),
        ("default", "polymap hu2023+weights+spectral"),
    ):
        extra = statistics.median(r["peak_mb"] - r["rss0_mb"] for r in results[method])
        print(
            f"| {label} | {med[method]:.2f} | {med['baseline'] / med[method]:.1f}x faster | "
            f"{med[method] / med['floor']:.2f}x | {extra:.0f} |"
        )
    print(
        "\nlargest relative difference of any hu2023 value from the literal procedure in float64:"
    )
    for method in ("hu2023", "default", "baseline"):
        rel, key = worst(method)
        print(f"- {method}: {rel:.1e} ({key})")


if __name__ == "__main__":
    main()
