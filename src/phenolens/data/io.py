"""Read and write microscopy images (TIFF 8/16-bit/float, PNG) as raw float32 CHW arrays.

Readers return the file's *raw* intensities (no scaling) plus an `ImageLayout` that remembers how
the file stored them, so `write_image` can give back the same kind of file: a 16-bit 2-channel
channel-first TIFF in gives a 16-bit 2-channel channel-first TIFF out, a PNG in gives a PNG out.
Any problem with a file becomes a one-line `PhenolensError` naming it; raw tifffile / Pillow
exceptions never escape. Every image phenolens reads comes through `read_image`, so the checks that
keep a result from being silently wrong live here: NaN/inf pixels are refused (they would turn a
whole translation or a training run into NaN), and so are images too large to hold in memory
(`MAX_IMAGE_VALUES`, judged from the file's header before any pixel is read).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tifffile
from PIL import Image

from phenolens.errors import PhenolensError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")

# tifffile series axes whose first (non-YX) axis holds channels / planes.
_CHANNEL_FIRST_AXES = set("CSQIZTRHEVLPAM")
# tifffile log messages that mean the file is damaged even though it parsed.
_DAMAGE_MARKERS = ("invalid page offset", "failed to reshape", "truncat", "corrupt")
# Largest image read whole: 2**28 values (all channels together; 1 GiB as float32, e.g. 16384 x 16384
# x 1 channel or 8192 x 8192 x 4). Larger images (whole slides, stitched plates) must be tiled into
# smaller images first; reading one whole would exhaust memory.
MAX_IMAGE_VALUES = 2 ** 28


@dataclass(frozen=True)
class ImageLayout:
    """How a file stored its pixels, so an output can be written the same way."""

    format: str  # 'tiff' | 'png'
    dtype: str  # numpy dtype name of the stored pixels: 'uint16', 'uint8', 'float32', ...
    axes: str  # 'YX' (1 channel), 'CYX' (channel-first / multi-page), 'YXC' (channel-last, e.g. RGB)
    n_channels: int  # channels in the file, before any selection
    channels: tuple[int, ...] | None = None  # file channels selected with --channels; None = all


def parse_channels(text: str | None) -> list[int] | None:
    """'0,2,1' -> [0, 2, 1]; None or '' -> None (all channels)."""
    if text is None:
        return None
    text = str(text).strip()
    if not text:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise PhenolensError(f"--channels {text!r}: expected comma-separated channel indices "
                                 f"counted from 0, like 0,2,1")
        out.append(int(part))
    if len(set(out)) != len(out):
        raise PhenolensError(f"--channels {text!r}: a channel is listed twice")
    return out


# ----------------------------------------------------------------------------------------- read

def read_image(path: str | Path, channels: Sequence[int] | None = None) -> tuple[np.ndarray, ImageLayout]:
    """Read PATH as float32 (C, H, W) in the file's raw units, channels in the order given.

    Refused with a one-line `PhenolensError` naming the file: unreadable or damaged files, images
    above `MAX_IMAGE_VALUES` values (tile them first; checked before reading pixels), and NaN or
    infinite pixels in the channels used.
    """
    path = Path(path)
    if not path.exists():
        raise PhenolensError(f"{path}: file does not exist")
    if not path.is_file():
        raise PhenolensError(f"{path}: is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            chw, layout = _read_tiff(path)
        elif suffix == ".png":
            chw, layout = _read_png(path)
        else:
            raise PhenolensError(f"{path}: unsupported image type {path.suffix!r} "
                                 f"(use {', '.join(IMAGE_SUFFIXES)})")
    except PhenolensError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # any tifffile / Pillow / zlib / struct error means a damaged file
        raise PhenolensError(f"{path}: cannot read image (truncated or not an image: {_one_line(exc)})") from None
    if chw.ndim != 3 or chw.shape[1] < 1 or chw.shape[2] < 1:
        raise PhenolensError(f"{path}: cannot read image (unexpected pixel array shape {chw.shape})")
    if channels is not None:
        channels = tuple(int(c) for c in channels)
        n = chw.shape[0]
        bad = [c for c in channels if c < 0 or c >= n]
        if bad:
            raise PhenolensError(f"--channels {','.join(map(str, channels))}: {path} has {n} channel(s) "
                                 f"(indices 0..{n - 1}), no channel {bad[0]}")
        chw = chw[list(channels)]
        layout = ImageLayout(layout.format, layout.dtype, layout.axes, layout.n_channels, channels)
    chw = np.ascontiguousarray(chw, dtype=np.float32)
    if layout.dtype.startswith(("float", "complex")):
        bad = int(chw.size - np.count_nonzero(np.isfinite(chw)))
        if bad:
            raise PhenolensError(f"{path}: has {bad} NaN/inf pixels (of {chw.size}); phenolens cannot translate, "
                                 "train on or measure them: replace them (e.g. by 0) or leave the file out")
    return chw, layout


def _check_size(path: Path, shape: Sequence[int]) -> None:
    """Refuse an image too large to read whole, from its header's shape (no pixel read yet)."""
    n = int(np.prod([int(d) for d in shape], dtype=np.float64))
    if n > MAX_IMAGE_VALUES:
        dims = " x ".join(str(int(d)) for d in shape)
        raise PhenolensError(f"{path}: image is too large to read whole ({dims} = {n:,} values; the limit is "
                             f"{MAX_IMAGE_VALUES:,} = 2**28 values per image): tile it into smaller images, "
                             "e.g. 2048 x 2048 px, first")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[_LogCapture]:
    """Keep tifffile's warnings off the console and hand them to us to judge damage."""
    logger = logging.getLogger("tifffile")
    capture = _LogCapture()
    old_propagate = logger.propagate
    logger.addHandler(capture)
    logger.propagate = False
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.propagate = old_propagate


