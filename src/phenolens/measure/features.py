"""CellProfiler features of one image, aggregated to one row, so images can be compared as profiles.

Per-object measurements come from `cp_measure` (CellProfiler's own measurement code as a library)
for two object sets, nuclei and cells, in every channel; each feature is averaged over the image's
objects (`Nuclei_<feature>`, `Cells_<feature>`). Image-level features are added for what a
per-object mean cannot see: object counts (cell loss), area fractions and per-channel intensity
statistics of the whole field.

Two profiles: `standard` (size/shape, intensity, granularity, radial distribution, correlation;
about 0.4 s for a 128×128 3-channel field with 16 cells on one core) and `full` (adds texture,
Zernike moments and Costes colocalisation; about 10× slower).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

PROFILES = ("standard", "full")
FEATURES_VERSION = 2  # bump when a measured row changes, so cached rows are not reused
# Position and bounding-box columns describe where a cell lies, not what it looks like.
_POSITIONAL = ("Center_", "BoundingBox", "Location_", "Orientation")


@dataclass(frozen=True)
class FeatureSettings:
    channel_names: tuple[str, ...]
    profile: str = "standard"


def _config(settings: FeatureSettings) -> dict:
    from cp_measure.featurizer import make_featurizer_config

    full = settings.profile == "full"
    return make_featurizer_config(
        list(settings.channel_names), objects=["Nuclei", "Cells"],
        texture=full, zernike=full, radial_zernikes=full, correlation_costes=full,
        # intensities are given in [0, 1] (raw counts / dtype maximum), as CellProfiler reads them
        correlation_costes_params={"scale_max": 65535},
    )


def object_features(image: np.ndarray, nuclei: np.ndarray, cells: np.ndarray,
                    settings: FeatureSettings) -> dict[str, float]:
    """Mean over objects of every cp_measure feature, for nuclei and for cells."""
    from cp_measure.featurizer import featurize

    out: dict[str, float] = {}
    if nuclei.max() == 0:
        return out
    masks = np.stack([nuclei, cells]).astype(np.int32)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cp_measure warns on tiny objects and empty bins
        data, columns, rows = featurize(image[None].astype(np.float64), masks, _config(settings))
    kinds = np.array([r[1] for r in rows])
    keep = [i for i, c in enumerate(columns) if not c.startswith(_POSITIONAL)]
    for kind in ("Nuclei", "Cells"):
        sel = data[kinds == kind][:, keep].astype(np.float64)
        if len(sel) == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(sel, axis=0)
        out.update({f"{kind}_{columns[i]}": float(v) for i, v in zip(keep, means)})
    return out


def image_features(image: np.ndarray, nuclei: np.ndarray, cells: np.ndarray,
                   channel_names: Sequence[str]) -> dict[str, float]:
    """Whole-field features: counts, area fractions, per-channel intensity statistics (whole field,
    share over nuclei, mean over cytoplasm)."""
    area = float(nuclei.size)
    out = {
        "Image_Count_Nuclei": float(len(np.unique(nuclei)) - (1 if (nuclei == 0).any() else 0)),
        "Image_Count_Cells": float(len(np.unique(cells)) - (1 if (cells == 0).any() else 0)),
        "Image_AreaFraction_Nuclei": float((nuclei > 0).sum()) / area,
        "Image_AreaFraction_Cells": float((cells > 0).sum()) / area,
    }
    for c, name in enumerate(channel_names):
        ch = image[c]
        out[f"Image_Intensity_Mean_{name}"] = float(ch.mean())
        out[f"Image_Intensity_Std_{name}"] = float(ch.std())
        out[f"Image_Intensity_P99_{name}"] = float(np.percentile(ch, 99))
        if nuclei.any():
            out[f"Image_Intensity_NuclearFraction_{name}"] = float(ch[nuclei > 0].sum() / max(ch.sum(), 1e-12))
        cytoplasm = (cells > 0) & (nuclei == 0)  # CellProfiler's tertiary object: cell minus nucleus
        if cytoplasm.any():
            out[f"Image_Intensity_CytoplasmMean_{name}"] = float(ch[cytoplasm].mean())
    return out


def measure_image(image: np.ndarray, nuclei: np.ndarray, cells: np.ndarray, settings: FeatureSettings) -> dict[str, float]:
    """One row of features for a C×H×W image with intensities in [0, 1] and its label images."""
    row = image_features(image, nuclei, cells, settings.channel_names)
    row.update(object_features(image, nuclei, cells, settings))
    return row
