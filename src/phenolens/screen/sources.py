"""Point phenolens at a screen, whatever form it takes, and get its fields.

SCREEN may be a LoadData CSV (`screen/loaddata.py`), a folder of per-channel files read with
`--pattern` (`screen/pattern.py`), or a vendor file / folder of vendor files (`screen/vendor.py`).
Channel naming is one option for all three, `--channel-names TOKEN=NAME,...`: it picks the
channels, orders them and names them (the token is a LoadData channel suffix, a pattern's
`{channel}` value or a vendor file's channel name). Names travel into the crops' files and manifest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from phenolens.data.records import natural_key
from phenolens.errors import PhenolensError
from phenolens.screen.conditions import ConditionRule
from phenolens.screen.fields import ChannelSource, Field, VendorSelection, check_same_channels
from phenolens.screen.loaddata import read_loaddata
from phenolens.screen.pattern import read_pattern
from phenolens.screen.platemap import read_platemap

_DNA_NAMES = re.compile(r"dna|dapi|hoechst|nucle|draq5|h2b", re.IGNORECASE)


@dataclass
class ScreenSpec:
    """What the user said about the screen (the CLI's options)."""

    screen: Path
    rule: ConditionRule
    pattern: str | None = None
    channel_names: Sequence[tuple[str, str]] | None = None
    vendor: VendorSelection = field(default_factory=VendorSelection)
    platemap: Path | None = None


@dataclass
class Screen:
    """The fields of a screen, its channel names in order, and a description of where they came from."""

    fields: list[Field]
    channels: list[str]
    source: str
    root: Path | None = None  # the table, folder or file the user named

    @property
    def inputs(self) -> list[Path]:
        """The screen and every file read, for the output folder's apartness check."""
        return ([self.root] if self.root else []) + [p for f in self.fields for p in f.files()]

    def nuclei_channel(self, name: str | None) -> int:
        """Index of the DNA channel: NAME when given, else the first channel named like a DNA stain."""
        if name:
            if name not in self.channels:
                raise PhenolensError(f"--nuclei-channel {name!r}: the screen has channels {', '.join(self.channels)}")
            return self.channels.index(name)
        for i, c in enumerate(self.channels):
            if _DNA_NAMES.search(c):
                return i
        raise PhenolensError(f"--nuclei-channel: none of the channels ({', '.join(self.channels)}) is named like a "
                             "DNA stain (DNA, DAPI, Hoechst); say which one holds the nuclei")


def open_screen(spec: ScreenSpec) -> Screen:
    """The fields of SPEC.screen (see the module docstring), checked to share one set of channels."""
    src = Path(spec.screen)
    if not src.exists():
        raise PhenolensError(f"{src}: does not exist")
    from phenolens.screen import vendor

    platemap = read_platemap(spec.platemap) if spec.platemap else None
    if src.is_file() and src.suffix.lower() == ".csv":
        if spec.pattern:
            raise PhenolensError(f"--pattern is for a folder of files; {src} is a LoadData table")
        fields = read_loaddata(src, spec.rule, [t for t, _ in spec.channel_names or []] or None, platemap)
        fields = [_renamed(f, spec.channel_names) for f in fields]
        how = f"LoadData table {src}"
    elif vendor.is_vendor_path(src) or (src.is_dir() and not spec.pattern and _vendor_files(src)):
        files = [src] if vendor.is_vendor_path(src) else _vendor_files(src)
        rule = spec.rule
        if platemap is not None:
            raise PhenolensError("--platemap: vendor files name no wells; give each folder's condition with --condition")
        if rule.constant is None:
            raise PhenolensError(f"{src}: vendor files carry no condition; give it with --condition NAME "
                                 "(one screen folder per condition)")
        fields = vendor.vendor_fields(files, spec.vendor, rule.constant)
        fields = [_renamed(f, spec.channel_names) for f in fields]
        how = f"{len(files)} vendor file(s) in {src}" if src.is_dir() else f"vendor file {src}"
    elif src.is_dir():
        if not spec.pattern:
            example = next((p.name for p in sorted(src.iterdir()) if p.is_file() and not p.name.startswith(".")), None)
            raise PhenolensError(f"{src}: a folder of per-channel files needs --pattern naming the parts of a file name, "
                                 f"e.g. --pattern \"{{well}}_s{{site}}_w{{channel}}.tif\""
                                 + (f" (first file: {example})" if example else " (the folder has no files)"))
        fields = read_pattern(src, spec.pattern, spec.rule, spec.channel_names, platemap)
        how = f"{len(fields)} field(s) matching --pattern {spec.pattern!r} in {src}"
    else:
        raise PhenolensError(f"{src}: expected a LoadData .csv, a folder of per-channel files with --pattern, "
                             "or microscope files (OME-TIFF, OME-Zarr, ND2, CZI, LIF)")
    channels = check_same_channels(fields, str(src))
    return Screen(fields, channels, how, src)


def _vendor_files(folder: Path) -> list[Path]:
    from phenolens.screen.vendor import is_vendor_path

    return sorted((p for p in folder.iterdir() if is_vendor_path(p)), key=lambda p: natural_key(p.name))


def _renamed(f: Field, names: Sequence[tuple[str, str]] | None) -> Field:
    """F with its channels picked, ordered and renamed by --channel-names (token -> name)."""
    if not names:
        return f
    missing = [t for t, _ in names if t not in f.channels]
    if missing:
        raise PhenolensError(f"--channel-names: field {f.key} has no channel {missing[0]!r} "
                             f"(it has: {', '.join(f.channels)})")
    chans: dict[str, ChannelSource] = {name: f.channels[t] for t, name in names}
    return Field(f.key, f.condition, chans, f.meta, f.plate, f.vendor)


__all__ = ["Screen", "ScreenSpec", "open_screen"]
