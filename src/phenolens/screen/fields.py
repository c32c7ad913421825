"""A screen as phenolens sees it: fields of view, each with named channels, a condition and metadata.

Why a type of its own: a high-content screen does not come as one multi-channel file per image.
It comes as one file per channel per site (`B04_s1_w1.tif`, `B04_s1_w2.tif`), or as vendor files
holding every channel, and it is described by an image table (CellProfiler's LoadData CSV) or by
file names. Whatever the source, `phenolens crop` needs the same thing per field: where each named
channel's pixels are, which condition the field belongs to, every piece of metadata to carry into
the crops' manifest, and the plate (illumination and intensity are corrected per plate).

Sources of fields: `screen/loaddata.py` (an image table), `screen/pattern.py` (a folder of
per-channel files and a file-name pattern), `screen/vendor.py` (OME-TIFF, OME-Zarr, ND2, CZI, LIF
through bioio).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from phenolens.errors import PhenolensError


@dataclass(frozen=True)
class VendorSelection:
    """Which plane of a vendor file is a field: scene (name or index), timepoint, z (index or 'max')."""

    scene: str | int | None = None
    timepoint: int = 0
    z: int | str = 0


@dataclass(frozen=True)
class ChannelSource:
    """Where one channel's pixels are: a single-channel file, or channel INDEX of a multi-channel file."""

    path: Path
    index: int | None = None


@dataclass
class Field:
    """One field of view (a site of a well of a plate).

    KEY is unique in the screen and safe in file names (crops are named after it); CHANNELS maps each
    channel name to its source, in the screen's channel order; META holds every metadata column of
    the source, in order (LoadData's `Metadata_*`, a pattern's fields); PLATE groups fields for
    illumination correction and intensity normalisation ("" when the screen names no plate).
    """

    key: str
    condition: str
    channels: dict[str, ChannelSource]
    meta: dict[str, str] = field(default_factory=dict)
    plate: str = ""
    vendor: VendorSelection | None = None  # set for fields read through bioio

    @property
    def channel_names(self) -> list[str]:
        return list(self.channels)

    def files(self) -> list[Path]:
        """The distinct files this field is read from, in channel order."""
        return list(dict.fromkeys(src.path for src in self.channels.values()))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_key(*parts: str) -> str:
    """A file-name-safe field key from metadata values ('Plate 1', 'B04', '1' -> 'Plate-1_B04_1')."""
    text = "_".join(_UNSAFE.sub("-", str(p)).strip("-") for p in parts if str(p) != "")
    return text or "field"


def check_unique_keys(fields: Sequence[Field], source: str) -> None:
    """Two fields with one key would write the same crop files: refuse, naming both."""
    seen: dict[str, Field] = {}
    for f in fields:
        if f.key in seen:
            a, b = seen[f.key], f
            raise PhenolensError(f"{source}: two fields have the same identity {f.key!r} "
                                 f"({a.files()[0]} and {b.files()[0]}); add the metadata that tells them apart")
        seen[f.key] = f


def check_same_channels(fields: Sequence[Field], source: str) -> list[str]:
    """Every field must hold the same channels in the same order; returns that order."""
    if not fields:
        raise PhenolensError(f"{source}: no fields of view found")
    names = fields[0].channel_names
    for f in fields[1:]:
        if f.channel_names != names:
            raise PhenolensError(f"{source}: field {f.key} has channels {', '.join(f.channel_names)} but field "
                                 f"{fields[0].key} has {', '.join(names)}; every field needs the same channels")
    return names


def parse_channel_map(text: str | None, option: str = "--channel-names") -> list[tuple[str, str]] | None:
    """'w1=DNA,w2=Actin' -> [('w1','DNA'), ('w2','Actin')] (order kept); 'DNA,Actin' -> names only."""
    if text is None or not str(text).strip():
        return None
    out: list[tuple[str, str]] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        token, _, name = part.partition("=")
        token, name = token.strip(), (name.strip() if _ else token.strip())
        if not token or not name:
            raise PhenolensError(f"{option} {text!r}: expected TOKEN=NAME pairs separated by commas, like w1=DNA,w2=Actin")
        out.append((token, name))
    names = [n for _, n in out]
    if len(set(names)) != len(names):
        raise PhenolensError(f"{option} {text!r}: a channel name is given twice")
    return out


def bit_depth_name(dtype: np.dtype | str) -> str:
    """'uint8' -> '8-bit', 'uint16' -> '16-bit', 'float32' -> 'float32'."""
    d = np.dtype(dtype)
    return f"{d.itemsize * 8}-bit" if d.kind in "ui" else d.name


__all__ = ["ChannelSource", "Field", "VendorSelection", "bit_depth_name", "check_same_channels",
           "check_unique_keys", "parse_channel_map", "safe_key"]
