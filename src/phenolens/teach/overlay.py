"""DIFFusion's difference overlay (paper 004, Fig. 4b): counterfactual − original on the original.

A signed difference map alone loses the cells: one cannot tell which structure brightened. Painting the
difference over the greyscale original keeps them: red where the counterfactual has more signal, blue
where it has less (the report's signed-difference colours), transparent where nothing changed. A
microscopy image has several stains, each changing on its own, so each channel gets its own panel.
"""

from __future__ import annotations

import numpy as np

from phenolens.report.tiles import fit_tile

MORE = np.array([1.0, 0.1, 0.05], np.float32)  # red: more signal in the counterfactual
LESS = np.array([0.1, 0.35, 1.0], np.float32)  # blue: less signal
MAX_ALPHA = 0.85  # the strongest change still lets the cell underneath show through
GAP = 3  # white pixels between channel panels


def overlay_channel(original: np.ndarray, diff: np.ndarray, scale: float) -> np.ndarray:
    """HW original in model units [-1, 1] and HW difference -> HW3 uint8: the difference over the grey original.

    Opacity grows with |diff| / SCALE (saturating at SCALE), so noise-sized changes barely tint the image."""
    grey = np.clip((np.asarray(original, np.float32) + 1) / 2, 0, 1)[..., None] * np.ones(3, np.float32)
    d = np.clip(np.asarray(diff, np.float32) / max(float(scale), 1e-8), -1, 1)
    alpha = (np.abs(d) * MAX_ALPHA)[..., None]
    colour = np.where((d >= 0)[..., None], MORE, LESS)
    rgb = (1 - alpha) * grey + alpha * colour
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def difference_overlay(original: np.ndarray, counterfactual: np.ndarray, scale: float) -> np.ndarray:
    """CHW original and counterfactual (model units) -> one panel per channel side by side, as a tile."""
    if original.shape != counterfactual.shape:
        raise ValueError(f"overlay needs images of one shape, got {original.shape} and {counterfactual.shape}")
    diff = counterfactual - original
    panels = [fit_tile(overlay_channel(o, d, scale)) for o, d in zip(original, diff)]
    gap = np.full((panels[0].shape[0], GAP, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for p in panels:
        parts += [p, gap]
    return np.concatenate(parts[:-1], axis=1)


def group_scale(diffs: list[np.ndarray]) -> float:
    """One colour scale for a group of pairs (99.5th percentile of |difference|), so pairs compare."""
    if not diffs:
        return 1.0
    s = float(np.percentile(np.abs(np.concatenate([d.ravel() for d in diffs])), 99.5))
    return s if s > 0 else 1.0
