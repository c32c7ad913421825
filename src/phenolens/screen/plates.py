"""Per-plate corrections: a smooth illumination flat-field, and intensity levels for normalisation.

Why per plate: a plate is imaged in one session, so its fields share the microscope's uneven
illumination (bright centre, dim corners) and an overall brightness that drifts between plates.
Left in, the first puts a cell's intensity at the mercy of where it sat in the field, the second
makes plate look like phenotype.

Illumination follows CellProfiler's CorrectIlluminationCalculate ("Regular" intensity, all images
of the group, "Fit Polynomial" smoothing) and CorrectIlluminationApply ("Divide"): the mean of the
plate's fields per channel, fitted by a quadratic surface in x and y (smooth at any scale, so no
cell survives it), scaled to median 1, and divided out. With
many fields per plate the cells average away and only the illumination is left; with few (under
`MIN_FIELDS_FOR_ILLUMINATION`) a warning says so. Levels: per channel the 0.1th and 99.9th
percentiles of the plate's (corrected) pixels, from an even sample of each field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from skimage.transform import downscale_local_mean, resize

MIN_FIELDS_FOR_ILLUMINATION = 10
BIN = 4  # fields are averaged binned 4x4: the flat-field is smooth, and this keeps the pass cheap
SAMPLE_STRIDE = 7  # every 7th pixel of a field goes into the plate's percentile sample ...
SAMPLE_TOTAL = 4_000_000  # ... up to this many values per channel for the whole plate
LEVEL_PERCENTILES = (0.1, 99.9)
NORMALISED_HIGH = 50000.0  # a plate's 99.9th percentile maps here in the 16-bit crops (headroom above it)


@dataclass
class PlateSummary:
    """What one pass over a plate's fields gathers: the binned sum of fields and a pixel sample."""

    total: np.ndarray | None = None  # (C, y, x) float64
    count: int = 0
    samples: list[np.ndarray] = field(default_factory=list)

    def add(self, binned: np.ndarray, sample: np.ndarray) -> None:
        self.total = binned.astype(np.float64) if self.total is None else self.total + binned
        self.count += 1
        self.samples.append(sample)


def field_contribution(image: np.ndarray, illumination: np.ndarray | None,
                       n_fields: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(the field binned BIN x BIN, an even pixel sample (C, n) of the field after ILLUMINATION).

    The sample takes every SAMPLE_STRIDE-th pixel, fewer when the plate has many fields (N_FIELDS), so
    that a plate's whole sample stays under SAMPLE_TOTAL values per channel: memory stays flat however
    large the plate."""
    c, h, w = image.shape
    binned = downscale_local_mean(image[:, : h - h % BIN, : w - w % BIN], (1, BIN, BIN))
    corrected = image if illumination is None else image / illumination
    stride = max(SAMPLE_STRIDE, -(-h * w * max(n_fields, 1) // SAMPLE_TOTAL))
    return binned, corrected.reshape(c, -1)[:, ::stride].astype(np.float32)


def illumination_function(summary: PlateSummary, shape: tuple[int, int]) -> np.ndarray:
    """The plate's flat-field (C, H, W), median 1 per channel (CellProfiler's CorrectIlluminationCalculate)."""
    mean = summary.total / max(summary.count, 1)
    smooth = np.stack([_quadratic_surface(ch) for ch in mean])
    full = resize(smooth, (smooth.shape[0], *shape), order=1, preserve_range=True)
    med = np.median(full.reshape(full.shape[0], -1), axis=1)[:, None, None]
    full = full / np.where(med > 0, med, 1.0)
    return np.maximum(full, 1e-3).astype(np.float32)


def _quadratic_surface(image: np.ndarray) -> np.ndarray:
    """Least-squares fit of a + bx + cy + dx^2 + exy + fy^2 (CellProfiler's "Fit Polynomial")."""
    h, w = image.shape
    y, x = np.mgrid[0:h, 0:w]
    y, x = (y / max(h - 1, 1) - 0.5).ravel(), (x / max(w - 1, 1) - 0.5).ravel()
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    coef, *_ = np.linalg.lstsq(basis, image.ravel(), rcond=None)
    return (basis @ coef).reshape(h, w)


def plate_levels(summary: PlateSummary) -> np.ndarray:
    """(C, 2): per channel the plate's low and high percentiles."""
    sample = np.concatenate(summary.samples, axis=1)
    return np.percentile(sample, LEVEL_PERCENTILES, axis=1).T.astype(np.float64)


def normalise(crop: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Plate levels -> 0 .. NORMALISED_HIGH, so every plate's crops share one intensity scale."""
    lo, hi = levels[:, 0][:, None, None], levels[:, 1][:, None, None]
    return (crop - lo) / np.maximum(hi - lo, 1e-6) * NORMALISED_HIGH


__all__ = ["LEVEL_PERCENTILES", "MIN_FIELDS_FOR_ILLUMINATION", "NORMALISED_HIGH", "PlateSummary",
           "field_contribution", "illumination_function", "normalise", "plate_levels"]
