"""Images as a person sees them: channel composites and signed differences as RGB uint8.

Every layer that shows an image (training sample grids, the report, the memorisation check's
pairs) draws channels with the same colours, so these helpers sit low, beside the readers, and
need nothing but numpy.
"""

from __future__ import annotations

import numpy as np

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
    """HW3 tile enlarged FACTOR times by repeating pixels (nearest neighbour), so pixels stay pixels."""
    return np.kron(tile, np.ones((factor, factor, 1), dtype=tile.dtype)) if factor > 1 else tile
