"""PNG grids a person can open: source | reconstruction | translations | signed difference.

Images are shown as colour composites of their channels (model space, [-1, 1]) and differences
per channel with a diverging blue-white-red map, blue = less signal in the translation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

# colour per channel for composites: blue, green, red, magenta, then yellow, cyan
CHANNEL_COLOURS = np.array([[0.2, 0.4, 1.0], [0.1, 1.0, 0.2], [1.0, 0.2, 0.1], [1.0, 0.2, 1.0],
                            [1.0, 1.0, 0.1], [0.1, 1.0, 1.0]], dtype=np.float32)


def composite(x: np.ndarray) -> np.ndarray:
    """CHW in [-1, 1] -> HW3 uint8, additive colour composite of the channels."""
    x01 = np.clip((np.asarray(x, dtype=np.float32) + 1) / 2, 0, 1)
    if x01.shape[0] == 1:
        rgb = np.repeat(x01[0][..., None], 3, axis=-1)
    else:
        colours = CHANNEL_COLOURS[np.arange(x01.shape[0]) % len(CHANNEL_COLOURS)]
        rgb = np.einsum("chw,ck->hwk", x01, colours)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def signed_difference(diff: np.ndarray, scale: float) -> np.ndarray:
    """HW difference -> HW3 uint8: blue (negative) - white (0) - red (positive), saturating at ±scale."""
    d = np.clip(np.asarray(diff, dtype=np.float32) / max(scale, 1e-8), -1, 1)
    pos, neg = np.clip(d, 0, 1), np.clip(-d, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def upscale(tile: np.ndarray, factor: int) -> np.ndarray:
    return np.kron(tile, np.ones((factor, factor, 1), dtype=tile.dtype)) if factor > 1 else tile


def translation_grid(rows: Sequence[dict], path: str | Path, columns: Sequence[str],
                     diff_target: str, channel_names: Sequence[str] | None = None, zoom: int = 2) -> Path:
    """Write one PNG; each row dict has 'source', 'reconstruction' and one key per target (CHW, [-1, 1]).

    Columns: source | reconstruction | each target | translation-to-`diff_target` minus source,
    one column per channel.
    """
    path = Path(path)
    first = rows[0]["source"]
    n_ch = first.shape[0]
    names = list(channel_names or [f"ch{c}" for c in range(n_ch)])
    diffs = [r[diff_target] - r["source"] for r in rows]
    scale = float(np.percentile(np.abs(np.stack(diffs)), 99.5)) or 1.0
    tiles_per_row = 2 + len(columns) + n_ch
    h, w = first.shape[1] * zoom, first.shape[2] * zoom
    pad, header, footer = 4, 16, 16
    canvas = Image.new("RGB", (tiles_per_row * (w + pad) + pad, header + len(rows) * (h + pad) + pad + footer),
                       "white")
    draw = ImageDraw.Draw(canvas)
    titles = ["source", "reconstruction", *[f"-> {c}" for c in columns], *[f"diff {n}" for n in names]]
    for j, title in enumerate(titles):
        draw.text((pad + j * (w + pad), 2), title[: max(4, w // 6)], fill="black")
    draw.text((pad, header + len(rows) * (h + pad) + pad), f"diff = translation to {diff_target} - source, "
              f"colour scale ±{scale:.2f} in [-1, 1] units (red = more signal, blue = less)", fill="black")
    for i, row in enumerate(rows):
        tiles = [composite(row["source"]), composite(row["reconstruction"])]
        tiles += [composite(row[c]) for c in columns]
        tiles += [signed_difference(diffs[i][c], scale) for c in range(n_ch)]
        for j, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(upscale(tile, zoom)), (pad + j * (w + pad), header + pad + i * (h + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
    return path
