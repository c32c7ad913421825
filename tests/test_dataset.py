"""ImageSet: normalised images in memory, random crops / flips / rotations from the generator only."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from phenolens.data.dataset import ImageSet
from phenolens.data.normalize import Normalizer
from phenolens.data.records import ImageRecord, discover
from phenolens.errors import PhenolensError

from conftest import CONDITIONS, write_blob_images


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_blob_images(tmp_path_factory.mktemp("ds"), per_condition=3, size=24, channels=2)


def test_labels_channels_and_range(data):
    records = discover(data)
    ds = ImageSet(records, 16, CONDITIONS, progress=False)
    assert len(ds) == 9 and ds.n_channels == 2 and ds.bad == []
    x, y = ds.batch(range(9), torch.Generator().manual_seed(0))
    assert x.shape == (9, 2, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.long
    assert y.tolist() == [CONDITIONS.index(r.condition) for r in records]
    assert x.min() >= -1 and x.max() <= 1
    # a given normalizer is used as is
    norm = Normalizer(low=[0.0, 0.0], high=[5000.0, 5000.0])
    assert ImageSet(records, 16, CONDITIONS, normalizer=norm, progress=False).normalizer is norm


def test_batch_is_deterministic_for_the_generator(data):
    ds = ImageSet(discover(data), 16, CONDITIONS, progress=False)
    idx = [0, 3, 5, 5, 8]
    torch.manual_seed(123)
    np.random.seed(123)
    a = ds.batch(idx, torch.Generator().manual_seed(7))
    torch.manual_seed(999)  # global RNGs must not matter
    np.random.seed(999)
    b = ds.batch(idx, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = ds.batch(idx, torch.Generator().manual_seed(8))
    assert not torch.equal(a[0], c[0])
    # consecutive batches from one generator differ, and replay from a saved state
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    first, second = ds.batch(idx, g)[0], ds.batch(idx, g)[0]
    assert not torch.equal(first, second)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(ds.batch(idx, g2)[0], first)


def test_crops_are_windows_of_the_normalised_image(data):
    records = discover(data)
    ds = ImageSet(records, 16, CONDITIONS, augment=False, progress=False)
    from phenolens.data.io import read_image
    g = torch.Generator().manual_seed(3)
    x, _ = ds.batch(list(range(len(ds))), g)
    tops_lefts = set()
    for i, rec in enumerate(records):
        full = torch.from_numpy(ds.normalizer.to_model(read_image(rec.path)[0]))
        windows = [(t, l) for t in range(24 - 16 + 1) for l in range(24 - 16 + 1)
                   if torch.equal(full[:, t:t + 16, l:l + 16], x[i])]
        assert windows, f"crop {i} is not a window of its image"
        tops_lefts.update(windows)
    assert len(tops_lefts) > 1, "crop positions should vary"


def test_augment_is_a_flip_or_rotation_of_a_window(data):
    ds = ImageSet(discover(data), 24, CONDITIONS, augment=True, progress=False)  # crop = whole image
    x, _ = ds.batch([0] * 16, torch.Generator().manual_seed(0))
    img = ds.images[0]
    variants = [torch.rot90(v, k, dims=(-2, -1)) for v in (img, img.flip(-1)) for k in range(4)]
    seen = set()
    for crop in x:
        match = [j for j, v in enumerate(variants) if torch.equal(v, crop)]
        assert match
        seen.add(match[0])
    assert len(seen) > 2


def test_no_augment_serves_each_image_as_it_is(data):
    """augment=False (`--no-augment`), crop = whole image: every draw is exactly the training image."""
    records = discover(data)
    plain = ImageSet(records, 24, CONDITIONS, augment=False, progress=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        idx = torch.randint(len(plain), (6,), generator=g).tolist()
        x, y = plain.batch(idx, g)
        for b, i in enumerate(idx):
            assert torch.equal(x[b], plain.images[i])
        assert y.tolist() == plain.labels[idx].tolist()
    # the same draws with augmentation are flipped / rotated views, and the generator advances alike
    # (augment changes no random draw, so an exact resume does not depend on it)
    aug = ImageSet(records, 24, CONDITIONS, augment=True, progress=False)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    xa, _ = aug.batch([0] * 16, g1)
    plain.batch([0] * 16, g2)
    assert any(not torch.equal(c, aug.images[0]) for c in xa)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_small_images_are_resized_up(tmp_path):
    rng = np.random.default_rng(0)
    for cond in ("a", "b"):
        (tmp_path / cond).mkdir()
        tifffile.imwrite(tmp_path / cond / "x.tif", rng.integers(0, 4000, (1, 10, 14), dtype=np.uint16))
    ds = ImageSet(discover(tmp_path), 16, ["a", "b"], progress=False)
    assert ds.images[0].shape == (1, 16, 22)
    x, y = ds.batch([0, 1], torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 16, 16) and y.tolist() == [0, 1]


def test_bad_files_skipped_or_raised(tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["a", "b"], per_condition=2, size=16)
    (data / "a" / "broken.tif").write_text("garbage")
    records = discover(data)
    with pytest.raises(PhenolensError, match="broken.tif"):
        ImageSet(records, 16, ["a", "b"], progress=False)
    ds = ImageSet(records, 16, ["a", "b"], skip_bad=True, progress=False)
    assert len(ds) == 4
    assert [p.name for p, _ in ds.bad] == ["broken.tif"] and "broken.tif" in ds.bad[0][1]
    assert all(r.path.name != "broken.tif" for r in ds.records)


def test_channel_mismatch_names_the_odd_file(tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["a", "b"], per_condition=2, size=16, channels=2)
    tifffile.imwrite(data / "b" / "odd.tif", np.zeros((3, 16, 16), np.uint16), photometric="minisblack")
    with pytest.raises(PhenolensError, match=r"odd\.tif.*3 channel"):
        ImageSet(discover(data), 16, ["a", "b"], progress=False)
    # --channels picks a common subset
    ds = ImageSet(discover(data), 16, ["a", "b"], channels=[0], progress=False)
    assert ds.n_channels == 1
    # a normalizer fitted for another channel count
    with pytest.raises(PhenolensError, match="expects 3"):
        ImageSet(discover(data), 16, ["a", "b"], channels=[0], progress=False,
                 normalizer=Normalizer(low=[0.0] * 3, high=[1.0] * 3))


def test_unknown_condition(tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["a", "b"], per_condition=1, size=16)
    with pytest.raises(PhenolensError, match="'b'"):
        ImageSet(discover(data), 16, ["a"], progress=False)
    recs = [ImageRecord(p, "a", {}) for p in sorted(data.glob("*/*.tif"))]
    assert len(ImageSet(recs, 16, ["x", "a"], progress=False).labels.unique()) == 1
