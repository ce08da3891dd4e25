"""``polymap export``: training-map graphs, figures and a self-contained HTML report.

>>> from polymap.export import export
>>> files = export("model/", out="report/", scores="scores.csv")     # doctest: +SKIP
>>> sorted(p.name for p in files)[:3]                                # doctest: +SKIP
['features.png', 'report.html', 'risk.png']
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from polymap.export import figures
from polymap.export.graphs import draw_map, map_document, write_dot, write_json
from polymap.export.inputs import ExportError, ExportInputs, load_inputs
from polymap.export.report import write_report

FORMATS = ("dot", "json", "png", "svg", "html")

__all__ = ["FORMATS", "ExportError", "ExportInputs", "export", "load_inputs"]


def _formats(formats: str | Iterable[str]) -> set[str]:
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    chosen = set(formats)
    unknown = chosen - set(FORMATS)
    if unknown or not chosen:
        raise ExportError(f"--format {sorted(unknown) or '(empty)'}: choose from {FORMATS}")
    return chosen


def export(
    model_dir: str | Path,
    out: str | Path,
    scores: str | Path | None = None,
    labels: str | Path | None = None,
    metric: str | None = None,
    formats: str | Iterable[str] = FORMATS,
    table: str | Path | pd.DataFrame | None = None,
    backtest: str | Path | None = None,
    highlight_run: str | None = None,
    step_scale: str = "sqrt",
    renderer: str = "matplotlib",
) -> list[Path]:
    """Write the export files into ``out``; returns them.

    ``formats``: ``dot`` and ``json`` give ``training_map.dot/.json``; ``png``/``svg`` the
    training map and ``timelines`` in that format plus ``selection.png``,
    ``features.png``, ``risk.png``, ``fingerprint.png`` and, with ``backtest``,
    ``backtest.png``; ``html`` gives ``report.html`` (which needs the
    PNGs, so they are drawn too). ``highlight_run`` colours one run's path in the graph
    (default: the highest-risk flagged run). ``renderer``: ``matplotlib`` (default),
    ``graphviz`` (needs ``dot``) or ``auto``.
    """
    chosen = _formats(formats)
    if step_scale not in ("sqrt", "log", "linear"):
        raise ExportError(f"step_scale={step_scale!r}: choose sqrt, log or linear")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    inputs = load_inputs(model_dir, scores, labels, metric, table, backtest)
    if highlight_run is None and inputs.flagged:
        highlight_run = figures.run_order(inputs)[0]
    if highlight_run is not None and highlight_run not in inputs.runs:
        raise ExportError(f"--highlight {highlight_run!r}: not one of the model's runs")
    out.mkdir(parents=True, exist_ok=True)
    doc = map_document(inputs.graph, inputs.paths, highlight_run)
    written: list[Path] = []
    dot_path = out / "training_map.dot"
    if "dot" in chosen or renderer != "matplotlib":
        written.append(write_dot(doc, dot_path))
    if "json" in chosen:
        written.append(write_json(doc, out / "training_map.json"))
    pictures = [ext for ext in ("png", "svg") if ext in chosen]
    if "html" in chosen and "png" not in pictures:
        pictures.append("png")
    if pictures:
        written += draw_map(
            doc,
            out / "training_map.png" if "png" in pictures else None,
            out / "training_map.svg" if "svg" in pictures else None,
            renderer,
        )
        drawn = [
            (
                figures.timelines,
                [out / f"timelines.{e}" for e in pictures],
                {"step_scale": step_scale},
            ),
            (figures.selection, [out / "selection.png"], {}),
            (figures.features_figure, [out / "features.png"], {}),
            (figures.risk_figure, [out / "risk.png"], {}),
            (figures.fingerprint, [out / "fingerprint.png"], {}),
        ]
        if inputs.backtest is not None:
            drawn.append((figures.backtest_figure, [out / "backtest.png"], {}))
        for draw, files, options in drawn:
            draw(inputs, files, **options)
            written += files
    if "html" in chosen:
        written.append(write_report(inputs, out, out / "report.html"))
    if "dot" not in chosen and dot_path in written:
        written.remove(dot_path)
        dot_path.unlink()
    return written
