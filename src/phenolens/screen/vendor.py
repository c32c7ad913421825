"""Fields of view from microscope vendor files (OME-TIFF, OME-Zarr, ND2, CZI, LIF) through bioio.

Why: many screens do not come as plain per-channel TIFFs but as the microscope's own files, which
hold every channel (and often several scenes / positions, timepoints and z-planes) with the channel
names in their metadata. Reading them directly spares a conversion step that loses those names.
The reading goes through bioio (Brown et al., "BioIO: an open-source Python library for reading and
writing microscopy images", the successor of AICSImageIO), whose per-format plugins read each
vendor's format; OME-TIFF and OME-Zarr follow the Open Microscopy Environment's data model
(OME-XML, Goldberg et al., Genome Biology 2005) and its next-generation file format (OME-NGFF,
Moore et al., Nature Methods 2021).

bioio and its plugins are heavy (dask, xarray, pandas, zarr, ...), so they are optional extras:
`pip install 'phenolens[ome]'` (OME-TIFF, OME-Zarr), `[nd2]`, `[czi]`, `[lif]`. OME-TIFF is also
read without them, with tifffile (which parses OME-XML), so it works in the default install.

A field is one plane of one scene: the selection (`VendorSelection`) names the scene (None = the
first, an index or a scene name), the timepoint and the z-plane (an index, or 'max' for a maximum
projection over Z). Pixels come back as (C, Y, X) in the file's own dtype, never rescaled. Every
problem becomes a one-line `PhenolensError` naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import tifffile

from phenolens.data.io import _DAMAGE_MARKERS, _check_size, _LogCapture, _one_line
from phenolens.errors import PhenolensError
from phenolens.screen.fields import ChannelSource, Field, VendorSelection, check_unique_keys, safe_key

VENDOR_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.zarr", ".nd2", ".czi", ".lif")

# suffix -> (bioio plugin module, phenolens extra that installs it)
EXTRA_FOR_SUFFIX: dict[str, tuple[str, str]] = {
    ".ome.tif": ("bioio_ome_tiff", "ome"),
    ".ome.tiff": ("bioio_ome_tiff", "ome"),
    ".ome.zarr": ("bioio_ome_zarr", "ome"),
    ".nd2": ("bioio_nd2", "nd2"),
    ".czi": ("bioio_czi", "czi"),
    ".lif": ("bioio_lif", "lif"),
}

_FORMAT_NAME = {".ome.tif": "OME-TIFF", ".ome.tiff": "OME-TIFF", ".ome.zarr": "OME-Zarr",
                ".nd2": "ND2", ".czi": "CZI", ".lif": "LIF"}
# Loggers of bioio and what it uses: kept off the console while we read (their warnings are
# multi-line and about internals; what matters reaches the user as our one-line error).
_QUIET_LOGGERS = ("bioio", "bioio_base", "bioio_ome_tiff", "bioio_ome_zarr", "bioio_nd2", "bioio_czi",
                  "bioio_lif", "ome_types", "xmlschema", "tifffile", "zarr", "fsspec", "numcodecs")
# Channel names writers invent when the user gave none (bioio: 'C:0', OME ids: 'Channel:0:1').
_PLACEHOLDER_NAME = re.compile(r"^(C:\d+|Channel:\d+:\d+|Channel\s*\d+)$")
_SAMPLE_NAMES = ("R", "G", "B", "A")
_NOT_OME = "{path}: has no OME-XML metadata, so it is not an OME-TIFF; rename it to .tif to read it as a plain TIFF"
_LISTED = 10  # at most this many scene names in an error message


class VendorInfo(NamedTuple):
    """What a vendor file holds for a selection, from its metadata alone (no pixels read)."""

    channels: list[str]
    dtype: np.dtype
    shape: tuple[int, int]  # (Y, X)
    scenes: list[str]


# ----------------------------------------------------------------------------------- suffixes

def vendor_suffix(path: str | Path) -> str | None:
    """The vendor suffix of PATH ('.ome.tif', '.nd2', ...), case-insensitive; None for other files."""
    name = Path(path).name.lower()
    for suffix in sorted(VENDOR_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def is_vendor_path(path: str | Path) -> bool:
    """True for a file (or an .ome.zarr directory) phenolens reads through bioio."""
    return vendor_suffix(path) is not None


def vendor_stem(path: str | Path) -> str:
    """The file name without its vendor suffix ('A01.ome.tiff' -> 'A01')."""
    name = Path(path).name
    suffix = vendor_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else Path(path).stem


# --------------------------------------------------------------------------------- public API

def read_vendor(path: str | Path, selection: VendorSelection) -> tuple[np.ndarray, list[str]]:
    """The selected plane of PATH as (C, Y, X) in the file's own dtype, and its channel names.

    Sizes, scene, timepoint and z are checked against the metadata before any pixel is read.
    """
    path = Path(path)
    with _open(path) as src:
        info, t, z = _select(path, src, selection)
        _check_size(path, (len(info.channels), *info.shape))
        data = _guard(path, src.read_max, t) if z == "max" else _guard(path, src.read_plane, t, z)
    data = np.asarray(data)
    data = data.astype(data.dtype.newbyteorder("="), copy=False)
    if data.shape != (len(info.channels), *info.shape):
        raise PhenolensError(f"{path}: cannot read image (got pixels of shape {data.shape}, the metadata "
                             f"says {(len(info.channels), *info.shape)}); the file may be damaged")
    return data, info.channels


def vendor_info(path: str | Path, selection: VendorSelection) -> VendorInfo:
    """(channel names, dtype, (Y, X), scenes) of the selected plane, from metadata only.

    Refuses, in one line each, what `read_vendor` would refuse: a missing reader, a damaged file,
    a scene, timepoint or z-plane the file does not have.
    """
    path = Path(path)
    with _open(path) as src:
        return _select(path, src, selection)[0]


def vendor_fields(paths: Sequence[Path], selection: VendorSelection, condition: str) -> list[Field]:
    """One `Field` per vendor file (or per scene of each file when selection.scene == 'all').

    Every file's metadata is read up front, so a missing plugin, a damaged file or a missing scene
    is reported before any cropping starts.
    """
    fields: list[Field] = []
    for p in paths:
        fields.extend(_file_fields(Path(p), selection, condition))
    check_unique_keys(fields, "vendor files")
    return fields


def _file_fields(path: Path, selection: VendorSelection, condition: str) -> list[Field]:
    """The fields of one file, its metadata read once (every scene of it for scene 'all')."""
    out: list[Field] = []
    with _open(path) as src:
        if selection.scene == "all":
            for i, name in enumerate(list(src.scenes)):
                one = replace(selection, scene=i)
                out.append(_field(path, one, condition, _select(path, src, one)[0], name, name))
        else:
            info = _select(path, src, selection)[0]
            name = info.scenes[_scene_index(path, info.scenes, selection.scene)]
            tag = "" if selection.scene is None else str(selection.scene)
            out.append(_field(path, selection, condition, info, name, tag))
    return out


def _field(path: Path, selection: VendorSelection, condition: str, info: VendorInfo, scene_name: str,
           key_tag: str) -> Field:
    return Field(key=safe_key(vendor_stem(path), key_tag), condition=condition,
                 channels={name: ChannelSource(path, index=i) for i, name in enumerate(info.channels)},
                 meta={"Metadata_File": path.name, "Metadata_Scene": scene_name,
                       "Metadata_Timepoint": str(selection.timepoint), "Metadata_Z": str(selection.z)},
                 vendor=selection)


# ---------------------------------------------------------------------------- selection checks

def _select(path: Path, src: "_Source", selection: VendorSelection) -> tuple[VendorInfo, int, int | str]:
    """Set the scene, check timepoint and z against the metadata; (info, t, z)."""
    scenes = list(src.scenes)
    index = _scene_index(path, scenes, selection.scene)
    _guard(path, src.set_scene, index)
    sizes = _guard(path, src.sizes)
    where = f"scene {scenes[index]!r}" if len(scenes) > 1 else "the file"
    t = _plane_index(path, selection.timepoint, sizes["T"], "timepoint", where)
    z = "max" if str(selection.z).strip().lower() == "max" else \
        _plane_index(path, selection.z, sizes["Z"], "z-plane", where, "or 'max' for a maximum projection")
    names = _channel_names(_guard(path, src.channel_names), sizes["C"])
    dtype = np.dtype(_guard(path, lambda: src.dtype)).newbyteorder("=")
    info = VendorInfo(names, dtype, (sizes["Y"], sizes["X"]), scenes)
    return info, t, z


def _scene_index(path: Path, scenes: Sequence[str], scene: str | int | None) -> int:
    """The index of SCENE (None = first, an index, a scene name, or digits) among SCENES."""
    if not scenes:
        raise PhenolensError(f"{path}: holds no image (no scenes in its metadata)")
    if scene is None:
        return 0
    if isinstance(scene, str) and scene in scenes:
        return list(scenes).index(scene)
    if isinstance(scene, (int, np.integer)) or (isinstance(scene, str) and scene.strip().isdigit()):
        i = int(scene)
        if 0 <= i < len(scenes):
            return i
    shown = ", ".join(repr(s) for s in scenes[:_LISTED]) + (", ..." if len(scenes) > _LISTED else "")
    what = "scene 'all' here (it chooses every scene of every file)" if scene == "all" else f"scene {scene!r}"
    rng = f"0..{len(scenes) - 1}" if len(scenes) > 1 else "0"
    raise PhenolensError(f"{path}: no {what}; the file has {len(scenes)} scene(s): {shown} "
                         f"(choose one by name or by index {rng})")


def _plane_index(path: Path, value: int | str, size: int, what: str, where: str, extra: str = "") -> int:
    text = str(value).strip()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        i = int(value)
    elif text.isdigit():
        i = int(text)
    else:
        i = -1
    if 0 <= i < size:
        return i
    rng = f"index 0..{size - 1}" if size > 1 else "index 0"
    hint = f" {extra}" if extra else ""
    raise PhenolensError(f"{path}: no {what} {value!r}; {where} has {size} {what}(s) (choose an {rng}{hint})")


def _channel_names(raw: Sequence[Any] | None, n: int) -> list[str]:
    """The file's channel names, 'chI' for unnamed ones (or when the file names none), made unique."""
    raw = list(raw or [])
    if len(raw) != n:
        raw = [""] * n
    names: list[str] = []
    for i, name in enumerate(raw):
        text = " ".join(str(name if name is not None else "").split())
        if not text or _PLACEHOLDER_NAME.match(text):
            text = f"ch{i}"
        if text in names:
            text = f"{text}-{i}"
        names.append(text)
    return names


