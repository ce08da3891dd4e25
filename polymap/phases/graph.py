"""The training map: states and transitions of a fitted PhaseModel, and ``describe``.

``graph.json`` schema::

    {"n_states", "reason", "checkpoint_order", "features",
     "prune_below": 0.01, "detour_fraction": 0.5,
     "states": [{"id", "occupancy", "n_checkpoints", "n_runs", "run_fraction",
                 "entry_step_median", "step_range": [min, max], "self_probability",
                 "detour", "profile": {feature: mean value in original units}}],
     "transitions": [{"source", "target", "probability", "count",
                      "top_features": [{"feature", "change", "direction"}]}],
     "detour_states": [ids]}

- occupancy: share of all checkpoints decoded (Viterbi) in the state;
- transitions between different states are kept when their probability is at least
  ``prune_below`` or they were observed in a decoded path; staying is ``self_probability``;
- ``top_features``: the five features whose state means differ most (in scaled units),
  with the direction of the change from source to target;
- a *detour* state is one visited by fewer than half of the runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

PRUNE_BELOW = 0.01
DETOUR_FRACTION = 0.5
TOP_FEATURES = 5


STATE_KEYS = ("id", "occupancy", "n_runs", "entry_step_median", "step_range",
              "self_probability", "detour")  # fmt: skip
TRANSITION_KEYS = ("source", "target", "probability", "count", "top_features")


def read_graph(directory: str | Path, n_states: int | None = None) -> dict:
    """A MODEL_DIR's ``graph.json``, checked against the schema above (and ``n_states``);
    a missing or malformed one is a :class:`PhaseInputError` naming the file and field."""
    from polymap.phases.preprocess import PhaseInputError

    path = Path(directory) / "graph.json"

    def fail(reason: str):
        raise PhaseInputError(f"{path}: {reason}; refit with `polymap fit`")

    if not path.exists():
        fail("missing")
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        fail(f"unreadable ({type(err).__name__}: {err})")
    if not isinstance(graph, dict):
        fail(f"holds a {type(graph).__name__}, not an object")
    for key, kind in (("n_states", int), ("reason", str), ("features", list), ("states", list),
                      ("transitions", list), ("detour_states", list)):  # fmt: skip
        if not isinstance(graph.get(key), kind) or isinstance(graph.get(key), bool):
            fail(f"{key!r} is missing or not a {kind.__name__}")
    if not isinstance(graph.get("prune_below"), (int, float)):
        fail("'prune_below' is missing or not a number")
    if n_states is not None and (graph["n_states"] != n_states or len(graph["states"]) != n_states):
        listed = len(graph["states"])
        fail(f"describes {graph['n_states']} state(s) ({listed} listed); the model has {n_states}")
    for what, items, keys in (("states", graph["states"], STATE_KEYS),
                              ("transitions", graph["transitions"], TRANSITION_KEYS)):  # fmt: skip
        for i, item in enumerate(items):
            missing = [k for k in keys if not isinstance(item, dict) or k not in item]
            if missing:
                fail(f"{what}[{i}] lacks {missing}")
    return graph


def read_paths(directory: str | Path) -> pd.DataFrame:
    """A MODEL_DIR's ``paths.csv`` (``run, step, state``), checked."""
    from polymap.phases.preprocess import PhaseInputError

    path = Path(directory) / "paths.csv"
    if not path.exists():
        raise PhaseInputError(f"{path}: missing; refit with `polymap fit`")
    try:
        paths = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise PhaseInputError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    missing = [c for c in ("run", "step", "state") if c not in paths.columns]
    if missing:
        raise PhaseInputError(f"{path}: lacks column(s) {missing}; refit with `polymap fit`")
    for column in ("step", "state"):
        if not pd.api.types.is_integer_dtype(paths[column]):
            raise PhaseInputError(f"{path}: column {column!r} is not whole numbers")
    paths["run"] = paths["run"].astype(str)
    return paths


