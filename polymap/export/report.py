"""``report.html``: one self-contained file (images embedded as data URIs, no scripts, no
network) with the training map, timelines, model selection, separating features, risk,
the ``describe`` text, the score table and the backtest table when given."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from polymap.atomic import write_text
from polymap.export.inputs import ExportInputs

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:.8em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:.25em .5em}
th{background:#f3f3f3}.flagged{background:#fde2e2}.note{color:#555;font-size:.9em}
.wide{overflow-x:auto;max-width:100%}.long{min-width:26em}
"""

SECTIONS = (
    ("training_map.png", "Training map", "States (nodes, dashed = detour) and transitions."),
    ("timelines.png", "Timelines", "Each run's state over training, with the metric overlaid."),
    ("risk.png", "Risk", "Runs ranked by outlier risk with their signals."),
    ("selection.png", "Model selection", "Held-out log-likelihood, BIC and AIC against K."),
    ("features.png", "Separating features", "The features that best separate the states."),
    ("fingerprint.png", "State fingerprint", "Each state's mean of its most distinct features."),
    ("backtest.png", "Backtest", "AUROC, average precision and lead time per horizon."),
)


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(frame: pd.DataFrame, flagged: set[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for _, rec in frame.iterrows():
        cls = ' class="flagged"' if flagged and rec.get("run") in flagged else ""
        cells = []
        for column, value in rec.items():
            if isinstance(value, float):
                text = "" if pd.isna(value) else f"{value:.4g}"
            else:
                text = "" if value is None or value is pd.NA else str(value)
            long = ' class="long"' if column == "explanation" else ""
            cells.append(f"<td{long}>{html.escape(text)}</td>")
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    body = "".join(rows)
    # a wide table scrolls inside the page instead of running off its right edge
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="wide">{table}</div>'


def write_report(inputs: ExportInputs, folder: Path, path: Path) -> Path:
    """Write the report; the PNGs must already be in ``folder``."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>polymap report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>polymap report</h1>",
        f'<p class="note">Model: {html.escape(str(inputs.model_dir))}; '
        f"{len(inputs.runs)} runs, K={inputs.graph['n_states']} states"
        + (f"; timeline metric: {html.escape(inputs.metric)}" if inputs.metric else "")
        + ".</p>",
    ]
    for name, title, note in SECTIONS:
        file = folder / name
        if file.exists():
            parts += [f"<h2>{title}</h2>", f'<p class="note">{note}</p>', _image(file, title)]
    if inputs.scores is not None:
        columns = [
            c
            for c in ("run", "risk", "flagged", "p_value", "path_z", "likelihood_z",
                      "deviation_z", "performance_z", "first_flag_step", "first_deviation_step",
                      "horizon_step", "explanation")
            if c in inputs.scores.columns
        ]  # fmt: skip
        scores = inputs.scores.sort_values("risk", ascending=False)[columns]
        if inputs.labels is not None:
            labels = inputs.labels[["run", "unstable"] + (
                ["onset_step"] if "onset_step" in inputs.labels.columns else []
            )]  # fmt: skip
            scores = scores.merge(labels, on="run", how="left")
        if "explanation" in scores.columns:  # the long text last, the labels before it
            scores = scores[[c for c in scores.columns if c != "explanation"] + ["explanation"]]
        parts += ["<h2>Scores</h2>", _table(scores, inputs.flagged)]
    if inputs.backtest is not None:
        parts += ["<h2>Backtest, per horizon</h2>", _table(inputs.backtest)]
    parts += ["<h2>Training map, in words</h2>", f"<pre>{html.escape(inputs.describe)}</pre>"]
    parts.append("</body></html>")
    return write_text(path, "\n".join(parts))
