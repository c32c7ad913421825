"""The figures of `phenolens validate`: real vs translated dose response of the top features, and a few
cells across the conditions.

Why two figures: the table says whether the numbers agree; a reader believes it when they see the
translated curve follow the real one, and the same cells change the way the real treatment does.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from phenolens.atomic import write_bytes_atomic
from phenolens.data.io import read_image
from phenolens.data.normalize import Normalizer
from phenolens.report.grids import translation_grid
from phenolens.run.index import open_run, resolve_source

REAL, TRANSLATED = "#4d4d4d", "#d95f02"


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def dose_responses(features_csv: Path, features: Sequence[str], conditions: Sequence[str]) -> dict:
    """Per feature and condition: mean and standard error of the real held-out cells and of the
    translations to that condition, in SD units of the real control cells, centred on their mean."""
    with open(features_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for f in features:
        def vals(sel) -> np.ndarray:
            v = np.array([_float(r.get(f)) for r in rows if sel(r)])
            return v[np.isfinite(v)]

        control = vals(lambda r: r["role"] == "reference" and r["condition"] == conditions[0])
        mu, sd = (control.mean(), control.std(ddof=1)) if len(control) > 1 else (math.nan, math.nan)
        sd = sd if sd > 0 else 1.0
        per = {}
        for c in conditions:
            for kind, sel in (("real", lambda r: r["role"] == "reference" and r["condition"] == c),
                              ("translated", lambda r: r["role"] == "generated" and r["target_condition"] == c)):
                v = (vals(sel) - mu) / sd
                per[(kind, c)] = (float(v.mean()) if len(v) else math.nan,
                                  float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan)
        out[f] = per
    return out


def dose_response_png(responses: dict, conditions: Sequence[str], path: Path, per_row: int = 3) -> Path:
    """Small multiples: one panel per feature, real (grey) and translated (orange) means +- SE."""
    n = len(responses)
    cols = min(per_row, max(n, 1))
    nrows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(3.3 * cols, 2.7 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    x = np.arange(len(conditions))
    for k, (feature, per) in enumerate(responses.items()):
        ax = fig.add_subplot(nrows, cols, k + 1)
        for kind, colour, shift in (("real", REAL, -0.06), ("translated", TRANSLATED, 0.06)):
            m = [per[(kind, c)][0] for c in conditions]
            se = [per[(kind, c)][1] for c in conditions]
            ax.errorbar(x + shift, m, yerr=se, color=colour, marker="o", ms=4, capsize=2, lw=1.5,
                        label=kind if k == 0 else None)
        ax.axhline(0, color="#bbbbbb", lw=0.8, zorder=0)
        ax.set_xticks(x, [c.replace("_", " ") for c in conditions], fontsize=7)
        ax.set_title(feature if len(feature) <= 42 else feature[:40] + "…", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        if k % cols == 0:
            ax.set_ylabel(f"SD of real {conditions[0]}", fontsize=7)
    if n:
        fig.legend(loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())
    return path


def cells_png(run_dir: Path, conditions: Sequence[str], path: Path, channel_names: Sequence[str] | None = None,
              n: int = 6) -> Path | None:
    """The first N sources: source | reconstruction | each condition | difference to the strongest."""
    rows, _, info, _, _ = open_run(run_dir)
    if not info or "normalization" not in info:
        return None
    norm = Normalizer.from_dict(info["normalization"])
    channels = info.get("channels")
    by_source: dict[str, dict[str, str]] = {}
    for r in rows:
        by_source.setdefault(r["source_path"], {})[r["target_condition"]] = r["output_path"]
    grid = []
    for src, outputs in list(by_source.items())[:n]:
        if not all(c in outputs for c in conditions):
            continue
        source_file = resolve_source(src, run_dir)
        if source_file is None:
            continue
        entry = dict(source=norm.to_model(read_image(source_file, channels=channels)[0]))
        for c in conditions:
            entry[c] = norm.to_model(read_image(run_dir / outputs[c])[0])
        entry["reconstruction"] = entry[conditions[0]]
        grid.append(entry)
    if not grid:
        return None
    return translation_grid(grid, path, list(conditions[1:]), conditions[-1], channel_names)


def write_validation_figures(out: Path, summary: dict, channel_names: Sequence[str] | None = None,
                             max_features: int = 6) -> list[Path]:
    """OUT/dose_response.png and OUT/cells.png for a finished `run_validate` (OUT and its summary)."""
    out = Path(out)
    conditions = [summary["source"], *summary["targets"]]
    features = [f["feature"] for f in summary["features"][:max_features]]
    written = []
    if features:
        responses = dose_responses(out / "run" / "measure" / "features.csv", features, conditions)
        written.append(dose_response_png(responses, conditions, out / "dose_response.png"))
    cells = cells_png(out / "run", conditions, out / "cells.png", channel_names)
    if cells is not None:
        written.append(cells)
    return written
