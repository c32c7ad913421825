"""Microscope formats through bioio (screen/vendor.py): OME-TIFF and OME-Zarr round trips written
with bioio's own writers, the tifffile fallback for OME-TIFF, plane selection (scene, timepoint, z,
maximum projection) and the one-line errors (missing plugin, missing bioio, out of range, damage)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import phenolens.data.io as pio
from phenolens.errors import PhenolensError
from phenolens.screen import vendor
from phenolens.screen.fields import VendorSelection
from phenolens.screen.vendor import (EXTRA_FOR_SUFFIX, is_vendor_path, read_vendor, vendor_fields, vendor_info,
                                     vendor_stem)

NAMES = ["DNA", "Actin", "Tubulin"]
DTYPES = ["uint16", "uint8"]


def _pixels(shape, dtype, seed=0) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(0, int(info.max) + 1, shape, dtype=dtype)


def _write_ome_tiff(path: Path, data, dim_order, channel_names=None, **kw) -> Path:
    writers = pytest.importorskip("bioio_ome_tiff.writers")
    writers.OmeTiffWriter.save(data, str(path), dim_order=dim_order, channel_names=channel_names, **kw)
    return path


def _write_ome_tiff_with(writer: str, path: Path, data, dim_order, channel_names) -> Path:
    """bioio's OmeTiffWriter, or tifffile's own OME writer (needs no bioio: runs in the default install)."""
    if writer == "bioio":
        return _write_ome_tiff(path, data, dim_order, channel_names)
    images = data if isinstance(data, list) else [data]
    orders = dim_order if isinstance(dim_order, list) else [dim_order]
    names = channel_names if isinstance(data, list) else [channel_names]
    with tifffile.TiffWriter(path, ome=True) as tw:
        for img, axes, chans in zip(images, orders, names):
            tw.write(img, photometric="minisblack", metadata={"axes": axes, "Channel": {"Name": chans}})
    return path


def _write_ome_zarr(path: Path, data: np.ndarray, axes: str, channel_names=None) -> Path:
    writers = pytest.importorskip("bioio_ome_zarr.writers")
    types = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    channels = None if channel_names is None else \
        [writers.Channel(label=n, color="FFFFFF") for n in channel_names]
    w = writers.OMEZarrWriter(str(path), level_shapes=data.shape, dtype=data.dtype, channels=channels,
                              axes_names=list(axes.lower()), axes_types=[types[a] for a in axes.lower()])
    w.write_full_volume(data)
    return path


@pytest.fixture
def no_bioio_ome_tiff(monkeypatch):
    """bioio-ome-tiff looks absent: OME-TIFF must be read with tifffile alone."""
    monkeypatch.setitem(sys.modules, "bioio_ome_tiff", None)

    def refuse(*_a, **_k):
        raise AssertionError("bioio was used although bioio-ome-tiff is absent")

    monkeypatch.setattr(vendor, "_BioSource", refuse)


def _one_line_error(func, *args) -> str:
    with pytest.raises(PhenolensError) as err:
        func(*args)
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ----------------------------------------------------------------------------- suffixes

def test_vendor_suffixes():
    assert is_vendor_path("a/B04.OME.TIFF") and is_vendor_path("x.ome.tif") and is_vendor_path("p.ome.zarr")
    assert is_vendor_path("s.nd2") and is_vendor_path("s.CZI") and is_vendor_path("s.lif")
    assert not is_vendor_path("plain.tif") and not is_vendor_path("a.zarr") and not is_vendor_path(".nd2")
    assert vendor_stem("dir/B04_s1.ome.tiff") == "B04_s1" and vendor_stem("p.ome.zarr") == "p"
    assert EXTRA_FOR_SUFFIX[".nd2"] == ("bioio_nd2", "nd2")


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", DTYPES)
def test_ome_tiff_round_trip(tmp_path, dtype):
    data = _pixels((3, 24, 32), dtype)
    path = _write_ome_tiff(tmp_path / "A01.ome.tiff", data, "CYX", NAMES)
    out, names = read_vendor(path, VendorSelection())
    assert names == NAMES and out.dtype == np.dtype(dtype) and np.array_equal(out, data)
    info = vendor_info(path, VendorSelection())
    assert info.channels == NAMES and info.dtype == np.dtype(dtype) and info.shape == (24, 32)
    assert info.scenes == ["Image:0"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ome_tiff_round_trip_without_bioio_ome_tiff(tmp_path, dtype, no_bioio_ome_tiff):
    data = _pixels((3, 24, 32), dtype, seed=1)
    path = _write_ome_tiff(tmp_path / "A01.ome.tif", data, "CYX", NAMES)
    out, names = read_vendor(path, VendorSelection())
    assert names == NAMES and out.dtype == np.dtype(dtype) and np.array_equal(out, data)


def test_ome_tiff_written_by_tifffile_reads_without_bioio(tmp_path, no_bioio_ome_tiff):
    data = _pixels((2, 16, 20), "uint16", seed=2)
    path = tmp_path / "B02.ome.tif"
    tifffile.imwrite(path, data, metadata={"axes": "CYX", "Channel": {"Name": ["DNA", "ER"]}})
    out, names = read_vendor(path, VendorSelection())
    assert names == ["DNA", "ER"] and out.dtype == np.uint16 and np.array_equal(out, data)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ome_zarr_round_trip(tmp_path, dtype):
    data = _pixels((3, 24, 32), dtype, seed=3)
    path = _write_ome_zarr(tmp_path / "A01.ome.zarr", data, "CYX", NAMES)
    out, names = read_vendor(path, VendorSelection())
    assert names == NAMES and out.dtype == np.dtype(dtype) and np.array_equal(out, data)
    assert vendor_info(path, VendorSelection()).dtype == np.dtype(dtype)


def test_unnamed_channels_fall_back_to_ch_index(tmp_path):
    data = _pixels((2, 8, 8), "uint16")
    path = _write_ome_zarr(tmp_path / "u.ome.zarr", data, "CYX")
    assert read_vendor(path, VendorSelection())[1] == ["ch0", "ch1"]
    path = _write_ome_tiff(tmp_path / "u.ome.tif", data, "CYX")  # bioio's writer names them 'C:0', 'C:1'
    assert read_vendor(path, VendorSelection())[1] == ["ch0", "ch1"]


# ----------------------------------------------------------------------------- plane selection

@pytest.mark.parametrize("reader", ["bioio", "tifffile"])
def test_timepoint_z_and_max_projection_tczyx(tmp_path, monkeypatch, reader):
    data = _pixels((2, 3, 4, 10, 12), "uint16", seed=4)  # T C Z Y X
    path = _write_ome_tiff_with(reader, tmp_path / "stack.ome.tif", data, "TCZYX", NAMES)
    if reader == "tifffile":
        monkeypatch.setitem(sys.modules, "bioio_ome_tiff", None)
    out, names = read_vendor(path, VendorSelection(timepoint=1, z=2))
    assert names == NAMES and np.array_equal(out, data[1, :, 2])
    out, _ = read_vendor(path, VendorSelection(timepoint=1, z="max"))
    assert out.dtype == np.uint16 and np.array_equal(out, data[1].max(axis=1))
    text = _one_line_error(read_vendor, path, VendorSelection(timepoint=2))
    assert "timepoint 2" in text and "2 timepoint" in text and "0..1" in text
    text = _one_line_error(read_vendor, path, VendorSelection(z=4))
    assert "z-plane 4" in text and "4 z-plane" in text and "'max'" in text


def test_max_projection_czyx_ome_zarr(tmp_path):
    data = _pixels((2, 5, 9, 7), "uint8", seed=5)  # C Z Y X
    path = _write_ome_zarr(tmp_path / "z.ome.zarr", data, "CZYX", ["DNA", "Actin"])
    out, names = read_vendor(path, VendorSelection(z="max"))
    assert names == ["DNA", "Actin"] and out.dtype == np.uint8 and np.array_equal(out, data.max(axis=1))
    out, _ = read_vendor(path, VendorSelection(z=3))
    assert np.array_equal(out, data[:, 3])


@pytest.mark.parametrize("reader", ["bioio", "tifffile"])
def test_scenes_by_index_and_name_and_out_of_range(tmp_path, monkeypatch, reader):
    a, b = _pixels((3, 8, 10), "uint16", seed=6), _pixels((2, 8, 10), "uint16", seed=7)
    path = _write_ome_tiff_with(reader, tmp_path / "multi.ome.tiff", [a, b], ["CYX", "CYX"], [NAMES, ["x", "y"]])
    if reader == "tifffile":
        monkeypatch.setitem(sys.modules, "bioio_ome_tiff", None)
    out, names = read_vendor(path, VendorSelection())  # None = the first scene
    assert names == NAMES and np.array_equal(out, a)
    for scene in (1, "1", "Image:1"):
        out, names = read_vendor(path, VendorSelection(scene=scene))
        assert names == ["x", "y"] and np.array_equal(out, b)
    text = _one_line_error(read_vendor, path, VendorSelection(scene=5))
    assert str(path) in text and "scene 5" in text and "'Image:0', 'Image:1'" in text and "0..1" in text
    text = _one_line_error(vendor_info, path, VendorSelection(scene="nope"))
    assert "'nope'" in text and "'Image:0', 'Image:1'" in text


# ----------------------------------------------------------------------------- errors

def test_missing_plugin_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    pytest.importorskip("bioio")
    monkeypatch.setitem(sys.modules, "bioio_nd2", None)  # an import of bioio_nd2 now fails
    path = tmp_path / "x.nd2"
    path.write_bytes(b"not really an nd2 file")
    text = _one_line_error(read_vendor, path, VendorSelection())
    assert "phenolens[nd2]" in text and "bioio-nd2" in text and str(path) in text
    assert "phenolens[nd2]" in _one_line_error(vendor_fields, [path], VendorSelection(), "ctrl")


def test_missing_bioio_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bioio", None)
    monkeypatch.setitem(sys.modules, "bioio_ome_zarr", None)
    path = tmp_path / "p.ome.zarr"
    path.mkdir()
    text = _one_line_error(read_vendor, path, VendorSelection())
    assert text == f"reading {path} needs bioio: pip install 'phenolens[ome]'"
    czi = tmp_path / "s.czi"
    czi.write_bytes(b"x")
    assert "phenolens[czi]" in _one_line_error(read_vendor, czi, VendorSelection())


@pytest.mark.parametrize("reader", ["bioio", "tifffile"])
def test_damaged_files_are_one_line(tmp_path, monkeypatch, reader):
    if reader == "tifffile":
        monkeypatch.setitem(sys.modules, "bioio_ome_tiff", None)
    else:
        pytest.importorskip("bioio_ome_tiff")
    junk = tmp_path / "junk.ome.tif"
    junk.write_bytes(b"junk" * 10)
    assert str(junk) in _one_line_error(read_vendor, junk, VendorSelection())
    data = _pixels((3, 64, 64), "uint16")
    good = tmp_path / "good.ome.tif"
    tifffile.imwrite(good, data, compression="zlib", metadata={"axes": "CYX"})
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert str(cut) in _one_line_error(read_vendor, cut, VendorSelection())
    assert "does not exist" in _one_line_error(read_vendor, tmp_path / "gone.ome.tif", VendorSelection())


@pytest.mark.parametrize("reader", ["bioio", "tifffile"])
def test_ome_suffix_without_ome_xml_is_one_line(tmp_path, monkeypatch, reader):
    if reader == "tifffile":
        monkeypatch.setitem(sys.modules, "bioio_ome_tiff", None)
    else:
        pytest.importorskip("bioio_ome_tiff")
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, _pixels((2, 8, 8), "uint16"), imagej=True, metadata={"axes": "CYX"})
    path = plain.rename(tmp_path / "ij.ome.tif")
    assert "no OME-XML" in _one_line_error(read_vendor, path, VendorSelection())


def test_empty_ome_zarr_directory_is_one_line(tmp_path):
    pytest.importorskip("bioio_ome_zarr")
    path = tmp_path / "empty.ome.zarr"
    path.mkdir()
    assert "cannot read OME-Zarr" in _one_line_error(read_vendor, path, VendorSelection())


def test_too_large_refused_before_reading_pixels(tmp_path, monkeypatch):
    data = _pixels((2, 16, 16), "uint16")
    path = tmp_path / "big.ome.tif"
    tifffile.imwrite(path, data, metadata={"axes": "CYX"})
    monkeypatch.setattr(pio, "MAX_IMAGE_VALUES", 2 * 16 * 16 - 1)

    def no_pixels(*_a, **_k):
        raise AssertionError("pixels read before the size check")

    monkeypatch.setattr(vendor._TiffSource, "read_plane", no_pixels)
    monkeypatch.setattr(vendor._BioSource, "read_plane", no_pixels)
    assert "too large" in _one_line_error(read_vendor, path, VendorSelection())


# ----------------------------------------------------------------------------- fields

def test_vendor_fields(tmp_path):
    a = _write_ome_tiff(tmp_path / "Plate 1_B04.ome.tiff", _pixels((3, 8, 8), "uint16"), "CYX", NAMES)
    b = _write_ome_zarr(tmp_path / "B05.ome.zarr", _pixels((3, 8, 8), "uint16"), "CYX", NAMES)
    fields = vendor_fields([a, b], VendorSelection(z="max"), "ctrl")
    assert [f.key for f in fields] == ["Plate-1_B04", "B05"]
    assert all(f.channel_names == NAMES and f.condition == "ctrl" for f in fields)
    assert fields[0].channels["Actin"].path == a and fields[0].channels["Actin"].index == 1
    assert fields[1].files() == [b]
    assert fields[0].meta == {"Metadata_File": a.name, "Metadata_Scene": "Image:0",
                              "Metadata_Timepoint": "0", "Metadata_Z": "max"}
    assert fields[0].vendor == VendorSelection(z="max")


def test_vendor_fields_all_scenes(tmp_path):
    a, b = _pixels((3, 8, 10), "uint16", seed=8), _pixels((2, 8, 10), "uint16", seed=9)
    path = _write_ome_tiff(tmp_path / "multi.ome.tiff", [a, b], ["CYX", "CYX"], [NAMES, ["x", "y"]])
    fields = vendor_fields([path], VendorSelection(scene="all"), "dose1")
    assert [f.key for f in fields] == ["multi_Image-0", "multi_Image-1"]
    assert [f.meta["Metadata_Scene"] for f in fields] == ["Image:0", "Image:1"]
    assert fields[1].channel_names == ["x", "y"]
    out, names = read_vendor(path, fields[1].vendor)
    assert names == fields[1].channel_names and np.array_equal(out, b)
    one = vendor_fields([path], VendorSelection(scene=1), "dose1")
    assert one[0].key == "multi_1" and one[0].meta["Metadata_Scene"] == "Image:1"