def stored_channel_names(path: str | Path, channels: Sequence[int] | None = None) -> list[str] | None:
    """The channel names a TIFF carries in its metadata (phenolens / tifffile's `Channel.Name`, ImageJ
    `Labels`, OME-XML), picked by CHANNELS; None when it names none. Why: `phenolens crop` writes the
    screen's channel names into every crop, and the names then label the model's features and report
    without the user typing them again."""
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            names = None
            desc = tif.pages[0].description if tif.pages else ""
            if desc.startswith("{"):
                names = (json.loads(desc).get("Channel") or {}).get("Name")
            elif tif.is_imagej and tif.imagej_metadata:
                names = tif.imagej_metadata.get("Labels")
            elif tif.is_ome and tif.ome_metadata:
                names = re.findall(r'<Channel [^>]*Name="([^"]*)"', tif.ome_metadata) or None
    except Exception:  # unreadable metadata: no names, the pixels are checked elsewhere
        return None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        return None
    if channels is not None:
        if any(c >= len(names) for c in channels):
            return None
        names = [names[c] for c in channels]
    return list(names)


def _read_tiff(path: Path) -> tuple[np.ndarray, ImageLayout]:
    with _quiet_tifffile() as log, tifffile.TiffFile(path) as tif:
        series = list(tif.series)
        if not series:
            raise PhenolensError(f"{path}: cannot read image (TIFF holds no image data)")
        if len(series) > 1 and all(len(s.shape) == 2 for s in series) \
                and len({(tuple(s.shape), s.dtype) for s in series}) == 1:
            # pages written one by one (one series per page): one page per channel
            _check_size(path, (len(series), *series[0].shape))
            data = np.stack([s.asarray() for s in series])
            axes = "CYX"
        else:
            _check_size(path, series[0].shape)
            data, letters = _squeeze_axes(series[0].asarray(), series[0].axes)
            try:
                axes = _tiff_axes(letters, data.shape)
            except PhenolensError as err:
                raise PhenolensError(f"{path}: {err}") from None
        damaged = [m for m in log.messages if any(k in m.lower() for k in _DAMAGE_MARKERS)]
    if damaged:
        raise PhenolensError(f"{path}: cannot read image (truncated or damaged TIFF: {_one_line(Exception(damaged[0]))})")
    if data.dtype.kind not in "uifb":
        raise PhenolensError(f"{path}: cannot read image (unsupported pixel type {data.dtype})")
    if data.dtype.kind == "b":
        data = data.astype(np.uint8)
    if axes == "YX":
        chw = data[None]
    elif axes == "CYX":
        chw = data
    else:
        chw = np.moveaxis(data, -1, 0)
    return chw.astype(np.float32), ImageLayout("tiff", data.dtype.name, axes, chw.shape[0])


def _squeeze_axes(data: np.ndarray, axes: str) -> tuple[np.ndarray, str]:
    """Drop length-1 axes other than Y and X (e.g. ImageJ's T=1, Z=1), keeping letters in step."""
    axes = str(axes or "")
    if len(axes) != data.ndim:
        axes = "?" * (data.ndim - 2) + "YX"
    keep = [i for i, (a, n) in enumerate(zip(axes, data.shape)) if n != 1 or a in "YX"]
    return data.reshape([data.shape[i] for i in keep]), "".join(axes[i] for i in keep)


def _tiff_axes(letters: str, shape: tuple[int, ...]) -> str:
    """Map a squeezed tifffile series (axes, shape) to 'YX' / 'CYX' / 'YXC'."""
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        if letters.endswith("S") and not letters.startswith("S"):  # 'YXS': samples per pixel, e.g. RGB
            return "YXC"
        if letters[:1] in _CHANNEL_FIRST_AXES and letters.endswith("YX"):
            return "CYX"
        # unknown axes: channel-last when the last axis is small and the first is not
        return "YXC" if shape[-1] <= 4 < shape[0] else "CYX"
    raise PhenolensError(f"cannot read image with {len(shape)}-D data (axes {letters}, shape {shape}); "
                         f"phenolens reads 2-D images with channels")


