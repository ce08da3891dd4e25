"""The export's pictures, each a function of :class:`~polymap.export.inputs.ExportInputs`.

- ``timelines``: one row per run, its decoded state as coloured bands over steps (sqrt or
  log step axis), the chosen metric overlaid; flagged runs (from the scores) are grouped
  at the top, unstable runs (from the labels) marked;
- ``selection``: :func:`plot_selection` - held-out log-likelihood, its paired difference
  to the best K with one standard error (the rule), BIC; the chosen K and why;
- ``features``: the features that best separate the states (largest between-state
  variance ratio in scaled units), per run over steps, points coloured by state;
- ``risk``: runs ranked by evidence with their signal z-scores, labels marked;
- ``fingerprint``: :func:`plot_fingerprint` - each state's mean per distinguishing
  feature (a heat map).

Every figure has a fixed size (``figsize`` x ``DPI`` pixels) so files are predictable.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from polymap.atomic import atomic_file
from polymap.export.graphs import DPI, state_colors
from polymap.export.inputs import ExportInputs

N_TOP_FEATURES = 4


def save(fig, paths: list[Path]) -> list[Path]:
    for path in paths:
        with atomic_file(path) as tmp:
            fig.savefig(tmp)
    return paths


def _saved(fig, paths: list[Path] | None):
    """Write ``fig`` to ``paths`` (if any) and return it."""
    save(fig, paths or [])
    return fig


METRIC_PANEL = 2.4  # inches of the timelines' metric panel


def _with_metric(inputs: ExportInputs) -> bool:
    return bool(inputs.metric) and inputs.metric in inputs.table.columns


def figure_size(name: str, inputs: ExportInputs) -> tuple[float, float]:
    """Inches of each figure (pixels = inches x DPI)."""
    n_runs = len(inputs.runs)
    return {
        "timelines": (
            11.0,
            1.2
            + 0.42 * (n_runs + (1 if inputs.flagged else 0))
            + (METRIC_PANEL if _with_metric(inputs) else 0),
        ),
        "selection": (11.0, 3.4),
        "features": (11.0, 2.6 * ((N_TOP_FEATURES + 1) // 2)),
        "risk": (9.0, 1.3 + 0.34 * max(1, n_runs)),
    }[name]


def run_order(inputs: ExportInputs) -> list[str]:
    """Flagged runs first (by decreasing risk), then the others by name."""
    if inputs.scores is None:
        return inputs.runs
    risk = inputs.scores.set_index("run")["risk"]
    flagged = sorted(inputs.flagged, key=lambda r: -float(risk.get(r, 0)))
    return flagged + [r for r in inputs.runs if r not in inputs.flagged]


def _events(inputs: ExportInputs, column: str, frame) -> dict[str, float]:
    """run -> step of ``column`` (``onset_step`` of the labels, ``first_flag_step`` of
    the scores) where it is set."""
    if frame is None or column not in frame.columns:
        return {}
    values = frame.set_index(frame["run"].astype(str))[column]
    return {r: float(v) for r, v in values.items() if not pd.isna(v)}


def _step_transform(step_scale: str):
    if step_scale == "sqrt":
        return np.sqrt
    if step_scale == "log":
        return lambda s: np.log10(1 + np.asarray(s, dtype=float))
    if step_scale == "linear":
        return lambda s: np.asarray(s, dtype=float)
    raise ValueError(f"step_scale={step_scale!r}: choose sqrt, log or linear")


def timelines(inputs: ExportInputs, paths: list[Path] | None = None, step_scale: str = "sqrt",
              normalize: bool = False, fig=None):  # fmt: skip
    """States as coloured bands per run; below, the metric on its own real axis (one line
    per run: flagged runs red, the rest grey; ``normalize``: each run's metric scaled to
    0..1 over its own range); labelled onsets (black bar on the bands, dot on the metric)
    and first flag steps (red triangle) marked on both. ``step_scale``: sqrt, log or
    linear. Draws into ``fig`` when given; returns the Figure (and writes ``paths``).

    >>> inputs = load_inputs("model/", scores="scores.csv", labels="labels.csv")  # doctest: +SKIP
    >>> timelines(inputs, fig=my_figure)                                          # doctest: +SKIP
    """
    k = inputs.graph["n_states"]
    colors = state_colors(k)
    order = run_order(inputs)
    metric = inputs.metric
    width, height = figure_size("timelines", inputs)
    with_metric = _with_metric(inputs)
    if fig is None:
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    if with_metric:
        ratios = [height - METRIC_PANEL, METRIC_PANEL]
        ax, ax_metric = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    else:
        ax, ax_metric = fig.subplots(), None
    forward = _step_transform(step_scale)
    onsets = _events(inputs, "onset_step", inputs.labels)
    flags = _events(inputs, "first_flag_step", inputs.scores)
    rows: list[str] = []
    ticks: list[int] = []
    y = 0
    for run in order:
        if inputs.flagged and rows and rows[-1] in inputs.flagged and run not in inputs.flagged:
            y += 1  # a gap between the flagged group and the rest
            ax.axhline(-(y - 0.5), color="0.6", lw=0.6, ls=":")
        path = inputs.paths[inputs.paths["run"] == run].sort_values("step")
        x = forward(path["step"].to_numpy(float))
        edges = np.concatenate([[x[0]], (x[:-1] + x[1:]) / 2, [x[-1]]])
        for i, state in enumerate(path["state"].to_numpy()):
            ax.add_patch(
                Rectangle(
                    (edges[i], -y - 0.4), edges[i + 1] - edges[i], 0.8,
                    color=colors[state], lw=0,
                )
            )  # fmt: skip
        if run in onsets:
            ax.plot([forward(onsets[run])] * 2, [-y - 0.45, -y + 0.45], color="black", lw=2.2)
        if run in flags:
            ax.plot(forward(flags[run]), -y + 0.55, marker="v", color="crimson", ms=7,
                    mec="white", mew=0.6, zorder=5)  # fmt: skip
        rows.append(run)
        ticks.append(-y)
        y += 1
    labels = []
    for run in rows:
        tag = " \u25b2" if run in inputs.flagged else ""
        tag += " (unstable)" if run in inputs.unstable else ""
        labels.append(run + tag)
    ax.set_yticks(ticks, labels, fontsize=8)
    all_steps = np.unique(inputs.paths["step"].to_numpy(float))
    ax.set_xlim(forward(all_steps.min()), forward(all_steps.max()))
    ax.set_ylim(min(ticks) - 0.6, 0.8)
    nice = [s for s in (0, 10, 100, 1000, 10_000, 100_000) if s <= all_steps.max()]
    nice = sorted(set(nice + [int(all_steps.max() // 2), int(all_steps.max())]))
    title = "State of each run over training"
    if onsets:
        title += "; black bar: labelled onset of instability"
    if flags:
        title += "; red \u25bc: first flag"
    if inputs.flagged:
        title += "; \u25b2 flagged runs on top"
    ax.set_title(title, fontsize=10)
    ax.legend(
        handles=[Patch(color=colors[s], label=f"state {s}") for s in range(k)],
        loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False,
    )  # fmt: skip
    bottom = ax
    if ax_metric is not None:
        table = inputs.table.copy()
        if normalize:  # each run on its own 0..1 scale: shapes, not levels
            grouped = table.groupby("run")[metric]
            low, high = grouped.transform("min"), grouped.transform("max")
            table[metric] = (table[metric] - low) / (high - low).where(high > low)
        values = table.set_index(["run", "step"])[metric]
        for run in reversed(order):  # flagged runs drawn last, on top
            grp = table[table["run"] == run].sort_values("step")
            red = run in inputs.flagged
            ax_metric.plot(forward(grp["step"].to_numpy(float)), grp[metric],
                           color="crimson" if red else "0.6", lw=1.3 if red else 0.8,
                           alpha=1.0 if red else 0.8, zorder=3 if red else 2)  # fmt: skip
            for steps, style in ((onsets, "o"), (flags, "v")):
                if run in steps:
                    at = values.get((run, steps[run]))
                    if at is None or not np.isfinite(at):
                        continue
                    ax_metric.plot(forward(steps[run]), at, marker=style, ms=6, zorder=4,
                                   color="black" if style == "o" else "crimson")  # fmt: skip
        # the y range of the last 90% of training: where a late rise is decided (the
        # first steps' fall runs off the top instead of flattening everything else)
        late = values[values.index.get_level_values("step") >= 0.1 * all_steps.max()]
        finite = late[np.isfinite(late)]
        if len(finite):
            lo, hi = np.nanpercentile(finite, [0.5, 99.5])
            pad = 0.08 * (hi - lo) if hi > lo else 1.0
            ax_metric.set_ylim(lo - pad, hi + pad)
        ax_metric.set_ylabel(metric + (" (per run, 0-1)" if normalize else ""), fontsize=8)
        ax_metric.tick_params(labelsize=8)
        ax_metric.set_title(f"{metric}, y axis fitted to the last 90% of training (red: flagged "
                            "runs; black dot: labelled onset; red \u25bc: first flag)",
                            fontsize=9)  # fmt: skip
        bottom = ax_metric
    bottom.set_xticks(forward(np.array(nice, float)), [str(s) for s in nice])
    bottom.set_xlabel(f"step ({step_scale} scale)")
    return _saved(fig, paths)


def plot_selection(selection: pd.DataFrame, chosen: int, k_likelihood: int | None = None,
                   fig=None):  # fmt: skip
    """How K was chosen, with the statistic ``describe`` prints
    (:func:`polymap.phases.selection.selection_statistic`): held-out log-likelihood per
    checkpoint of the best restart per K; its median paired difference to the best K with
    one robust standard error (the chosen K is the smallest whose bar reaches 0); BIC.
    ``k_likelihood``: the likelihood's K when the measurement-noise rule chose another.
    Draws into ``fig`` (a matplotlib Figure) when given; returns the Figure.

    >>> fig = plot_selection(model.selection_, model.n_states_)   # doctest: +SKIP
    """
    from polymap.phases.selection import selection_statistic

    if fig is None:
        fig = Figure(figsize=(11.0, 3.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 3)
    stats = selection_statistic(selection) if not selection.empty else pd.DataFrame()
    if stats.empty:
        for ax in axes:
            ax.text(0.5, 0.5, f"K={chosen} fixed (no selection)", ha="center", va="center")
            ax.axis("off")
        return fig
    k = stats["k"].to_numpy()
    top = int(stats.loc[stats["heldout_ll"].idxmax(), "k"])
    ax = axes[0]
    ax.plot(k, stats["heldout_ll"], "o-", color="0.25")
    ax.set_title("held-out log-lik. per checkpoint\n(best restart per K; higher better)",
                 fontsize=9)  # fmt: skip
    ax = axes[1]
    within = stats["within"].to_numpy(bool)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.errorbar(k[within], stats["diff"][within], yerr=stats["se"][within], fmt="o",
                color="#009E73", capsize=3, label="within 1 SE of the best")  # fmt: skip
    ax.errorbar(k[~within], stats["diff"][~within], yerr=stats["se"][~within], fmt="o",
                color="0.55", capsize=3, label="worse by > 1 SE")  # fmt: skip
    ax.set_title(f"paired difference to the best K ({top}), median over runs\n"
                 "+/- 1 robust SE: the smallest K reaching 0 is chosen", fontsize=9)  # fmt: skip
    ax.legend(fontsize=7, loc="lower right", frameon=False)
    ax = axes[2]
    sel = selection[~selection["degenerate"].astype(bool)]
    best = sel.loc[sel.groupby("k")["heldout_ll"].idxmax()].sort_values("k")
    ax.plot(best["k"], best["bic"], "o-", color="0.25")
    ax.set_title("BIC (lower better)", fontsize=9)
    for ax in axes:
        ax.axvline(chosen, color="crimson", lw=1.2, ls="-", alpha=0.6)
        if k_likelihood is not None and k_likelihood != chosen:
            ax.axvline(k_likelihood, color="0.4", lw=1.0, ls="--")
        ax.set_xlabel("K (states)")
        ax.set_xticks(sorted(k))
        ax.tick_params(labelsize=8)
    title = f"K={chosen} chosen (red line)"
    if k_likelihood is not None and k_likelihood != chosen:
        title += (f": the measurement-noise rule; held-out likelihood alone gives "
                  f"K={k_likelihood} (dashed)")  # fmt: skip
    else:
        title += f": the smallest K within one standard error of the best (K={top})"
    fig.suptitle(title, fontsize=10)
    return fig


def selection(inputs: ExportInputs, paths: list[Path] | None = None, fig=None):
    """:func:`plot_selection` of the inputs' model; returns the Figure."""
    model = inputs.model
    fig = plot_selection(
        model.selection_, inputs.graph["n_states"],
        getattr(model, "n_states_likelihood_", None), fig=fig,
    )  # fmt: skip
    return _saved(fig, paths)


