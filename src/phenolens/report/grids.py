"""PNG grids a person can open: source | reconstruction | translations | signed difference.

Images are shown as colour composites of their channels (model space, [-1, 1]) and differences
per channel with a diverging blue-white-red map, blue = less signal in the translation; both are
drawn by `phenolens.data.display`, which every layer that shows an image shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from phenolens.data.display import CHANNEL_COLOURS, composite, signed_difference, upscale

__all__ = ["CHANNEL_COLOURS", "composite", "signed_difference", "upscale", "translation_grid"]  # the report's names


def translation_grid(rows: Sequence[dict], path: str | Path, columns: Sequence[str],
                     diff_target: str, channel_names: Sequence[str] | None = None, zoom: int = 2,
                     caption_note: str = "") -> Path:
    """Write one PNG; each row dict has 'source', 'reconstruction' and one key per target (CHW, [-1, 1]),
    and optionally 'captions': one short text per image tile (source, reconstruction, each target),
    written under it (e.g. a classifier's probability; CAPTION_NOTE says what they are).

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
    pad, header, footer = 4, 16, 16 + (14 if caption_note else 0)
    cap = 12 if any("captions" in r for r in rows) else 0
    h_row = h + pad + cap
    canvas = Image.new("RGB", (tiles_per_row * (w + pad) + pad, header + len(rows) * h_row + pad + footer),
                       "white")
    draw = ImageDraw.Draw(canvas)
    titles = ["source", "reconstruction", *[f"-> {c}" for c in columns], *[f"diff {n}" for n in names]]
    for j, title in enumerate(titles):
        draw.text((pad + j * (w + pad), 2), title[: max(4, w // 6)], fill="black")
    draw.text((pad, header + len(rows) * h_row + pad), f"diff = translation to {diff_target} - source, "
              f"colour scale ±{scale:.2f} in [-1, 1] units (red = more signal, blue = less)", fill="black")
    if caption_note:
        draw.text((pad, header + len(rows) * h_row + pad + 14), caption_note, fill="black")
    for i, row in enumerate(rows):
        tiles = [composite(row["source"]), composite(row["reconstruction"])]
        tiles += [composite(row[c]) for c in columns]
        tiles += [signed_difference(diffs[i][c], scale) for c in range(n_ch)]
        for j, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(upscale(tile, zoom)), (pad + j * (w + pad), header + pad + i * h_row))
        for j, text in enumerate(row.get("captions", [])):
            draw.text((pad + j * (w + pad), header + pad + i * h_row + h), str(text)[: max(4, w // 6)], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
    return path
