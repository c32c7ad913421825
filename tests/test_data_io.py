"""Readers and writers: every layout round-trips with its dtype, axes and values; bad files fail clearly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from phenolens.data.io import ImageLayout, parse_channels, read_image, write_image
from phenolens.data.normalize import Normalizer
from phenolens.errors import PhenolensError

BBBC021 = Path(os.environ.get("PHENOLENS_TEST_DATA", "/work/shared/data")) / "bbbc021-cycloheximide"


def rand(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    hi = np.iinfo(dtype).max if np.dtype(dtype).kind in "iu" else 1.0
    return (rng.random(shape) * hi).astype(dtype)


def roundtrip(tmp_path: Path, name: str, raw: np.ndarray, layout: ImageLayout):
    out = tmp_path / "out" / name
    write_image(out, raw, layout)
    back, layout2 = read_image(out)
    assert layout2 == layout
    np.testing.assert_array_equal(back, raw)
    assert not [p for p in out.parent.iterdir() if p.name != out.name], "temporary file left behind"
    return back


@pytest.mark.parametrize("c,kwargs", [(2, {}), (3, dict(photometric="minisblack")),
                                      (3, dict(photometric="rgb", planarconfig="separate"))])
def test_uint16_cyx(tmp_path, c, kwargs):
    data = rand((c, 20, 24), np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", data, **kwargs)
    raw, layout = read_image(tmp_path / "a.tif")
    assert raw.dtype == np.float32 and raw.shape == (c, 20, 24)
    assert layout == ImageLayout("tiff", "uint16", "CYX", c)
    np.testing.assert_array_equal(raw, data)
    roundtrip(tmp_path, "a.tif", raw, layout)


def test_uint16_yxc(tmp_path):
    data = rand((20, 24, 2), np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack", planarconfig="contig")
    raw, layout = read_image(tmp_path / "a.tif")
    assert layout == ImageLayout("tiff", "uint16", "YXC", 2)
    np.testing.assert_array_equal(raw, np.moveaxis(data, -1, 0))
    roundtrip(tmp_path, "a.tif", raw, layout)


def test_uint16_rgb_tiff(tmp_path):
    data = rand((20, 24, 3), np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="rgb")
    raw, layout = read_image(tmp_path / "a.tif")
    assert layout == ImageLayout("tiff", "uint16", "YXC", 3)
    roundtrip(tmp_path, "a.tif", raw, layout)
    with tifffile.TiffFile(tmp_path / "out" / "a.tif") as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB


def test_uint8_yx_tiff(tmp_path):
    data = rand((17, 19), np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", data)
    raw, layout = read_image(tmp_path / "a.tif")
    assert raw.shape == (1, 17, 19) and layout == ImageLayout("tiff", "uint8", "YX", 1)
    roundtrip(tmp_path, "a.tif", raw, layout)


def test_float32_tiff(tmp_path):
    data = rand((2, 8, 8), np.float32) * 1000 - 3
    tifffile.imwrite(tmp_path / "a.tif", data)
    raw, layout = read_image(tmp_path / "a.tif")
    assert layout.dtype == "float32"
    roundtrip(tmp_path, "a.tif", raw, layout)


def test_multipage_tiff_written_page_by_page(tmp_path):
    data = rand((3, 16, 16), np.uint16)
    with tifffile.TiffWriter(tmp_path / "a.tif") as w:
        for page in data:
            w.write(page)
    raw, layout = read_image(tmp_path / "a.tif")
    assert layout == ImageLayout("tiff", "uint16", "CYX", 3)
    np.testing.assert_array_equal(raw, data)
    roundtrip(tmp_path, "a.tif", raw, layout)


def test_imagej_hyperstack_singleton_axes(tmp_path):
    data = rand((1, 2, 1, 12, 12), np.uint16)  # TZCYX with T=1, C=1
    tifffile.imwrite(tmp_path / "a.tif", data, imagej=True)
    raw, layout = read_image(tmp_path / "a.tif")
    assert raw.shape == (2, 12, 12) and layout.axes == "CYX"


def test_uint8_rgb_png(tmp_path):
    data = rand((20, 24, 3), np.uint8)
    Image.fromarray(data).save(tmp_path / "a.png")
    raw, layout = read_image(tmp_path / "a.png")
    assert layout == ImageLayout("png", "uint8", "YXC", 3)
    np.testing.assert_array_equal(raw, np.moveaxis(data, -1, 0))
    roundtrip(tmp_path, "a.png", raw, layout)


def test_16bit_gray_png(tmp_path):
    data = rand((20, 24), np.uint16)
    Image.fromarray(data).save(tmp_path / "a.png")
    raw, layout = read_image(tmp_path / "a.png")
    assert layout == ImageLayout("png", "uint16", "YX", 1)
    np.testing.assert_array_equal(raw[0], data)
    roundtrip(tmp_path, "a.png", raw, layout)


def test_8bit_gray_png(tmp_path):
    data = rand((9, 11), np.uint8)
    Image.fromarray(data).save(tmp_path / "a.png")
    raw, layout = read_image(tmp_path / "a.png")
    assert layout == ImageLayout("png", "uint8", "YX", 1)
    roundtrip(tmp_path, "a.png", raw, layout)


def test_channel_selection_and_write_back(tmp_path):
    data = rand((3, 10, 12), np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack")
    raw, layout = read_image(tmp_path / "a.tif", channels=[2, 0])
    np.testing.assert_array_equal(raw, data[[2, 0]])
    assert layout.channels == (2, 0) and layout.n_channels == 3
    write_image(tmp_path / "o.tif", raw, layout)
    back, layout2 = read_image(tmp_path / "o.tif")
    np.testing.assert_array_equal(back, raw)
    assert layout2 == ImageLayout("tiff", "uint16", "CYX", 2)
    # one channel of an RGB PNG comes back as a grayscale PNG
    Image.fromarray(rand((8, 8, 3), np.uint8)).save(tmp_path / "c.png")
    raw, layout = read_image(tmp_path / "c.png", channels=[1])
    write_image(tmp_path / "o.png", raw, layout)
    np.testing.assert_array_equal(read_image(tmp_path / "o.png")[0], raw)


def test_channel_out_of_range(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", rand((2, 8, 8), np.uint16))
    with pytest.raises(PhenolensError, match=r"--channels.*a\.tif.*2 channel"):
        read_image(tmp_path / "a.tif", channels=[0, 2])


def test_write_rounds_and_clips(tmp_path):
    layout = ImageLayout("tiff", "uint16", "CYX", 2)
    raw = np.array([[[-5.0, 1.4], [1.6, 70000.0]], [[0.5, 2.5], [65535.2, 3.0]]], dtype=np.float32)
    write_image(tmp_path / "a.tif", raw, layout)
    back = tifffile.imread(tmp_path / "a.tif")
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, [[[0, 1], [2, 65535]], [[0, 2], [65535, 3]]])


def test_write_wrong_channel_count(tmp_path):
    with pytest.raises(PhenolensError, match="o.tif"):
        write_image(tmp_path / "o.tif", np.zeros((3, 4, 4), np.float32), ImageLayout("tiff", "uint16", "CYX", 2))


def test_truncated_and_non_image_files(tmp_path, caplog):
    tifffile.imwrite(tmp_path / "good.tif", rand((2, 32, 32), np.uint16), compression="zlib")
    whole = (tmp_path / "good.tif").read_bytes()
    for n in (8, 200, len(whole) // 2, len(whole) - 50):
        (tmp_path / "cut.tif").write_bytes(whole[:n])
        with pytest.raises(PhenolensError, match="cut.tif"):
            read_image(tmp_path / "cut.tif")
    (tmp_path / "notes.tif").write_text("this is not an image")
    with pytest.raises(PhenolensError, match="notes.tif"):
        read_image(tmp_path / "notes.tif")
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(PhenolensError, match="notes.png"):
        read_image(tmp_path / "notes.png")
    Image.fromarray(rand((64, 64, 3), np.uint8)).save(tmp_path / "p.png")
    png = (tmp_path / "p.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(PhenolensError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(PhenolensError, match="missing.tif"):
        read_image(tmp_path / "missing.tif")
    # uncompressed multi-page TIFF cut in the middle of its second page
    tifffile.imwrite(tmp_path / "raw.tif", rand((2, 32, 32), np.uint16))
    whole = (tmp_path / "raw.tif").read_bytes()
    (tmp_path / "cut2.tif").write_bytes(whole[: len(whole) - 100])
    with pytest.raises(PhenolensError, match="cut2.tif"):
        read_image(tmp_path / "cut2.tif")


@pytest.mark.parametrize("text,expected", [(None, None), ("", None), ("0", [0]), ("0,2,1", [0, 2, 1]),
                                           (" 1 , 0 ", [1, 0])])
def test_parse_channels(text, expected):
    assert parse_channels(text) == expected


@pytest.mark.parametrize("text", ["a", "0,,1", "-1", "1.5", "0,0"])
def test_parse_channels_bad(text):
    with pytest.raises(PhenolensError, match="--channels"):
        parse_channels(text)


@pytest.mark.skipif(not BBBC021.is_dir(), reason=f"{BBBC021} missing")
def test_real_bbbc021_images_read_as_3x68x68(tmp_path):
    files = sorted(BBBC021.glob("*/*.tif"))[:5]
    assert files
    for f in files:
        raw, layout = read_image(f)
        assert raw.shape == (3, 68, 68)
        assert layout == ImageLayout("tiff", "uint16", "CYX", 3)
        assert raw.max() > 0
    roundtrip(tmp_path, "real.tif", raw, layout)


# ------------------------------------------------------------------------------------ Normalizer

def test_normalizer_fit_maps_percentiles_and_inverts():
    rng = np.random.default_rng(0)
    images = [np.stack([rng.normal(1000, 100, (32, 32)), rng.normal(50, 5, (32, 32))]).astype(np.float32)
              for _ in range(4)]
    norm = Normalizer.fit(images, low_percentile=1, high_percentile=99)
    assert norm.low[0] < 1000 < norm.high[0] and norm.low[1] < 50 < norm.high[1]
    x = norm.to_model(images[0])
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    inside = (x > -1) & (x < 1)
    np.testing.assert_allclose(norm.from_model(x)[inside], images[0][inside], rtol=1e-5, atol=1e-2)
    # torch, batched, same numbers
    t = norm.to_model(torch.from_numpy(np.stack(images)))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (4, 2, 32, 32)
    np.testing.assert_allclose(t[0].numpy(), x, atol=1e-6)
    back = norm.from_model(t)
    assert isinstance(back, torch.Tensor)
    # deterministic and serialisable
    assert Normalizer.fit(images, 1, 99) == norm
    assert Normalizer.from_dict(norm.to_dict()) == norm


def test_normalizer_sampling_and_constant_channel():
    big = np.zeros((1, 200, 200), np.float32)
    norm = Normalizer.fit([big], max_pixels_per_image=100)
    assert norm.low == [0.0] and norm.high == [1.0]


def test_normalizer_channel_mismatch():
    norm = Normalizer(low=[0.0, 0.0], high=[1.0, 1.0])
    with pytest.raises(PhenolensError, match="3 channel.*expects 2"):
        norm.to_model(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(PhenolensError, match="expects 2"):
        norm.from_model(torch.zeros(1, 1, 4, 4))
    with pytest.raises(PhenolensError):
        Normalizer.fit([np.zeros((2, 4, 4)), np.zeros((3, 4, 4))])
