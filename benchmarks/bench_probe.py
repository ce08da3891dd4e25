"""How many probe tokens ``evals_native``'s loss needs: the probe loss at 8 and 64 rows of
128 tokens, against the suite's own validation loss (128 rows), as a detector of the
zoo's data-repeat runs.

Re-extracts only ``evals_native`` of the 12 healthy runs of every zoo case and the
planted runs of the ``data_repeat`` cases (the zoo of ``bench_scorer.py``, which must be
built first), once per probe size, into ``benchmarks/out/probe/``; prints the AUROC of
each loss for "measured unstable" at 10%, 25% and 50% of training.

    python benchmarks/bench_probe.py            # ~2 min on 2 cores
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    import bench_scorer as zoo
    from sklearn.metrics import roc_auc_score

    from polymap.extraction import extract
    from polymap.features.probe import ProbeSpec

    root = sorted((HERE / "out").glob("zoo-*"))[-1]
    cfg = json.loads((root / "config.json").read_text())
    out = HERE / "out" / "probe"
    cases = [(d, s) for d, s in zoo.cases(cfg) if d == "data_repeat"]
    healthy = [root / "healthy" / f"{zoo.SIZE}-seed{s}" for s in range(zoo.HEALTHY_IN_CASE)]
    rows = []
    for rows_of_128 in (8, 64):
        spec = ProbeSpec(sequences=8, eval_sequences=rows_of_128)
        tables = {"healthy": out / f"healthy-{rows_of_128}.parquet"}
        extract(healthy, out=tables["healthy"], features="evals_native", jobs=2,
                executor="process", probe=spec, progress=False)  # fmt: skip
        for defect, strength in cases:
            name = zoo.case_name(defect, strength)
            tables[name] = out / f"{name}-{rows_of_128}.parquet"
            extract(root / "cases" / name, out=tables[name], features="evals_native", jobs=2,
                    executor="process", probe=spec, progress=False)  # fmt: skip
        for defect, strength in cases:
            name = zoo.case_name(defect, strength)
            _, logs, labels = zoo.load_case(root, cfg, defect, strength)
            probe = pd.concat([pd.read_parquet(tables["healthy"]), pd.read_parquet(tables[name])])
            y = labels.set_index("run")["unstable"]
            for horizon in (0.1, 0.25, 0.5):
                cut = int(horizon * zoo.STEPS)
                for what, frame, column in (
                    (f"probe loss, {rows_of_128 * 128} tokens", probe, "evals_native.loss"),
                    ("validation loss (suite, 128 x seq_len)", logs, "val_loss"),
                ):
                    value = zoo._at_horizon(frame, column, cut)
                    auroc = roc_auc_score(y.loc[value.index], value)
                    rows.append({"case": name, "horizon": horizon, "loss": what, "auroc": auroc})
    table = pd.DataFrame(rows).drop_duplicates(["case", "horizon", "loss"])
    print(table.pivot_table(index=["case", "horizon"], columns="loss", values="auroc").round(2)
          .to_markdown())  # fmt: skip
    print(cost(healthy[0] / "step400"))
    return 0


def cost(checkpoint: Path, repeats: int = 7) -> str:
    """Median seconds of one checkpoint's extraction, ``evals_native`` alone and with the
    default sets, at both probe sizes (same process, interleaved)."""
    import statistics
    import time

    from polymap.checkpoints import CheckpointRef
    from polymap.extraction import extract_checkpoint
    from polymap.features.probe import ProbeSpec

    ref = CheckpointRef("r", 400, str(checkpoint))
    lines = ["| feature sets | 1,024 tokens (s) | 8,192 tokens (s) | ratio |", "|---|---|---|---|"]
    for sets in ("evals_native", "hu2023,weights,spectral,evals_native"):
        times = {8: [], 64: []}
        for _ in range(repeats):
            for rows_of_128 in (8, 64):
                spec = ProbeSpec(sequences=8, eval_sequences=rows_of_128)
                start = time.perf_counter()
                extract_checkpoint(ref, sets, "cpu", probe=spec)
                times[rows_of_128].append(time.perf_counter() - start)
        small, large = statistics.median(times[8]), statistics.median(times[64])
        lines.append(f"| {sets} | {small:.3f} | {large:.3f} | {large / small:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
