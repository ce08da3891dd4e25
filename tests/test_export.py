"""polymap export: each file is valid (PNG size, SVG/DOT structure, JSON schema), the report
renders in headless Chromium, and bad input gets clear errors."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

import polymap
from polymap.cli import main
from polymap.export import ExportError, export, load_inputs
from polymap.export.figures import figure_size
from polymap.export.graphs import DPI, JSON_SCHEMA
from polymap.phases import fit_model_dir
from polymap.scoring import RiskScorer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def fitted(small_suite, tmp_path_factory):
    """A MODEL_DIR on the small suite, scores at half of training, labels (seed 2 bad)."""
    root = tmp_path_factory.mktemp("export")
    table = polymap.extract(small_suite, features="hu2023", device="cpu", progress=False)
    (model,) = fit_model_dir(table, root / "model", n_states=3, restarts=2).values()
    scores = RiskScorer(phase_model=model).fit(table).score_reference(horizon=0.5)
    scores.loc[scores["run"] == "pico-seed2", "flagged"] = True  # one flagged run to group
    scores.to_csv(root / "scores.csv", index=False)
    labels = pd.DataFrame(
        {"run": ["pico-seed0", "pico-seed1", "pico-seed2"], "unstable": [False, False, True],
         "onset_step": [None, None, 20]}
    )  # fmt: skip
    labels.to_csv(root / "labels.csv", index=False)
    pd.DataFrame({"horizon": [0.5], "auroc": [1.0]}).to_csv(root / "backtest.csv", index=False)
    return root


@pytest.fixture(scope="module")
def exported(fitted):
    out = fitted / "out"
    files = export(
        fitted / "model", out, scores=fitted / "scores.csv", labels=fitted / "labels.csv",
        backtest=fitted / "backtest.csv", metric="hu2023.l2",
    )  # fmt: skip
    return out, files


def test_every_file_is_written(exported):
    out, files = exported
    assert sorted(p.name for p in files) == sorted(
        ["training_map.dot", "training_map.json", "training_map.png", "training_map.svg",
         "timelines.png", "timelines.svg", "selection.png", "features.png", "risk.png",
         "fingerprint.png", "backtest.png",
         "report.html"]
    )  # fmt: skip


def test_pngs_decode_to_their_sizes(exported, fitted):
    out, _ = exported
    inputs = load_inputs(fitted / "model", fitted / "scores.csv", fitted / "labels.csv")
    k = inputs.graph["n_states"]
    expected = {"training_map": (max(6.0, 1.8 * k), 4.2)}
    for name in ("timelines", "selection", "features", "risk"):
        expected[name] = figure_size(name, inputs)
    for name, (w, h) in expected.items():
        pixels = imread(out / f"{name}.png")
        assert pixels.shape[:2] == (round(h * DPI), round(w * DPI)), name
        assert pixels[..., :3].std() > 0.05, f"{name}.png is blank"


def test_graph_files_match_the_model(exported, fitted):
    import pydot

    out, _ = exported
    graph = json.loads((fitted / "model" / "graph.json").read_text())
    k, n_edges = graph["n_states"], len(graph["transitions"])
    # DOT parses, with one node per state and one edge per transition
    (dot,) = pydot.graph_from_dot_file(str(out / "training_map.dot"))
    nodes = [n for n in dot.get_nodes() if n.get_name().startswith("s")]
    assert sorted(n.get_name() for n in nodes) == [f"s{i}" for i in range(k)]
    assert len(dot.get_edges()) == n_edges
    # SVG parses, with one drawn node per state and one arrow per transition
    svg = ET.parse(out / "training_map.svg").getroot()
    ids = [e.get("id", "") for e in svg.iter()]
    assert sorted(i for i in ids if i.startswith("state-")) == [f"state-{i}" for i in range(k)]
    assert len([i for i in ids if i.startswith("edge-")]) == n_edges
    ET.parse(out / "timelines.svg")
    # JSON has the documented schema
    doc = json.loads((out / "training_map.json").read_text())
    assert doc["schema"] == JSON_SCHEMA and doc["n_states"] == k
    assert {"nodes", "edges", "features", "highlight_run", "reason"} <= set(doc)
    for node in doc["nodes"]:
        assert set(node) >= {"id", "label", "occupancy", "n_runs", "step_range", "detour", "color"}
        assert node["color"].startswith("#") and 0 <= node["occupancy"] <= 1
    assert abs(sum(n["occupancy"] for n in doc["nodes"]) - 1) < 1e-9
    for edge in doc["edges"]:
        assert set(edge) >= {"source", "target", "probability", "count", "highlighted"}
    # the flagged run's path is the highlighted one
    assert doc["highlight_run"] == "pico-seed2"
    paths = pd.read_csv(fitted / "model" / "paths.csv")
    seq = paths[paths["run"] == "pico-seed2"].sort_values("step")["state"].tolist()
    steps = {(a, b) for a, b in zip(seq[:-1], seq[1:], strict=True) if a != b}
    assert {(e["source"], e["target"]) for e in doc["edges"] if e["highlighted"]} == steps


def test_report_is_self_contained(exported):
    out, _ = exported
    text = (out / "report.html").read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    # every picture the README lists for the report: map, timelines, risk, selection,
    # features, fingerprint and (given --backtest) the backtest
    assert text.count('src="data:image/png;base64,') == 7
    assert "State fingerprint" in text and 'alt="Backtest"' in text
    assert "pico-seed2" in text and "Backtest" in text and "Training map, in words" in text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed")
def test_report_renders_in_headless_chromium(exported):
    sync_api = pytest.importorskip("playwright.sync_api")
    out, _ = exported
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page()
        messages, requests = [], []
        page.on("console", lambda m: messages.append((m.type, m.text)))
        page.on("pageerror", lambda e: messages.append(("pageerror", str(e))))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((out / "report.html").resolve().as_uri())
        images = page.evaluate(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        title = page.title()
        # a wide score table scrolls inside the page, not past its right edge, and the
        # long explanation is its last column
        page.set_viewport_size({"width": 1000, "height": 800})
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        last = page.evaluate(
            "Array.from(document.querySelectorAll('table'))"
            ".map(t => Array.from(t.querySelectorAll('th')).map(h => h.textContent))"
        )
        browser.close()
    assert title == "polymap report"
    assert overflow <= 0, overflow
    scores = [head for head in last if "risk" in head]
    assert scores and scores[0][-1] == "explanation", scores
    assert not [m for m in messages if m[0] in ("error", "pageerror", "warning")], messages
    assert len(images) == 7 and all(ok and w > 100 and h > 100 for ok, w, h in images)
    assert all(url.startswith(("file:", "data:")) for url in requests), requests


def test_cli_export_and_formats(fitted, tmp_path, capsys):
    out = tmp_path / "only"
    assert main(["export", str(fitted / "model"), "--out", str(out), "--format", "dot,json"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["training_map.dot", "training_map.json"]
    assert "2 file(s)" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(fitted, tmp_path, capsys):
    model = fitted / "model"
    # an output path that is a file
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export(model, tmp_path / "file")
    # a metric column that does not exist
    with pytest.raises(ExportError, match="--metric 'nope'"):
        export(model, tmp_path / "a", metric="nope")
    # scores for runs the model does not know
    pd.DataFrame({"run": ["ghost"], "risk": [0.9], "flagged": [True]}).to_csv(
        tmp_path / "s.csv", index=False
    )
    with pytest.raises(ExportError, match="ghost"):
        export(model, tmp_path / "b", scores=tmp_path / "s.csv")
    # a model directory from an older or foreign version
    old = tmp_path / "old"
    shutil.copytree(model, old)
    meta = json.loads((old / "model.json").read_text())
    meta["format_version"] = 99
    (old / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="format version 99"):
        export(old, tmp_path / "c")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.json").write_text(json.dumps({"format": "sklearn"}))
    assert main(["export", str(foreign), "--out", str(tmp_path / "d")]) == 1
    assert "not a polymap.PhaseModel" in capsys.readouterr().err
    # nothing was written for the failed calls
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c", "d"))
    # an older MODEL_DIR without table.parquet needs --table
    (old / "table.parquet").unlink()
    meta["format_version"] = 1
    (old / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="--table"):
        export(old, tmp_path / "e")


def test_timeline_metric_values_come_from_the_table(fitted):
    inputs = load_inputs(fitted / "model", metric="hu2023.l2")
    table = inputs.table.set_index(["run", "step"])
    assert inputs.metric == "hu2023.l2"
    assert np.isfinite(table["hu2023.l2"]).all()
    assert len(table) == len(inputs.paths)


def test_figures_draw_into_the_users_axes():
    from matplotlib.figure import Figure
    from test_scoring import runs_table

    from polymap.export.figures import plot_selection
    from polymap.phases import PhaseModel
    from polymap.scoring.backtest import plot_backtest

    model = PhaseModel(states_range=(1, 2, 3), restarts=1).fit(runs_table())
    mine = Figure()
    assert plot_selection(model.selection_, model.n_states_, fig=mine) is mine
    assert len(mine.axes) == 3 and f"K={model.n_states_} chosen" in mine._suptitle.get_text()
    table = pd.DataFrame({"horizon": [0.1, 0.25], "auroc": [0.8, 1.0],
                          "average_precision": [0.5, 1.0], "median_lead_steps": [300.0, 250.0],
                          "n_runs": [10, 10], "n_unstable": [2, 2]})  # fmt: skip
    fig = Figure()
    ax = fig.subplots()
    assert plot_backtest(table, ax=ax) is fig
    assert [line.get_label() for line in ax.get_lines()][:2] == ["AUROC", "average precision"]
    chance = [line.get_ydata()[0] for line in ax.get_lines()[2:]]
    assert chance == pytest.approx([0.5, 0.2])  # AUROC chance and the unstable share


def test_state_fingerprint_matches_the_graph(tmp_path):
    from matplotlib.figure import Figure

    from polymap.export.figures import plot_fingerprint

    graph = {"states": [{"id": 0, "profile": {"a.x": 1.0, "a.y": 10.0, "a.z": 5.0}},
                        {"id": 1, "profile": {"a.x": 3.0, "a.y": 10.0, "a.z": 6.0}}]}  # fmt: skip
    fig = Figure()
    ax = fig.subplots()
    assert plot_fingerprint(graph, ax=ax) is fig
    image = ax.get_images()[0].get_array()
    # standardised per feature across states: x and z differ (-1, +1), y does not (NaN)
    assert image[:, 0].tolist() == [-1.0, 1.0]
    texts = sorted(t.get_text() for t in ax.texts)
    assert "3" in texts and "10" in texts  # cells carry the means in the feature's units


def _no_text_overlap(fig) -> list[tuple[str, str]]:
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts if t.get_text()]
    return [
        (a, b)
        for i, (a, box_a) in enumerate(boxes)
        for b, box_b in boxes[i + 1 :]
        if box_a.overlaps(box_b)
    ]


def test_training_map_text_does_not_overlap(fitted):
    from polymap.export.graphs import map_document, plot_training_map
    from polymap.phases.model_dir import read_graph, read_paths

    graph = read_graph(fitted / "model")
    doc = map_document(graph, read_paths(fitted / "model"), "pico-seed2")
    fig = plot_training_map(doc)
    assert not _no_text_overlap(fig)
    labels = [t.get_text() for t in fig.axes[0].texts]
    # each transition's label names the feature that changes most on it
    assert any("\u2191" in t or "\u2193" in t for t in labels)
    # a dense synthetic map too: 8 states, every forward edge and some back edges
    nodes = [{"id": i, "label": "", "occupancy": 0.1, "n_checkpoints": 1, "n_runs": 3,
              "step_range": [i * 10, i * 10 + 9], "entry_step_median": i * 10.0,
              "self_probability": 0.5, "detour": i % 3 == 2, "color": "#999999"}
             for i in range(8)]  # fmt: skip
    edges = [{"source": a, "target": b, "probability": 0.1, "count": 1, "highlighted": False,
              "top_features": [{"feature": "hu2023.l2", "change": 1.0, "direction": "up"}]}
             for a in range(8) for b in range(8) if b in (a + 1, a + 2) or b == a - 1]  # fmt: skip
    dense = {"n_states": 8, "nodes": nodes, "edges": edges, "highlight_run": None}
    overlaps = _no_text_overlap(plot_training_map(dense))
    assert len(overlaps) <= 2, overlaps  # a crowded map may leave a couple; none here above


def test_every_export_figure_draws_into_the_users_figure(fitted):
    from matplotlib.figure import Figure

    from polymap.export import figures

    scores = pd.read_csv(fitted / "scores.csv")  # DataFrames are accepted, as from a notebook
    inputs = load_inputs(fitted / "model", scores=scores, labels=fitted / "labels.csv",
                         metric="hu2023.l2")  # fmt: skip
    for draw in (figures.timelines, figures.selection, figures.features_figure):
        mine = Figure()
        assert draw(inputs, fig=mine) is mine and mine.axes, draw.__name__
    for draw in (figures.risk_figure, figures.fingerprint):
        mine = Figure()
        ax = mine.subplots()
        assert draw(inputs, ax=ax) is mine, draw.__name__
    normalized = figures.timelines(inputs, step_scale="linear", normalize=True)
    low, high = normalized.axes[1].get_ylim()
    assert -0.2 < low < 0.1 and 0.9 < high < 1.2  # each run's metric on its own 0..1
