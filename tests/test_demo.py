"""The demo's measured figures: the "must show" thresholds of issues 2 and 3, on the shipped demo model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from phenolens.demo import DEMO_MODEL


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from phenolens.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    print(run_demo(out, steps=50, n_images=24, progress=False))
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_MODEL / "phenolens.json").is_file(), reason="no demo model shipped in this checkout")
def test_demo_meets_the_inversion_and_translation_targets(demo_run):
    out, figures = demo_run
    assert figures["recon_psnr_mean"] >= 40
    assert figures["change_mse_strongest_mean"] >= 50 * figures["recon_mse_mean"]
    assert figures["rate_translated_to_strongest"] >= 0.7
    assert figures["rate_translated_to_strongest"] > figures["rate_sources_as_strongest"]
    grid = Image.open(out / "grids.png")
    assert grid.size[0] > 48 * 2 * 9 and grid.size[1] > 48 * 2 * 8


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_MODEL / "phenolens.json").is_file(), reason="no demo model shipped in this checkout")
def test_demo_translations_move_the_planted_features_as_real_images_do(demo_run):
    """Issue 3: every planted phenotype moves the same way in translations as in real images, with a
    comparable effect at the strongest dose and real/translated means correlated over the doses."""
    out, figures = demo_run
    assert len(figures["planted"]) == 5
    for row in figures["planted"]:
        assert row["same_direction_all_doses"], row
        assert row["dose_correlation"] >= 0.8, row
    assert figures["identity"]["control"]["fraction"] >= 0.8  # reconstructions keep their nuclei
    assert figures["segmentation"]["nuclei_mean_iou"] > 0.8
    assert figures["judges"]["success_ratio_translations"] > figures["judges"]["success_ratio_untranslated_sources"]
    assert "<img" in (out / "report.html").read_text()
    # last: the effect-size criterion (+-50 % of the real d), missed today by the subtle tubulin shift
    for row in figures["planted"]:
        assert abs(row["ratio"] - 1) <= 0.5, row


def test_grid_tiles_and_signed_difference_colours(tmp_path):
    from phenolens.report.grids import composite, signed_difference, translation_grid

    rng = np.random.default_rng(0)
    src = rng.uniform(-1, 1, (2, 8, 8)).astype(np.float32)
    brighter = src.copy()
    brighter[1] += 0.5
    rows = [dict(source=src, reconstruction=src, high=brighter)]
    path = translation_grid(rows, tmp_path / "g.png", ["high"], "high", ["DNA", "actin"], zoom=2)
    img = np.asarray(Image.open(path))
    assert img.shape[1] == 5 * (16 + 4) + 4  # source, reconstruction, one target, two difference maps
    d = signed_difference(np.array([[1.0, -1.0, 0.0]]), scale=1.0)[0]
    assert tuple(d[0]) == (255, 0, 0) and tuple(d[1]) == (0, 0, 255) and tuple(d[2]) == (255, 255, 255)
    assert composite(src).shape == (8, 8, 3) and composite(src).dtype == np.uint8