def separating_features(inputs: ExportInputs, n: int = N_TOP_FEATURES) -> list[str]:
    """Features with the largest between-state / within-state variance ratio."""
    features = [f for f in inputs.graph.get("features", []) if f in inputs.table.columns]
    data = inputs.table.merge(inputs.paths, on=["run", "step"])
    ratios = {}
    for feature in features:
        x = data[feature].to_numpy(float)
        ok = np.isfinite(x)
        if ok.sum() < 3 or np.nanstd(x) == 0:
            continue
        groups = pd.Series(x[ok]).groupby(data["state"].to_numpy()[ok])
        within = float((groups.var(ddof=0) * groups.size()).sum() / ok.sum())
        between = float(np.nanvar(x[ok]) - within)
        ratios[feature] = between / max(within, 1e-12 * np.nanvar(x[ok]))
    return sorted(ratios, key=lambda f: -ratios[f])[:n]


def features_figure(inputs: ExportInputs, paths: list[Path] | None = None, fig=None):
    """The features that best separate the states, per run over steps, points coloured
    by state. Draws into ``fig`` when given; returns the Figure."""
    top = separating_features(inputs)
    colors = state_colors(inputs.graph["n_states"])
    rows = (N_TOP_FEATURES + 1) // 2
    if fig is None:
        fig = Figure(figsize=figure_size("features", inputs), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False)
    data = inputs.table.merge(inputs.paths, on=["run", "step"]).sort_values("step")
    for ax, feature in zip(axes.flat, top + [None] * (axes.size - len(top)), strict=True):
        if feature is None:
            ax.axis("off")
            continue
        for _, grp in data.groupby("run"):
            x = np.sqrt(grp["step"].to_numpy(float))
            ax.plot(x, grp[feature], color="0.8", lw=0.6, zorder=1)
            ax.scatter(x, grp[feature], c=[colors[s] for s in grp["state"]], s=7, zorder=2)
        ax.set_title(feature, fontsize=9)
        steps = data["step"].to_numpy(float)
        nice = [v for v in (0, 10, 100, 1000, 10_000, 100_000) if v <= steps.max()]
        nice = sorted(set(nice + [int(steps.max())]))
        ax.set_xticks(np.sqrt(np.array(nice, float)), [str(v) for v in nice])
        ax.set_xlabel("step (sqrt scale)", fontsize=8)
        ax.tick_params(labelsize=7)
    k = inputs.graph["n_states"]
    fig.legend(
        handles=[Patch(color=colors[s], label=f"state {s}") for s in range(k)],
        loc="outside right upper", fontsize=8, frameon=False,
    )  # fmt: skip
    fig.suptitle("Features that best separate the states (points coloured by state)", fontsize=10)
    return _saved(fig, paths)