def _read_png(path: Path) -> tuple[np.ndarray, ImageLayout]:
    with Image.open(path) as img:
        if img.format != "PNG":
            raise PhenolensError(f"{path}: cannot read image (not a PNG file, looks like {img.format})")
        _check_size(path, (img.size[1], img.size[0], len(img.getbands())))
        img.load()
        mode = img.mode
        if mode == "1":
            img = img.convert("L")
        elif mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif mode == "PA":
            img = img.convert("RGBA")
        data = np.asarray(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L") or data.dtype.kind in "iu" and data.dtype.itemsize > 1:
        if data.min(initial=0) < 0 or data.max(initial=0) > 65535:
            raise PhenolensError(f"{path}: cannot read image (PNG values outside 16-bit range)")
        data = data.astype(np.uint16)
    if data.ndim == 2:
        return data[None].astype(np.float32), ImageLayout("png", data.dtype.name, "YX", 1)
    chw = np.moveaxis(data, -1, 0)
    return chw.astype(np.float32), ImageLayout("png", data.dtype.name, "YXC", chw.shape[0])


# ---------------------------------------------------------------------------------------- write

def write_image(path: str | Path, raw: np.ndarray, layout: ImageLayout) -> None:
    """Write raw float32 (C, H, W) to PATH in the layout's format, dtype and axes, atomically.

    Integer dtypes are rounded and clipped to their range. C must equal the number of selected
    channels (or the file's channel count when none were selected).
    """
    path = Path(path)
    raw = np.asarray(raw)
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim != 3:
        raise PhenolensError(f"{path}: cannot write an array of shape {raw.shape}, expected (C, H, W)")
    expected = len(layout.channels) if layout.channels is not None else layout.n_channels
    if raw.shape[0] != expected:
        raise PhenolensError(f"{path}: cannot write {raw.shape[0]} channel(s), the source layout has {expected}")
    data = _to_dtype(raw, layout.dtype)
    fmt = layout.format.lower()
    if fmt not in ("png", "tiff", "tif"):
        raise PhenolensError(f"{path}: unknown image format {layout.format!r} (expected tiff or png)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_name = _new_temp_file(path)
    except OSError as err:
        raise PhenolensError(f"{path}: cannot write there ({err.strerror or err})") from None
    try:
        if fmt == "png":
            _write_png(Path(tmp_name), data, path)
        else:
            _write_tiff(Path(tmp_name), data, layout.axes)
        os.replace(tmp_name, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(err, OSError):  # unwritable or full disk: one line naming the file, not a traceback
            raise PhenolensError(f"{path}: cannot write ({err.strerror or err})") from None
        raise


def _new_temp_file(path: Path) -> str:
    """An empty new file beside PATH for an atomic write, created with the user's umask.

    Not `tempfile.mkstemp`: its files are mode 0600, which `os.replace` would hand on to the output,
    so images would be unreadable to colleagues while the CSV beside them is not.
    """
    for _ in range(100):
        name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return name
        except FileExistsError:
            continue
    raise PhenolensError(f"{path}: cannot create a temporary file beside it")


def _to_dtype(raw: np.ndarray, dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    raw = np.asarray(raw, dtype=np.float64)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.clip(np.rint(np.nan_to_num(raw)), info.min, info.max).astype(dt)
    if dt.kind == "b":
        return raw > 0.5
    return raw.astype(dt)


def _write_tiff(tmp: Path, chw: np.ndarray, axes: str) -> None:
    c = chw.shape[0]
    if c == 1 and axes in ("YX", "YXC"):
        tifffile.imwrite(tmp, chw[0], compression="zlib", photometric="minisblack")
    elif axes == "YXC":
        yxc = np.ascontiguousarray(np.moveaxis(chw, 0, -1))
        if c == 3 and chw.dtype in (np.uint8, np.uint16):
            tifffile.imwrite(tmp, yxc, compression="zlib", photometric="rgb", planarconfig="contig")
        else:
            tifffile.imwrite(tmp, yxc, compression="zlib", photometric="minisblack", planarconfig="contig")
    else:  # 'CYX' (or more channels than a 'YX' source): one page per channel, reads back as (C, Y, X)
        tifffile.imwrite(tmp, np.ascontiguousarray(chw), compression="zlib", photometric="minisblack",
                         metadata={"axes": "CYX"})


def _write_png(tmp: Path, chw: np.ndarray, target: Path) -> None:
    """PNG holds 1 (L / I;16), 3 (RGB) or 4 (RGBA) channels; 2 channels are padded to RGB with 0."""
    c = chw.shape[0]
    if chw.dtype not in (np.uint8, np.uint16):
        raise PhenolensError(f"{target}: PNG cannot store {chw.dtype} pixels (only 8/16-bit)")
    if c == 1:
        img = Image.fromarray(np.ascontiguousarray(chw[0]))  # uint8 -> 'L', uint16 -> 'I;16'
    else:
        if chw.dtype != np.uint8:
            raise PhenolensError(f"{target}: Pillow cannot write {c}-channel 16-bit PNG; use a TIFF source")
        if c == 2:
            chw = np.concatenate([chw, np.zeros_like(chw[:1])])
        if chw.shape[0] not in (3, 4):
            raise PhenolensError(f"{target}: PNG cannot store {c} channels")
        img = Image.fromarray(np.ascontiguousarray(np.moveaxis(chw, 0, -1)))  # 'RGB' / 'RGBA'
    with open(tmp, "wb") as fh:
        img.save(fh, format="PNG")
