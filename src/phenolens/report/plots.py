"""Box plots of measured features: real source vs real target vs translation, as PNG bytes.

The question a reader asks of a translation is whether it moves a feature the way the real
treatment does, so each plot puts the three distributions side by side with both tests' p- and
q-values in the title. Figures are drawn with the Agg canvas directly (no pyplot), so rendering
never touches a display or a global backend another part of the program may have chosen.
"""

from __future__ import annotations

import io
import math
import textwrap
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

BOX_COLOURS = ("#8c8c8c", "#d95f02", "#1b9e77")


def to_float(value: object) -> float:
    """A CSV cell as a float; blanks and text become NaN so one bad cell never stops a report."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def feature_groups(rows: Sequence[Mapping[str, str]], feature: str, source_condition: str | None,
                   target: str) -> list[tuple[str, np.ndarray]]:
    """The three groups of one feature from features.csv rows: real source, real target, translation."""
    def values(keep) -> np.ndarray:
        v = np.array([to_float(r.get(feature)) for r in rows if keep(r)], dtype=np.float64)
        return v[np.isfinite(v)]

    def is_source(r: Mapping[str, str]) -> bool:
        return (r.get("kind") == "real" and r.get("role") == "source"
                and (source_condition is None or r.get("condition") == source_condition))

    return [
        (f"{source_condition or 'source'}\n(real)", values(is_source)),
        (f"{target}\n(real)", values(lambda r: r.get("role") == "reference" and r.get("condition") == target)),
        (f"-> {target}\n(translated)",
         values(lambda r: r.get("kind") == "translation" and r.get("target_condition") == target)),
    ]


def boxplot_png(feature: str, groups: Sequence[tuple[str, np.ndarray]], subtitle: Sequence[str] = (),
                dpi: int = 100) -> bytes:
    """One small box plot (with the points on top) as PNG bytes; empty groups are labelled n=0."""
    fig = Figure(figsize=(3.4, 3.2), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rng = np.random.default_rng(0)  # same jitter every time: reports of one run are reproducible
    for i, (_, vals) in enumerate(groups, start=1):
        colour = BOX_COLOURS[(i - 1) % len(BOX_COLOURS)]
        if len(vals):
            ax.boxplot([vals], positions=[i], widths=0.55, showfliers=False, patch_artist=True,
                       boxprops=dict(facecolor=colour, alpha=0.35, edgecolor=colour),
                       medianprops=dict(color="black"), whiskerprops=dict(color=colour),
                       capprops=dict(color=colour))
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(vals)), vals, s=6, color=colour, alpha=0.7, linewidths=0)
    ax.set_xticks(range(1, len(groups) + 1), [f"{name}\nn={len(v)}" for name, v in groups], fontsize=7)
    ax.set_xlim(0.4, len(groups) + 0.6)
    ax.tick_params(axis="y", labelsize=7)
    title = "\n".join(textwrap.wrap(feature, 40)[:2] + list(subtitle))
    ax.set_title(title, fontsize=7, loc="left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