def plot_fingerprint(graph: dict, features: list[str] | None = None, n: int = 8, ax=None):
    """What distinguishes the states at a glance: each state's mean of the ``n`` features
    whose state means differ most (``features`` to choose), standardised per feature
    across the states (colour: -2 .. +2 SDs of the state means; diverging, colour-blind
    safe), the mean in the feature's own units written in each cell. ``graph``: a
    MODEL_DIR's ``graph.json``. Draws into ``ax`` when given; returns the Figure.

    >>> fig = plot_fingerprint(json.load(open("model/graph.json")))   # doctest: +SKIP
    """
    states = graph["states"]
    profiles = pd.DataFrame([s.get("profile", {}) for s in states], index=[s["id"] for s in states])
    profiles = profiles.apply(pd.to_numeric, errors="coerce")
    spread = profiles.std(axis=0, ddof=0)
    z = (profiles - profiles.mean(axis=0)) / spread.where(spread > 0)
    if features is None:
        # the features whose states differ most: largest range of standardised means
        features = (z.max() - z.min()).sort_values(ascending=False).index[:n].tolist()
    z, values = z[features], profiles[features]
    if ax is None:
        fig = Figure(figsize=(1.6 + 1.15 * len(features), 1.3 + 0.45 * len(states)), dpi=DPI,
                     layout="constrained")  # fmt: skip
        ax = fig.subplots()
    fig = ax.figure
    image = ax.imshow(z.to_numpy(float), cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
    for i in range(len(z)):
        for j in range(len(features)):
            v = values.iat[i, j]
            text = "" if not np.isfinite(v) else f"{v:.3g}"
            dark = abs(z.iat[i, j]) > 1.2 if np.isfinite(z.iat[i, j]) else False
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")  # fmt: skip
    colors = state_colors(len(states))
    ax.set_yticks(range(len(z)), [f"state {s}" for s in z.index], fontsize=8)
    for tick, state in zip(ax.get_yticklabels(), z.index, strict=True):
        tick.set_color(colors[int(state)])
        tick.set_fontweight("bold")
    ax.set_xticks(range(len(features)), [f.replace(".", ".\n", 1) for f in features],
                  fontsize=7)  # fmt: skip
    fig.colorbar(image, ax=ax, shrink=0.8, label="state mean, SDs across states")
    ax.set_title("State fingerprint: the features whose state means differ most "
                 "(cells: mean in the feature's units)", fontsize=9)  # fmt: skip
    return fig


def backtest_figure(inputs: ExportInputs, paths: list[Path] | None = None, ax=None):
    """:func:`polymap.scoring.backtest.plot_backtest` of the export's ``--backtest``
    table (AUROC, average precision and lead time per horizon); returns the Figure."""
    from polymap.scoring.backtest import plot_backtest

    if inputs.backtest is None:
        raise ValueError("no backtest table given (polymap export --backtest BACKTEST.csv)")
    return _saved(plot_backtest(inputs.backtest, ax=ax), paths)


def fingerprint(inputs: ExportInputs, paths: list[Path] | None = None, ax=None):
    """:func:`plot_fingerprint` of the inputs' map; returns the Figure."""
    return _saved(plot_fingerprint(inputs.graph, ax=ax), paths)


def risk_figure(inputs: ExportInputs, paths: list[Path] | None = None, ax=None):
    """Runs ranked by evidence (-log10 p; risk for a first-scorer SCORES.csv), flagged runs
    red, labels marked, signal z-scores at right. Draws into ``ax`` when given; returns
    the Figure."""
    if ax is None:
        fig = Figure(figsize=figure_size("risk", inputs), dpi=DPI, layout="constrained")
        ax = fig.subplots()
    fig = ax.figure
    if inputs.scores is None:
        ax.text(0.5, 0.5, "no scores given (polymap export --scores SCORES.csv)", ha="center")
        ax.axis("off")
        return _saved(fig, paths)
    scores = inputs.scores.sort_values("risk", ascending=True)
    y = np.arange(len(scores))
    bar_colors = ["crimson" if f else "0.6" for f in scores["flagged"].astype(bool)]
    if "p_value" in scores.columns:  # RiskScorer: evidence as -log10 p, flag line at 0.05
        values = -np.log10(np.clip(scores["p_value"].to_numpy(float), 1e-12, 1.0))
        cap = max(2.0, 1.05 * float(np.nanmax(values)) if len(values) else 2.0)
        line, xlabel = -math.log10(0.05), "evidence: -log10 p-value (dotted: p = 0.05)"
    else:  # a SCORES.csv from the first scorer
        values, cap, line, xlabel = scores["risk"].to_numpy(float), 1.0, 0.5, "risk"
    ax.barh(y, values, color=bar_colors, height=0.6)
    labels = []
    for rec in scores.itertuples():
        mark = " (unstable)" if rec.run in inputs.unstable else ""
        if inputs.labels is not None and rec.run not in inputs.unstable:
            mark = " (stable)"
        labels.append(f"{rec.run}{mark}")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, cap * 1.05)
    ax.axvline(line, color="crimson", lw=0.8, ls=":")
    signals = [
        c
        for c in ("path_z", "likelihood_z", "deviation_z", "performance_z")
        if c in scores.columns and scores[c].notna().any()
    ]
    if signals:  # tick labels of a right-hand axis: the layout makes room for them
        texts = [
            "  ".join(f"{c.removesuffix('_z')} {rec[c]:+6.1f}" for c in signals)
            for _, rec in scores.iterrows()
        ]
        right = ax.twinx()
        right.set_ylim(ax.get_ylim())
        right.set_yticks(y, texts, fontsize=7, family="monospace")
        right.tick_params(axis="y", length=0)
    horizon = scores["horizon_step"].iloc[0] if "horizon_step" in scores.columns else None
    title = "Runs ranked by evidence (red: flagged); signal z-scores at right"
    if horizon is not None and not pd.isna(horizon):
        title += f"; checkpoints up to step {int(horizon)}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    return _saved(fig, paths)
