"""The page's image tiles: composites, signed differences and flicker GIFs as data URIs.

Each shown image set is encoded once (`render_set`); galleries, flicker cards and dose strips share
the URIs. Tiles are PNG (lossless, so they show exactly what the model produced), small crops are
upscaled with nearest neighbour so pixels stay pixels, and large images shrunk to keep the page a few MB.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from phenolens.data.display import composite, signed_difference, upscale
from phenolens.report.flicker import flicker_gif
from phenolens.report.run_data import ImageSet

MIN_TILE = 128  # small crops are upscaled (nearest neighbour) to at least this many pixels a side
MAX_TILE = 384  # large images are shrunk to this, to keep the page a few MB


def png_uri(rgb: np.ndarray) -> str:
    """HW3 uint8 -> PNG data URI: lossless, so tiles show exactly what the model produced."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def gif_uri(data: bytes) -> str:
    """GIF bytes -> data URI, so the page needs no side files."""
    return "data:image/gif;base64," + base64.b64encode(data).decode("ascii")


def fit_tile(rgb: np.ndarray) -> np.ndarray:
    """Upscale small crops (nearest neighbour, so pixels stay pixels) and shrink big images."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    if side < MIN_TILE:
        return upscale(rgb, math.ceil(MIN_TILE / side))
    if side > MAX_TILE:
        s = MAX_TILE / side
        return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BOX))
    return rgb


def placeholder(shape: tuple[int, int], text: str) -> np.ndarray:
    """A grey tile saying what is missing, the size the real tile would have had."""
    h, w = fit_tile(np.zeros((*shape, 3), np.uint8)).shape[:2]
    im = Image.new("RGB", (w, h), (70, 70, 70))
    draw = ImageDraw.Draw(im)
    for i, line in enumerate(text.split("\n")):
        draw.text((4, 4 + 12 * i), line[: max(4, w // 6)], fill=(230, 230, 230))
    return np.asarray(im)


def diff_tile(diff: np.ndarray, scale: float) -> np.ndarray:
    """CHW difference -> the per-channel signed-difference maps side by side, 3 px apart."""
    tiles = [fit_tile(signed_difference(d, scale)) for d in diff]
    gap = np.full((tiles[0].shape[0], 3, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for t in tiles:
        parts += [t, gap]
    return np.concatenate(parts[:-1], axis=1)


@dataclass
class Rendered:
    """Data URIs of one image set's tiles, keyed by what they show."""

    source: str
    reconstruction: str
    outputs: dict[str, str]
    diffs: dict[str, str]
    gifs: dict[str, str]
    source_missing: bool


def render_set(s: ImageSet, scales: Mapping[str, float]) -> Rendered:
    """Encode every tile of one image set once; galleries, flicker cards and strips share the URIs."""
    shape = next((x.shape[1:] for x in [s.source, s.reconstruction, *s.outputs.values()] if x is not None), (24, 24))
    src_rgb = fit_tile(composite(s.source)) if s.source is not None else placeholder(shape, "source\nnot found")
    rec_rgb = (fit_tile(composite(s.reconstruction)) if s.reconstruction is not None
               else placeholder(shape, "reconstruction\nunreadable"))
    rec_uri = png_uri(rec_rgb)
    outputs, diffs, gifs = {}, {}, {}
    for t, x in s.outputs.items():
        if t == s.condition:  # the reconstruction: its tile is shared
            outputs[t] = rec_uri
            continue
        out_rgb = fit_tile(composite(x)) if x is not None else placeholder(shape, "translation\nunreadable")
        outputs[t] = png_uri(out_rgb)
        if x is not None and s.source is not None and x.shape == s.source.shape:
            diffs[t] = png_uri(diff_tile(x - s.source, scales.get(t, 1.0)))
        else:
            diffs[t] = png_uri(placeholder(shape, "no difference\n(source missing)"))
        before, label = (src_rgb, "source") if s.source is not None else (rec_rgb, "reconstruction")
        gifs[t] = gif_uri(flicker_gif([before, out_rgb], [f"{label} ({s.condition})", f"-> {t}"]))
    return Rendered(source=png_uri(src_rgb), reconstruction=rec_uri, outputs=outputs, diffs=diffs, gifs=gifs,
                    source_missing=s.source is None)


def diff_scales(sets: Sequence[ImageSet], targets: Sequence[str]) -> dict[str, float]:
    """One colour scale per target (99.5th percentile of |difference|), so rows of a gallery compare."""
    scales = {}
    for t in targets:
        d = [np.abs(s.outputs[t] - s.source).ravel() for s in sets
             if s.source is not None and s.outputs.get(t) is not None and s.outputs[t].shape == s.source.shape]
        scales[t] = float(np.percentile(np.concatenate(d), 99.5)) if d else 1.0
        scales[t] = scales[t] if scales[t] > 0 else 1.0
    return scales