def training_map(model, table: pd.DataFrame, paths: pd.DataFrame | None = None) -> dict:
    """The training map of ``model`` on ``table`` (usually its training table)."""
    from polymap.phases.preprocess import usable_rows

    table = usable_rows(table)
    if paths is None:
        paths = model.decode(table)
    k = model.n_states_
    features = model.preprocessor_.features
    merged = paths.merge(table[["run", "step", *features]], on=["run", "step"], how="left")
    n_runs = paths["run"].nunique()
    states = []
    for s in range(k):
        rows = merged[merged["state"] == s]
        visiting = rows["run"].unique()
        entries = [grp["step"].min() for _, grp in rows.groupby("run")]
        states.append(
            {
                "id": s,
                "occupancy": len(rows) / max(1, len(merged)),
                "n_checkpoints": int(len(rows)),
                "n_runs": int(len(visiting)),
                "run_fraction": len(visiting) / max(1, n_runs),
                "entry_step_median": float(np.median(entries)) if entries else None,
                "step_range": [int(rows["step"].min()), int(rows["step"].max())]
                if len(rows)
                else None,
                "self_probability": float(model.hmm_.transmat_[s, s]),
                "detour": 0 < len(visiting) < DETOUR_FRACTION * n_runs,
                "profile": {f: _num(rows[f].mean()) for f in features} if len(rows) else {},
            }
        )
    counts = np.zeros((k, k), dtype=int)
    for _, grp in paths.groupby("run", sort=False):
        seq = grp["state"].to_numpy()
        for a, b in zip(seq[:-1], seq[1:], strict=True):
            counts[a, b] += 1
    means = model.hmm_.means_
    transitions = []
    for a in range(k):
        for b in range(k):
            p = float(model.hmm_.transmat_[a, b])
            if a == b or (p < PRUNE_BELOW and counts[a, b] == 0):
                continue
            change = means[b] - means[a]
            order = np.argsort(-np.abs(change))[:TOP_FEATURES]
            transitions.append(
                {
                    "source": a,
                    "target": b,
                    "probability": p,
                    "count": int(counts[a, b]),
                    "top_features": [
                        {
                            "feature": features[i],
                            "change": float(change[i]),
                            "direction": "up" if change[i] > 0 else "down",
                        }
                        for i in order
                    ],
                }
            )
    return {
        "n_states": k,
        "reason": model.reason_,
        "checkpoint_order": "transitions are between consecutive checkpoints of a run, "
        "whatever their spacing in steps",
        "features": features,
        "prune_below": PRUNE_BELOW,
        "detour_fraction": DETOUR_FRACTION,
        "states": states,
        "transitions": transitions,
        "detour_states": [s["id"] for s in states if s["detour"]],
    }


