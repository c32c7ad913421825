"""Read one field of view whole: every named channel, from its own file or from a vendor file.

Plain TIFFs go through `phenolens.data.io.read_image` (tifffile, the fast path, with its one-line
errors for damaged files); vendor files through bioio (`screen/vendor.py`). The bit depth is
checked here because a field whose channels mix 8- and 16-bit files would be cropped into
intensities that mean different things per channel without anyone noticing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile

from phenolens.data.io import read_image
from phenolens.errors import PhenolensError
from phenolens.screen.fields import ChannelSource, Field, bit_depth_name


def read_field(field: Field) -> tuple[np.ndarray, str]:
    """(pixels as float32 (C, Y, X) in the files' raw units, the files' dtype name)."""
    if field.vendor is not None:
        from phenolens.screen.vendor import read_vendor

        planes: dict[Path, np.ndarray] = {}
        chans = []
        for src in field.channels.values():
            if src.path not in planes:
                planes[src.path] = read_vendor(src.path, field.vendor)[0]
            chans.append((planes[src.path][src.index or 0], src.path))
        dtypes = {str(a.dtype) for a, _ in chans}
        _check_one_depth(field, [(str(a.dtype), p) for a, p in chans])
        return np.stack([a.astype(np.float32) for a, _ in chans]), dtypes.pop()
    arrays, depths = [], []
    for name, src in field.channels.items():
        chw, layout = read_image(src.path, None if src.index is None else [src.index])
        if chw.shape[0] != 1:
            raise PhenolensError(f"{src.path}: holds {chw.shape[0]} channels but is listed as the single channel "
                                 f"{name!r} of field {field.key}; give the plane (LoadData Frame_{name}) or one file "
                                 "per channel")
        arrays.append(chw[0])
        depths.append((layout.dtype, src.path))
    _check_one_depth(field, depths)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        sizes = ", ".join(f"{p.name} {a.shape[1]}x{a.shape[0]}" for a, (_, p) in zip(arrays, depths))
        raise PhenolensError(f"field {field.key}: its channel files differ in size ({sizes})")
    return np.stack(arrays), depths[0][0]


def _check_one_depth(field: Field, depths: Sequence[tuple[str, Path]]) -> None:
    first = depths[0]
    for d in depths[1:]:
        if d[0] != first[0]:
            raise PhenolensError(f"field {field.key}: mixed bit depths: {first[1]} is {bit_depth_name(first[0])}, "
                                 f"{d[1]} is {bit_depth_name(d[0])}; convert the files to one bit depth first")


def stored_dtype(src: ChannelSource) -> str:
    """The dtype a plain TIFF stores, from its header (no pixels read); '' if unknown."""
    try:
        with tifffile.TiffFile(src.path) as tif:
            return str(tif.series[0].dtype) if tif.series else ""
    except Exception:  # damaged files are reported by read_field with the full reason
        return ""


def check_screen_bit_depth(fields: Sequence[Field]) -> str:
    """One bit depth for the whole screen, judged from the TIFF headers of the first and last field of
    every plate (a screen's depth changes with the plate or the channel, if at all; reading every
    header of 10^5 fields would take minutes): intensities of 8- and 16-bit files are on different
    scales, so mixing them would plant a fake phenotype. `check_field_depth` checks every other field
    as it is cropped. Returns the depth ('' if no plain TIFF was seen)."""
    ends: dict[str, list[Field]] = {}
    for f in fields:
        ends.setdefault(f.plate, []).append(f)
    sampled = [f for group in ends.values() for f in (group[:1] + group[-1:] if len(group) > 1 else group)]
    first: tuple[str, Path] | None = None
    for f in sampled:
        if f.vendor is not None:
            continue
        for src in f.channels.values():
            if src.path.suffix.lower() not in (".tif", ".tiff"):
                continue
            d = stored_dtype(src)
            if not d:
                continue
            if first is None:
                first = (d, src.path)
            elif d != first[0]:
                raise PhenolensError(f"mixed bit depths: {first[1]} is {bit_depth_name(first[0])} but {src.path} is "
                                     f"{bit_depth_name(d)}; convert the screen to one bit depth first")
    return first[0] if first else ""


def check_field_depth(field: Field, dtype: str, screen_dtype: str) -> None:
    """A field whose files differ in bit depth from the rest of the screen: one line naming it."""
    if screen_dtype and dtype != screen_dtype:
        raise PhenolensError(f"mixed bit depths: field {field.key} ({field.files()[0]}) is {bit_depth_name(dtype)} but "
                             f"the screen's other files are {bit_depth_name(screen_dtype)}; convert the screen to one "
                             "bit depth first")


__all__ = ["check_field_depth", "check_screen_bit_depth", "read_field", "stored_dtype"]
