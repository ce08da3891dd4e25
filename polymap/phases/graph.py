"""The training map: states and transitions of a fitted PhaseModel.

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

import numpy as np
import pandas as pd

PRUNE_BELOW = 0.01
DETOUR_FRACTION = 0.5
TOP_FEATURES = 5


STATE_KEYS = ("id", "occupancy", "n_runs", "entry_step_median", "step_range",
              "self_probability", "detour")  # fmt: skip
TRANSITION_KEYS = ("source", "target", "probability", "count", "top_features")


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
