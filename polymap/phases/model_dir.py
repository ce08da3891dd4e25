"""A MODEL_DIR: what ``polymap fit`` writes, and reading it back.

Layout (one model; ``fit --group-by`` writes one per group value plus ``groups.json``)::

    model.json, arrays.npz      the PhaseModel (polymap.phases.io; JSON last = committed)
    selection.csv               model selection per K and restart
    graph.json                  the training map (polymap.phases.graph)
    paths.csv                   each checkpoint's Viterbi state
    posteriors.parquet          each checkpoint's state probabilities
    table.parquet               the training table (what export draws from)
    scorer.json, scorer.npz     the saved RiskScorer (polymap.scoring.scorer)

Every file is written atomically (:mod:`polymap.atomic`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from polymap.atomic import write_csv, write_json, write_parquet
from polymap.checkpoints.ref import RefError, check_run
from polymap.phases.graph import STATE_KEYS, TRANSITION_KEYS, training_map
from polymap.table import as_table


def read_graph(directory: str | Path, n_states: int | None = None) -> dict:
    """A MODEL_DIR's ``graph.json``, checked against the schema of
    :mod:`polymap.phases.graph` (and ``n_states``); a missing or malformed one is a
    :class:`PhaseInputError` naming the file and field."""
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
    write_csv(paths, directory / "paths.csv")
    write_parquet(model.posteriors(table), directory / "posteriors.parquet")
    write_json(directory / "graph.json", training_map(model, table, paths))
    return directory


GROUPS_JSON = "groups.json"


def group_dir(directory: str | Path, value) -> Path:
    """The folder of one ``--group-by`` value inside ``directory``: the value must be
    usable as one folder name (the rule run names follow, :func:`check_run`), so a value
    such as ``/abs/path`` or ``../x`` - a ``model`` column comes from tables and manifests
    a user did not write - is an error, never a write outside ``--out``.

    >>> group_dir("out", "pythia-160m").as_posix()
    'out/pythia-160m'
    >>> group_dir("out", "../x")
    Traceback (most recent call last):
    polymap.phases.preprocess.PhaseInputError: group value '../x': contains a path separator or '..'
    """
    from polymap.phases.preprocess import PhaseInputError

    try:
        name = check_run(str(value), where="group value")
    except RefError as err:
        raise PhaseInputError(str(err)) from None
    return Path(directory) / name


def read_groups(directory: str | Path) -> dict | None:
    """A grouped MODEL_DIR's ``groups.json`` (``{"group_by": str, "groups": [str]}``),
    checked: its group names are folder names inside ``directory``; None when the
    directory is not grouped."""
    from polymap.phases.preprocess import PhaseInputError

    path = Path(directory) / GROUPS_JSON
    if not path.exists():
        return None
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as err:
        raise PhaseInputError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    ok = (
        isinstance(spec, dict)
        and isinstance(spec.get("group_by"), str)
        and isinstance(spec.get("groups"), list)
        and all(isinstance(g, str) for g in spec["groups"])
    )
    if not ok:
        raise PhaseInputError(f'{path}: expected {{"group_by": str, "groups": [str, ...]}}')
    for group in spec["groups"]:
        try:
            group_dir(directory, group)
        except PhaseInputError as err:
            raise PhaseInputError(f"{path}: {err}") from None
    return spec


def fit_model_dir(
    table: pd.DataFrame | str | Path, directory: str | Path, group_by: str | None = None, **params
) -> dict:
    """Fit and write a model directory; with ``group_by``, one model per group value in
    ``directory/<value>/`` plus ``groups.json``. Returns ``{group: PhaseModel}``."""
    from polymap.phases.model import PhaseModel
    from polymap.phases.preprocess import PhaseInputError

    table = as_table(table)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PhaseInputError(f"--out {directory} exists and is not a directory")
    if group_by is None:
        model = PhaseModel(**params).fit(table)
        write_model_dir(model, model.train_table_, directory)
        return {"": model}
    if group_by not in table.columns:
        raise PhaseInputError(f"--group-by {group_by!r}: no such column in the table")
    parts = list(table.groupby(group_by, dropna=False))
    folders = [group_dir(directory, value) for value, _ in parts]  # all checked before any fit
    models = {}
    for (_, part), folder in zip(parts, folders, strict=True):
        model = PhaseModel(**params).fit(part)
        write_model_dir(model, model.train_table_, folder)
        models[folder.name] = model
    write_json(directory / GROUPS_JSON, {"group_by": group_by, "groups": list(models)})
    return models


def describe(directory: str | Path) -> str:
    """A readable account of a model directory: chosen K and why, the states, when runs
    enter them, transitions and detours."""
    from polymap.phases.io import read_model_files, read_selection

    directory = Path(directory)
    spec = read_groups(directory)
    if spec is not None:
        return "\n\n".join(
            f"== {spec['group_by']} = {g} ==\n" + describe(group_dir(directory, g))
            for g in spec["groups"]
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
