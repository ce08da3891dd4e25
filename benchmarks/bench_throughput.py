"""Extraction throughput per executor, side by side in one run.

Workloads:

- ``suite``: a ``polymap suite`` (nano, 2 seeds x 36 checkpoints: small models, where
  per-checkpoint overhead dominates);
- ``pythia``: Pythia-shaped random GPT-NeoX checkpoints (default 14M shape, hidden 128,
  6 layers, vocab 50,304, fp32 safetensors), several steps of one run.

Executors: ``local`` (one process: the baseline), ``process`` with 1 and 2 workers, and
``ray`` on a local cluster of 2 CPUs (``ray.init(num_cpus=2)``), each extracting the same
checkpoints into a fresh table with the default feature sets. Reported: median wall time
over ``--repeats``, checkpoints per minute, GB/s of weights read, speed-up over local.

    .venv/bin/python benchmarks/bench_throughput.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import polymap
from polymap.checkpoints import resolve_sources


def build_suite(root: Path) -> Path:
    from polymap.suite import build

    out = root / "suite"
    build(out, sizes="nano", seeds="0-1", steps=400, unstable="", progress=False)
    return out


def build_pythia(root: Path, n: int, hidden: int, layers: int) -> Path:
    from transformers import GPTNeoXForCausalLM

    from polymap.synthetic import pythia_config

    run = root / "pythia" / "run0"
    for i in range(n):
        path = run / f"step{1000 * i}"
        if (path / "model.safetensors").exists():
            continue
        torch.manual_seed(i)
        config = pythia_config(hidden, layers, max(1, hidden // 64), 50304, 2048)
        GPTNeoXForCausalLM(config).save_pretrained(path)
    return run.parent


def weight_bytes(source: Path) -> int:
    total = 0
    for ref in resolve_sources([source]):
        total += sum(p.stat().st_size for p in Path(ref.location).glob("*.safetensors"))
    return total


def time_one(source: Path, executor: str, jobs: int, workdir: Path) -> float:
    out = workdir / f"t-{executor}-{jobs}-{time.monotonic_ns()}.parquet"
    started = time.perf_counter()
    table = polymap.extract(source, out=out, executor=executor, jobs=jobs, device="cpu",
                            progress=False)  # fmt: skip
    elapsed = time.perf_counter() - started
    assert (table["status"] == "ok").all(), table["error"].dropna().tolist()[:3]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pythia-checkpoints", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "polymap-tput"))
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    workloads = {
        "suite": build_suite(root),
        "pythia": build_pythia(root, args.pythia_checkpoints, args.hidden, args.layers),
    }
    configs = [("local", 1), ("process", 1), ("process", 2)]
    if not args.no_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        configs.append(("ray", 2))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}")  # fmt: skip
    print("| workload | checkpoints | GB | executor | workers | median s | ckpt/min | GB/s "
          "| vs local |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, source in workloads.items():
        n = len(resolve_sources([source]))
        gb = weight_bytes(source) / 1e9
        times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
        for _ in range(args.repeats):  # interleaved, so drift hits every executor alike
            for executor, jobs in configs:
                times[(executor, jobs)].append(time_one(source, executor, jobs, root))
        base = statistics.median(times[("local", 1)])
        for (executor, jobs), values in times.items():
            med = statistics.median(values)
            print(f"| {name} | {n} | {gb:.2f} | {executor} | {jobs} | {med:.1f} | "
                  f"{60 * n / med:.0f} | {gb / med:.3f} | {base / med:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