def _num(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def write_model_dir(model, table: pd.DataFrame, directory: str | Path) -> Path:
    """Save the model and its products: ``model.json``, ``arrays.npz``, ``selection.csv``,
    ``paths.csv``, ``posteriors.parquet``, ``graph.json`` and ``table.parquet`` (the
    training table, which ``polymap export`` draws metrics and features from)."""
    from polymap.phases.io import save_model
    from polymap.table import write_table

    directory = Path(directory)
    save_model(model, directory)
    write_table(table, directory / "table.parquet")
    paths = model.decode(table)
    paths.to_csv(directory / "paths.csv", index=False)
    model.posteriors(table).to_parquet(directory / "posteriors.parquet", index=False)
    graph = training_map(model, table, paths)
    (directory / "graph.json").write_text(json.dumps(graph, indent=1))
    return directory


def fit_model_dir(
    table: pd.DataFrame, directory: str | Path, group_by: str | None = None, **params
) -> dict:
    """Fit and write a model directory; with ``group_by``, one model per group value in
    ``directory/<value>/`` plus ``groups.json``. Returns ``{group: PhaseModel}``."""
    from polymap.phases.model import PhaseModel
    from polymap.phases.preprocess import PhaseInputError

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PhaseInputError(f"--out {directory} exists and is not a directory")
    if group_by is None:
        model = PhaseModel(**params).fit(table)
        write_model_dir(model, model.train_table_, directory)
        return {"": model}
    if group_by not in table.columns:
        raise PhaseInputError(f"--group-by {group_by!r}: no such column in the table")
    models = {}
    for value, part in table.groupby(group_by, dropna=False):
        name = str(value)
        model = PhaseModel(**params).fit(part)
        write_model_dir(model, model.train_table_, directory / name)
        models[name] = model
    (directory / "groups.json").write_text(
        json.dumps({"group_by": group_by, "groups": list(models)}, indent=1)
    )
    return models


def describe(directory: str | Path) -> str:
    """A readable account of a model directory: chosen K and why, the states, when runs
    enter them, transitions and detours."""
    from polymap.phases.io import read_model_files, read_selection

    directory = Path(directory)
    groups = directory / "groups.json"
    if groups.exists():
        spec = json.loads(groups.read_text())
        return "\n\n".join(
            f"== {spec['group_by']} = {g} ==\n" + describe(directory / g) for g in spec["groups"]
        )

    # the checked files, not a PhaseModel: no scikit-learn or hmmlearn to import
    meta, _ = read_model_files(directory)
    k = meta["n_states"]
    graph = read_graph(directory, k)
    lines = [
        f"Training map: {graph['n_states']} states over "
        f"{len(meta['train_runs'])} run(s), {len(graph['features'])} feature(s) "
        f"(scale: {meta['preprocessing']['scale']}, covariance: {meta['covariance']}).",
        f"Why K={graph['n_states']}: {graph['reason']}.",
    ]
    sel = read_selection(directory / "selection.csv")
    k_likelihood = meta.get("n_states_likelihood", k)
    k_likelihood = k_likelihood if isinstance(k_likelihood, int) else k
    noise = "noise_separation" in sel.columns and sel["noise_separation"].notna().any()
    if noise or k_likelihood != k:
        lines.append(
            f"K with the measurement-noise rule: {k}; by held-out likelihood alone: {k_likelihood}."
        )
    if not sel.empty:
        lines.append("Model selection (best restart per K):")
        header = "    K   heldout_ll/ckpt   train_ll/ckpt        BIC  converged  degenerate"
        lines.append(header + ("   closest pair (SE)" if noise else ""))
        for kk, grp in sel.groupby("k"):
            ok = grp[~grp["degenerate"]]
            best = (
                ok.loc[ok["heldout_ll"].idxmax()]
                if ok["heldout_ll"].notna().any()
                else (ok.iloc[0] if len(ok) else grp.iloc[0])
            )
            mark = " <- chosen" if grp["chosen"].any() else ""
            if kk == k_likelihood and kk != k:
                mark = " <- likelihood's choice"
            separation = ""
            if noise:
                value = grp["noise_separation"].dropna()
                separation = f"   {value.iloc[0]:>17.1f}" if len(value) else " " * 20
            lines.append(
                f"  {kk:>3}   {best['heldout_ll']:>15.3f}   {best['train_ll']:>13.3f}"
                f"   {best['bic']:>8.0f}   {int(grp['converged'].sum())}/{len(grp)}"
                f"        {int(grp['degenerate'].sum())}{separation}{mark}"
            )
    lines.append("States (Viterbi decoding; the HMM is over checkpoint order, not step distance):")
    for s in graph["states"]:
        rng = s["step_range"] or ["-", "-"]
        tag = "  DETOUR" if s["detour"] else ""
        lines.append(
            f"  state {s['id']}: {100 * s['occupancy']:.0f}% of checkpoints, "
            f"{s['n_runs']} run(s), entered at step ~{s['entry_step_median']}, "
            f"steps {rng[0]}-{rng[1]}, stays with p={s['self_probability']:.2f}{tag}"
        )
    lines.append(f"Transitions (probability >= {graph['prune_below']} or observed):")
    for t in graph["transitions"]:
        top = ", ".join(
            f"{f['feature']} {'+' if f['change'] > 0 else ''}{f['change']:.2f}"
            for f in t["top_features"][:3]
        )
        lines.append(
            f"  {t['source']} -> {t['target']}: p={t['probability']:.2f}, seen {t['count']}x; {top}"
        )
    if graph["detour_states"]:
        lines.append(f"Detour states (visited by < half the runs): {graph['detour_states']}")
    return "\n".join(lines)
