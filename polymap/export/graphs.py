"""The training map as a graph file: Graphviz DOT, JSON for other tools, PNG/SVG pictures.

Nodes are states (occupancy, runs visiting, step range; detour states dashed), edges the
transitions between different states with their probabilities (edge width grows with the
probability), optionally one run's path highlighted. Pictures are drawn with matplotlib
from a :mod:`networkx` graph, so no system Graphviz is needed; with ``renderer="graphviz"``
(or ``"auto"`` when ``dot`` is on the PATH) Graphviz renders the DOT file instead.

``training_map.json`` schema (``"schema": "polymap.training_map/1"``)::

    {"schema", "n_states", "reason", "features", "highlight_run",
     "nodes": [{"id", "label", "occupancy", "n_checkpoints", "n_runs", "step_range",
                "entry_step_median", "self_probability", "detour", "color"}],
     "edges": [{"source", "target", "probability", "count", "highlighted",
                "top_features"}]}
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import matplotlib
import networkx as nx
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch

from polymap import atomic

JSON_SCHEMA = "polymap.training_map/1"
DPI = 100  # every PNG is figsize x DPI pixels (no tight bounding box)
# Figures are matplotlib ``Figure`` objects, not pyplot: no global backend is set and no
# pyplot state is touched, so exporting from a notebook leaves its inline plots alone.


# Okabe & Ito's colour-blind-safe palette (black left out: state numbers are drawn on it)
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#999999")  # fmt: skip


def state_colors(n_states: int) -> list[str]:
    """One colour per state, shared by every picture (hex strings): Okabe-Ito's
    colour-blind-safe palette up to 8 states, tab20 beyond.

    >>> state_colors(3)
    ['#0072B2', '#E69F00', '#009E73']
    """
    if n_states <= len(OKABE_ITO):
        return list(OKABE_ITO[:n_states])
    cmap = matplotlib.colormaps["tab20"]
    return [matplotlib.colors.to_hex(cmap(i % cmap.N)) for i in range(n_states)]


def run_path(paths, run: str) -> list[int]:
    """The sequence of distinct states a run goes through (consecutive repeats merged)."""
    seq = paths[paths["run"] == run].sort_values("step")["state"].tolist()
    return [s for i, s in enumerate(seq) if i == 0 or s != seq[i - 1]]


def _highlight_edges(paths, run: str | None) -> set[tuple[int, int]]:
    if run is None:
        return set()
    seq = run_path(paths, run)
    return set(zip(seq[:-1], seq[1:], strict=True))


def _node_label(state: dict) -> str:
    rng = state.get("step_range") or ["-", "-"]
    return (
        f"state {state['id']}\n{100 * state['occupancy']:.0f}% \u00b7 {state['n_runs']} runs\n"
        f"steps {rng[0]}-{rng[1]}"
    )


def map_document(graph: dict, paths, highlight_run: str | None = None) -> dict:
    """The JSON document of the training map (see module docs)."""
    colors = state_colors(graph["n_states"])
    hot = _highlight_edges(paths, highlight_run)
    return {
        "schema": JSON_SCHEMA,
        "n_states": graph["n_states"],
        "reason": graph.get("reason"),
        "features": graph.get("features", []),
        "highlight_run": highlight_run,
        "nodes": [
            {
                "id": s["id"],
                "label": _node_label(s),
                "occupancy": s["occupancy"],
                "n_checkpoints": s["n_checkpoints"],
                "n_runs": s["n_runs"],
                "step_range": s["step_range"],
                "entry_step_median": s["entry_step_median"],
                "self_probability": s["self_probability"],
                "detour": bool(s["detour"]),
                "color": colors[s["id"]],
            }
            for s in graph["states"]
        ],
        "edges": [
            {
                "source": t["source"],
                "target": t["target"],
                "probability": t["probability"],
                "count": t["count"],
                "highlighted": (t["source"], t["target"]) in hot,
                "top_features": t.get("top_features", []),
            }
            for t in graph["transitions"]
        ],
    }


def write_json(doc: dict, path: Path) -> Path:
    return atomic.write_json(path, doc)


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_dot(doc: dict, path: Path) -> Path:
    """Graphviz DOT: ``digraph training_map`` with nodes ``s<id>``."""
    lines = [
        "digraph training_map {",
        '  rankdir=LR; node [shape=ellipse, style=filled, fontname="Helvetica"];',
        f"  label={_dot_quote('training map: K=' + str(doc['n_states']))}; labelloc=t;",
    ]
    for node in doc["nodes"]:
        style = '"filled,dashed"' if node["detour"] else "filled"
        lines.append(
            f"  s{node['id']} [label={_dot_quote(node['label'])}, fillcolor="
            f'"{node["color"]}80", style={style}, occupancy={node["occupancy"]:.4f}, '
            f"detour={str(node['detour']).lower()}];"
        )
    for edge in doc["edges"]:
        width = 1 + 4 * edge["probability"]
        color = "red" if edge["highlighted"] else "gray30"
        label = _dot_quote(format(edge["probability"], ".2f"))
        lines.append(
            f"  s{edge['source']} -> s{edge['target']} [label={label}, penwidth={width:.2f}, "
            f"color={color}, count={edge['count']}];"
        )
    lines.append("}")
    return atomic.write_text(path, "\n".join(lines) + "\n")


def layout(doc: dict) -> dict[int, tuple[float, float]]:
    """Positions: x = order of entry (median entry step), y = main path 0, detours
    above/below alternately. Deterministic."""
    nodes = sorted(
        doc["nodes"], key=lambda n: (n["entry_step_median"] is None, n["entry_step_median"] or 0)
    )
    pos, side = {}, 1
    for x, node in enumerate(nodes):
        y = 0.0
        if node["detour"]:
            y, side = 1.1 * side, -side
        pos[node["id"]] = (float(x), y)
    return pos


def _edge_label(data: dict) -> str:
    """The transition probability and the feature that changes most on it."""
    text = f"{data['probability']:.2f}"
    top = data.get("top_features") or []
    if top:
        name = str(top[0]["feature"]).split(".", 1)[-1]
        arrow = "\u2191" if top[0]["change"] > 0 else "\u2193"
        text += f"\n{name} {arrow}"
    return text


def _arc_point(p0, p1, rad: float, t: float) -> tuple[float, float]:
    """Point at ``t`` of matplotlib's ``arc3`` curve from p0 to p1 (quadratic Bezier with
    control point ``mid + rad * (dy, -dx)``)."""
    (x0, y0), (x1, y1) = p0, p1
    cx, cy = (x0 + x1) / 2 + rad * (y1 - y0), (y0 + y1) / 2 - rad * (x1 - x0)
    u = 1 - t
    return (u * u * x0 + 2 * u * t * cx + t * t * x1, u * u * y0 + 2 * u * t * cy + t * t * y1)


def plot_training_map(doc: dict, ax=None):
    """The training map (:func:`map_document`) drawn with matplotlib: states as circles
    (dashed: detours) with their share, runs and step range; transitions as arcs whose
    width grows with the probability, labelled with it and the feature that changes most
    (arrow: up or down); one run's path in red. Edge labels are placed along their arc
    where they overlap no other text or state (checked with the renderer's extents).
    Draws into ``ax`` when given; returns the Figure. SVG ids: ``state-<k>``,
    ``edge-<a>-<b>``."""
    graph = nx.DiGraph()
    for node in doc["nodes"]:
        graph.add_node(node["id"], **node)
    for edge in doc["edges"]:
        graph.add_edge(edge["source"], edge["target"], **edge)
    pos = layout(doc)
    if ax is None:
        width = max(6.0, 1.8 * len(doc["nodes"]))
        fig = Figure(figsize=(width, 4.2), dpi=DPI, layout="constrained")
        ax = fig.subplots()
    fig = ax.figure
    radius = 0.32
    arcs = []
    for u, v, data in graph.edges(data=True):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        dx = x1 - x0
        # arcs: both directions of a pair apart, long or backward edges around the nodes
        rad = 0.0
        if graph.has_edge(v, u):
            rad = 0.2
        if abs(dx) > 1.01 or dx < 0:
            rad = 0.3
        arrow = FancyArrowPatch(
            (x0, y0),
            (x1, y1),
            connectionstyle=f"arc3,rad={rad}",
            arrowstyle="-|>",
            mutation_scale=14,
            lw=0.8 + 4 * data["probability"],
            color="crimson" if data["highlighted"] else "0.35",
            shrinkA=radius * 72,
            shrinkB=radius * 72,
            gid=f"edge-{u}-{v}",
        )
        ax.add_patch(arrow)
        arcs.append(((x0, y0), (x1, y1), rad, data))
    circles = []
    for node_id, data in graph.nodes(data=True):
        x, y = pos[node_id]
        circles.append(ax.add_patch(
            Circle(
                (x, y),
                radius,
                facecolor=data["color"],
                alpha=0.85,
                edgecolor="black",
                linestyle="--" if data["detour"] else "-",
                lw=1.2,
                gid=f"state-{node_id}",
            )
        ))  # fmt: skip
        ax.text(x, y, str(node_id), ha="center", va="center", fontsize=13, weight="bold")
        rng = data["step_range"] or ["-", "-"]
        ax.text(
            x,
            y - radius - 0.06,
            f"{100 * data['occupancy']:.0f}%, {data['n_runs']} runs\nsteps {rng[0]}-{rng[1]}",
            ha="center",
            va="top",
            fontsize=8,
        )
    xs = np.array([p[0] for p in pos.values()] or [0.0])
    ax.set_xlim(xs.min() - 0.7, xs.max() + 0.7)
    ax.set_ylim(-1.9, 1.7)
    ax.set_aspect("equal")
    ax.axis("off")
    title = f"Training map: K={doc['n_states']} (dashed: detour states"
    title += f"; red: {doc['highlight_run']}'s path)" if doc.get("highlight_run") else ")"
    ax.set_title(title, fontsize=10)
    # edge labels last, each where it overlaps nothing drawn so far
    if not hasattr(fig.canvas, "get_renderer"):  # a bare Figure: give it an Agg canvas
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = [t.get_window_extent(renderer) for t in ax.texts]
    taken += [c.get_window_extent(renderer) for c in circles]
    for p0, p1, rad, data in sorted(arcs, key=lambda a: -a[3]["probability"]):
        for t in (0.5, 0.4, 0.6, 0.3, 0.7, 0.22, 0.78):
            label = ax.text(
                *_arc_point(p0, p1, rad, t), _edge_label(data), ha="center", va="center",
                fontsize=7.5, color="0.15", linespacing=1.0,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.9},
            )  # fmt: skip
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in taken):
                break
            if t != 0.78:
                label.remove()
        taken.append(label.get_window_extent(renderer))
    return fig


def draw_map(doc: dict, png: Path | None, svg: Path | None, renderer: str = "auto") -> list[Path]:
    """Draw the training map to PNG and/or SVG; returns the files written."""
    dot = shutil.which("dot")
    if renderer == "graphviz" or (renderer == "auto" and dot):
        if not dot:
            raise FileNotFoundError(
                "renderer='graphviz' but Graphviz `dot` is not on PATH: install it (Debian: "
                "apt install graphviz; conda: conda install graphviz) or use --renderer "
                "matplotlib (the default)"
            )
        source = (png or svg).with_suffix(".dot")
        written = []
        for out, fmt in ((png, "png"), (svg, "svg")):
            if out is not None:
                subprocess.run([dot, f"-T{fmt}", str(source), "-o", str(out)], check=True)
                written.append(out)
        return written
    fig = plot_training_map(doc)
    written = []
    for out in (png, svg):
        if out is not None:
            with atomic.atomic_file(out) as tmp:
                fig.savefig(tmp)
            written.append(out)
    return written
