"""Flicker GIFs: the source and its translation alternating in place.

A subtle phenotype (a slightly bigger nucleus, a dimmer stain) is hard to see between two images
side by side but jumps out when they alternate at the same spot, so every (source, target) pair
gets a small looping GIF. Each frame carries its label, which also keeps two identical images
from being merged into one frame by the GIF encoder.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

LABEL_HEIGHT = 14
FRAME_MS = 600


def labelled_frame(rgb: np.ndarray, text: str, label_height: int = LABEL_HEIGHT) -> Image.Image:
    """HW3 uint8 -> RGB image with a black label bar on top, so a viewer knows which frame is showing."""
    tile = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    frame = Image.new("RGB", (tile.width, tile.height + label_height), "black")
    frame.paste(tile, (0, label_height))
    max_chars = max(4, tile.width // 6)  # the default bitmap font is about 6 px a character
    ImageDraw.Draw(frame).text((3, 1), text[:max_chars], fill="white")
    return frame


def flicker_gif(frames: Sequence[np.ndarray], labels: Sequence[str], duration_ms: int = FRAME_MS) -> bytes:
    """Encode HW3 uint8 frames (same size) as a GIF that loops forever, DURATION_MS per frame."""
    if len(frames) != len(labels) or len(frames) < 2:
        raise ValueError("flicker_gif needs at least two frames and one label per frame")
    images = [labelled_frame(f, t) for f, t in zip(frames, labels)]
    size = images[0].size
    images = [im if im.size == size else im.resize(size, Image.NEAREST) for im in images]
    # one adaptive palette per frame: composites rarely use more than 256 distinct colours at this size
    pal = [im.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE) for im in images]
    buf = io.BytesIO()
    pal[0].save(buf, format="GIF", save_all=True, append_images=pal[1:], duration=duration_ms, loop=0,
                optimize=False, disposal=1)
    return buf.getvalue()
