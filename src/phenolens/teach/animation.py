"""The transition animation: an image blending into its counterfactual and back.

The DIFFusion user study (§4.3) taught with videos of each real image turning into its counterfactual:
seeing the change happen in place shows *where* it happens better than two stills. A GIF plays in any
browser and slide program, so it is always made (Pillow); an MP4 beside it is a convenience made only
when `imageio_ffmpeg` is installed, never a requirement.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from phenolens.report.flicker import labelled_frame

HOLD_MS = 700  # each end is held so the eye can settle on the real image and on the counterfactual
STEP_MS = 90  # a blend step: the whole change takes under a second, as in a short clip
MP4_FPS = 25


@dataclass
class Frame:
    """One frame of the animation: the picture (with its label bar) and how long it shows."""

    image: Image.Image
    duration_ms: int


def blend_weights(steps: int) -> list[float]:
    """Weights of the counterfactual there and back: 0, ..., 1, ..., >0 (the loop returns to 0)."""
    if steps < 2:
        raise ValueError("a transition needs at least 2 blend steps")
    forward = [k / (steps - 1) for k in range(steps)]
    return forward + forward[-2:0:-1]


def transition_frames(before: np.ndarray, after: np.ndarray, target: str, steps: int = 8,
                      before_label: str = "original") -> list[Frame]:
    """HW3 uint8 tiles of one size -> labelled frames blending BEFORE into AFTER and back.

    The label says how far the blend is, so a viewer pausing on a frame knows what is showing (and no two
    consecutive frames are identical, which the GIF encoder would merge)."""
    if before.shape != after.shape:
        raise ValueError(f"transition tiles differ in shape: {before.shape} vs {after.shape}")
    a = before.astype(np.float32)
    b = after.astype(np.float32)
    frames = []
    for w in blend_weights(steps):
        rgb = np.clip((1 - w) * a + w * b, 0, 255).round().astype(np.uint8)
        label = before_label if w == 0 else f"-> {target}" if w == 1 else f"{round(100 * w)}% -> {target}"
        frames.append(Frame(labelled_frame(rgb, label), HOLD_MS if w in (0, 1) else STEP_MS))
    return frames


def gif_bytes(frames: Sequence[Frame]) -> bytes:
    """A GIF that loops forever; one adaptive palette per frame (a blend has more colours than either end)."""
    pal = [f.image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE) for f in frames]
    buf = io.BytesIO()
    pal[0].save(buf, format="GIF", save_all=True, append_images=pal[1:], duration=[f.duration_ms for f in frames],
                loop=0, optimize=False, disposal=1)
    return buf.getvalue()


def _even_canvas(image: Image.Image, block: int = 16) -> np.ndarray:
    """The frame padded (black, bottom/right) to a multiple of BLOCK: H.264 encoders need even sides
    and imageio_ffmpeg would otherwise resize, blurring the pixels."""
    w, h = image.size
    canvas = Image.new("RGB", (-(-w // block) * block, -(-h // block) * block), "black")
    canvas.paste(image, (0, 0))
    return np.asarray(canvas)


def mp4_available() -> bool:
    """Whether `imageio_ffmpeg` can be imported, i.e. MP4s will be attempted (checked without importing it)."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def write_mp4(path: Path, frames: Sequence[Frame]) -> str | None:
    """Write the animation as PATH (an .mp4) when `imageio_ffmpeg` can be imported, atomically.

    Returns None when written, else the reason it was not (no imageio_ffmpeg, or ffmpeg failed): the
    MP4 is optional, so a missing or broken encoder never fails the pages."""
    try:
        ffmpeg = importlib.import_module("imageio_ffmpeg")
    except ImportError:
        return "imageio_ffmpeg is not installed"
    arrays = [_even_canvas(f.image) for f in frames]
    h, w = arrays[0].shape[:2]
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.mp4")  # ffmpeg picks the format by the extension
    try:
        writer = ffmpeg.write_frames(str(tmp), (w, h), fps=MP4_FPS, macro_block_size=1)
        writer.send(None)
        for frame, arr in zip(frames, arrays):
            for _ in range(max(1, round(frame.duration_ms * MP4_FPS / 1000))):
                writer.send(arr.tobytes())  # raw rgb24, as imageio_ffmpeg expects
        writer.close()
        os.replace(tmp, path)
    except Exception as err:  # any encoder failure only costs the optional MP4
        try:
            tmp.unlink()
        except OSError:
            pass
        return f"ffmpeg failed ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None