# ----------------------------------------------------------------------------- opening a file

@contextlib.contextmanager
def _quiet() -> Iterator[_LogCapture]:
    """Keep bioio's / tifffile's log records and Python warnings off the console while reading."""
    capture = _LogCapture()
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    saved = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(capture)
        lg.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield capture
    finally:
        for lg, propagate in zip(loggers, saved):
            lg.removeHandler(capture)
            lg.propagate = propagate


def _guard(path: Path, func: Any, *args: Any) -> Any:
    """Call FUNC; any error from a reader becomes one line naming the file."""
    try:
        return func(*args)
    except (PhenolensError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise PhenolensError(f"{path}: cannot read {_FORMAT_NAME.get(vendor_suffix(path) or '', 'image')} "
                             f"file (damaged or not that format: {_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    """The useful end of a reader's error: bioio wraps the plugin's reason in lines naming the path."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip(" -")]
    text = lines[-1] if lines else ""
    text = re.sub(r"^.*?does not support the image: '[^']*'\.?\s*", "", text)
    text = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", text)
    return _one_line(Exception(text)) if text else _one_line(exc)


@contextlib.contextmanager
def _open(path: Path) -> Iterator["_Source"]:
    suffix = vendor_suffix(path)
    if suffix is None:
        raise PhenolensError(f"{path}: not a microscope file phenolens reads through bioio "
                             f"(expected one of {', '.join(VENDOR_SUFFIXES)})")
    if not path.exists():
        raise PhenolensError(f"{path}: file does not exist")
    if suffix == ".ome.zarr" and not path.is_dir():
        raise PhenolensError(f"{path}: an OME-Zarr image is a directory, this is a file")
    if suffix != ".ome.zarr" and not path.is_file():
        raise PhenolensError(f"{path}: is not a file")
    with _quiet() as log:
        if suffix in (".ome.tif", ".ome.tiff") and _optional_module(EXTRA_FOR_SUFFIX[suffix][0]) is None:
            with _guarded_tiff(path, log) as src:
                yield src
        else:
            reader = _plugin_reader(path, suffix)
            if suffix in (".ome.tif", ".ome.tiff"):
                _require_ome_xml(path)
            yield _guard(path, _BioSource, path, reader)


def _require_ome_xml(path: Path) -> None:
    """A '.ome.tif' without OME-XML (e.g. an ImageJ TIFF renamed) gets the same advice on both paths."""
    try:
        with tifffile.TiffFile(path) as tif:
            is_ome = bool(tif.is_ome)
    except Exception as exc:
        raise PhenolensError(f"{path}: cannot read OME-TIFF file (damaged or not a TIFF: {_one_line(exc)})") from None
    if not is_ome:
        raise PhenolensError(_NOT_OME.format(path=path))


def _optional_module(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _plugin_reader(path: Path, suffix: str) -> type:
    """The Reader class of SUFFIX's bioio plugin, or a one-line error naming what to install."""
    module, extra = EXTRA_FOR_SUFFIX[suffix]
    if _optional_module("bioio") is None:
        raise PhenolensError(f"reading {path} needs bioio: pip install 'phenolens[{extra}]'")
    plugin = module.replace("_", "-")
    fmt = _FORMAT_NAME[suffix]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if exc.name not in (None, module):  # installed, but something it needs is broken
            raise PhenolensError(f"{path}: the {plugin} plugin for {fmt} files fails to import "
                                 f"({_one_line(exc)}); reinstall it: pip install 'phenolens[{extra}]'") from None
        raise PhenolensError(f"{path}: reading {fmt} files needs the {plugin} plugin: "
                             f"pip install 'phenolens[{extra}]'") from None
    return mod.Reader


# --------------------------------------------------------------------------- sources of pixels

class _Source:
    """What phenolens needs from a reader: scenes, sizes, names, dtype, one plane or a Z maximum."""

    scenes: Sequence[str]

    def set_scene(self, index: int) -> None: ...
    def sizes(self) -> dict[str, int]: ...  # T, C, Z, Y, X
    def channel_names(self) -> list[str] | None: ...
    @property
    def dtype(self) -> np.dtype: ...
    def read_plane(self, t: int, z: int) -> np.ndarray: ...  # (C, Y, X)
    def read_max(self, t: int) -> np.ndarray: ...  # (C, Y, X), maximum over Z


class _BioSource(_Source):
    """A file read through bioio's BioImage with one plugin's Reader (no plugin discovery)."""

    def __init__(self, path: Path, reader: type) -> None:
        from bioio import BioImage

        self.path = path
        self.image = BioImage(path, reader=reader)
        self.scenes = list(self.image.scenes)

    def set_scene(self, index: int) -> None:
        if self.image.current_scene_index != index:
            self.image.set_scene(index)

    def _dims(self) -> dict[str, int]:
        return dict(zip(self.image.dims.order, self.image.dims.shape))

    def _samples_are_channels(self) -> bool:
        d = self._dims()
        return d.get("S", 1) > 1 and d["C"] == 1

    def sizes(self) -> dict[str, int]:
        d = self._dims()
        if d.get("M", 1) > 1:
            raise PhenolensError(f"{self.path}: the scene holds {d['M']} mosaic tiles that bioio cannot stitch; "
                                 "export stitched fields (or one file per tile) from the microscope software")
        if d.get("S", 1) > 1 and d["C"] > 1:
            raise PhenolensError(f"{self.path}: has {d['C']} channels of {d['S']} samples (RGB) each; "
                                 "phenolens reads either channels or RGB samples, export one of them")
        c = d["S"] if self._samples_are_channels() else d["C"]
        return {"T": d["T"], "C": c, "Z": d["Z"], "Y": d["Y"], "X": d["X"]}

    def channel_names(self) -> list[str] | None:
        if self._samples_are_channels():
            return list(_SAMPLE_NAMES[: self._dims()["S"]])
        return [str(n) for n in self.image.channel_names]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.image.dtype)

    def _dask(self, order: str, **index: int) -> Any:
        d = self._dims()
        if self._samples_are_channels():
            order, index = order.replace("C", "S"), {**index, "C": 0}
        elif "S" in d:
            index = {**index, "S": 0}
        if "M" in d:
            index = {**index, "M": 0}
        return self.image.get_image_dask_data(order, **index)

    def read_plane(self, t: int, z: int) -> np.ndarray:
        return np.asarray(self._dask("CYX", T=t, Z=z).compute(scheduler="synchronous"))

    def read_max(self, t: int) -> np.ndarray:
        return np.asarray(self._dask("CZYX", T=t).max(axis=1).compute(scheduler="synchronous"))


@contextlib.contextmanager
def _guarded_tiff(path: Path, log: _LogCapture) -> Iterator["_TiffSource"]:
    """An OME-TIFF read with tifffile alone; damage logged by tifffile becomes one line."""
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise PhenolensError(f"{path}: cannot read OME-TIFF file (damaged or not a TIFF: {_one_line(exc)})") from None
    with tif:
        yield _guard(path, _TiffSource, path, tif)
    damaged = [m for m in log.messages if any(k in m.lower() for k in _DAMAGE_MARKERS)]
    if damaged:
        raise PhenolensError(f"{path}: cannot read OME-TIFF file (truncated or damaged: {_one_line(Exception(damaged[0]))})")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class _TiffSource(_Source):
    """An OME-TIFF read with tifffile: OME-XML for scenes and channel names, pages for planes."""

    def __init__(self, path: Path, tif: tifffile.TiffFile) -> None:
        self.path, self.tif = path, tif
        xml = tif.ome_metadata if tif.is_ome else None
        if not xml:
            raise PhenolensError(_NOT_OME.format(path=path))
        root = ET.fromstring(xml)
        self.images = [el for el in root if _local(el.tag) == "Image"]
        self.series = list(tif.series)
        if not self.images or len(self.images) != len(self.series):
            raise PhenolensError(f"{path}: its OME-XML describes {len(self.images)} image(s) but tifffile finds "
                                 f"{len(self.series)}; read it with bioio: pip install 'phenolens[ome]'")
        self.scenes = [img.get("ID") or f"Image:{i}" for i, img in enumerate(self.images)]
        self.index = 0

    def set_scene(self, index: int) -> None:
        self.index = index

    def _layout(self) -> tuple[list[str], list[int], str]:
        """(leading axes, their sizes, page axes) of the current series, e.g. (['T','Z','C'], [...], 'YX')."""
        s = self.series[self.index]
        page_axes = str(s.keyframe.axes)
        lead = [(a, int(n)) for a, n in zip(s.get_axes(False), s.get_shape(False))
                if a not in page_axes and a != "S"]
        odd = [a for a, n in lead if a not in "TCZ" and n > 1]
        if odd:
            raise PhenolensError(f"{self.path}: has axes {s.get_axes(False)} that the OME-TIFF fallback reads "
                                 f"only through bioio: pip install 'phenolens[ome]'")
        return [a for a, _ in lead], [n for _, n in lead], page_axes

    def sizes(self) -> dict[str, int]:
        axes, shape, page_axes = self._layout()
        kf = self.series[self.index].keyframe
        page = dict(zip(page_axes, kf.shape))
        d = {a: n for a, n in zip(axes, shape)}
        c = d.get("C", 1)
        if page.get("S", 1) > 1:
            if c > 1:
                raise PhenolensError(f"{self.path}: has {c} channels of {page['S']} samples (RGB) each; "
                                     "phenolens reads either channels or RGB samples, export one of them")
            c = page["S"]
        return {"T": d.get("T", 1), "C": c, "Z": d.get("Z", 1), "Y": page["Y"], "X": page["X"]}

    def channel_names(self) -> list[str] | None:
        kf = self.series[self.index].keyframe
        samples = dict(zip(kf.axes, kf.shape)).get("S", 1)
        if samples > 1:
            return list(_SAMPLE_NAMES[:samples])
        pixels = [el for el in self.images[self.index] if _local(el.tag) == "Pixels"]
        channels = [el for el in (pixels[0] if pixels else []) if _local(el.tag) == "Channel"]
        return [ch.get("Name") or "" for ch in channels] or None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.series[self.index].keyframe.dtype)

    def read_plane(self, t: int, z: int) -> np.ndarray:
        axes, shape, page_axes = self._layout()
        c = dict(zip(axes, shape)).get("C", 1)
        keys = [int(np.ravel_multi_index([{"T": t, "Z": z, "C": ci}.get(a, 0) for a in axes], shape))
                if axes else 0 for ci in range(c)]
        data = self.tif.asarray(key=keys, series=self.index)
        data = data.reshape(len(keys), *data.shape[-len(page_axes):])
        if "S" in page_axes:  # RGB samples are the channels (C == 1 here)
            data = np.moveaxis(data[0], page_axes.index("S"), 0)
        return data

    def read_max(self, t: int) -> np.ndarray:
        out = None
        for z in range(self.sizes()["Z"]):
            plane = self.read_plane(t, z)
            out = plane if out is None else np.maximum(out, plane, out=out)
        return out


__all__ = ["EXTRA_FOR_SUFFIX", "VENDOR_SUFFIXES", "VendorInfo", "is_vendor_path", "read_vendor",
           "vendor_fields", "vendor_info", "vendor_stem", "vendor_suffix"]
