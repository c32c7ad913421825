"""`phenolens report`: the HTML page of a translate run, built from a run folder written by hand.

No model is needed: the run folder (TIFFs, index.csv, run.json, measure/) is written the way
`phenolens translate` and `phenolens measure` write it, so these tests check the page itself:
one gallery row and one flicker GIF per pair, embedded images only, the measure sections and
their placeholders, errors, and (when a Chromium can be had) that a browser loads every image.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import run_cli
from phenolens import __version__
from phenolens.errors import PhenolensError
from phenolens.report.html import write_report

CONDITIONS = ["ctrl", "low", "high"]
INDEX_COLUMNS = ["source_path", "source_condition", "target_condition", "output_path", "recon_mse", "recon_psnr",
                 "change_mse", "kind", "reconstruction_path"]
N_SOURCES = 3
N_PAIRS = N_SOURCES * (len(CONDITIONS) - 1)  # translations; the ctrl -> ctrl row is the reconstruction
RANKED = [  # rank, feature, target, trans_d, real_d, trans_q, real_q, direction_agrees
    (1, "nucleus_area", "high", 1.876, 2.347, 0.0012, 0.00034, True),
    (2, "mean_intensity_ch1", "high", -0.654, 0.789, 0.041, 0.0021, False),
    (3, "texture_contrast", "high", 0.432, 0.511, 0.09, 0.03, True),
    (1, "nucleus_area", "low", 0.913, 1.111, 0.02, 0.01, True),
]


def _blob(size: int, radius: float, brightness: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    blob = np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * radius ** 2))
    img = np.stack([300 + brightness * blob * (1 + 0.5 * c) + rng.normal(0, 15, blob.shape) for c in range(2)])
    return np.clip(img, 0, 65535).astype(np.uint16)


def _write_tif(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, img, photometric="minisblack")


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def make_run(root: Path, measure: bool = True) -> Path:
    """A translate run of 3 ctrl sources to ctrl/low/high, a model description and a measure/ folder."""
    model = root / "model"
    model.mkdir(parents=True)
    (model / "phenolens.json").write_text(json.dumps(dict(
        conditions=CONDITIONS, n_channels=2, image_size=24, channels=None, method="phendiff", preset="tiny",
        normalization=dict(low=[250.0, 250.0], high=[3500.0, 5000.0], low_percentile=0.1, high_percentile=99.9))))
    run = root / "run"
    rows = []
    for i in range(N_SOURCES):
        src = root / "data" / "ctrl" / f"img{i}.tif"
        source = _blob(24, 4 + i, 2500, seed=i)
        _write_tif(src, source)
        # img0's reconstruction is the source itself: the page must show both identically
        recon = source if i == 0 else _blob(24, 4 + i, 2480, seed=100 + i)
        folder = Path("ctrl") / f"img{i}"
        _write_tif(run / folder / "reconstruction.tif", recon)
        # one source path as given relative to the run's parent, the others absolute
        source_text = str(Path("data") / "ctrl" / src.name) if i == 2 else str(src)
        for t, radius in (("ctrl", 0), ("low", 1.5), ("high", 3.0)):
            rel = folder / "reconstruction.tif" if t == "ctrl" else folder / f"{t}.tif"
            if t != "ctrl":
                _write_tif(run / rel, _blob(24, 4 + i + radius, 2500 + 300 * radius, seed=200 + i))
            rows.append(dict(source_path=source_text, source_condition="ctrl", target_condition=t,
                             output_path=str(rel), recon_mse="1e-05", recon_psnr="56.0",
                             change_mse="0" if t == "ctrl" else f"{0.001 * radius:.6g}",
                             kind="reconstruction" if t == "ctrl" else "translation",
                             reconstruction_path=str(folder / "reconstruction.tif"), well=f"A0{i}"))
    with (run / "index.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS + ["well"])
        writer.writeheader()
        writer.writerows(rows)
    (run / "run.json").write_text(json.dumps(dict(model_dir=str(model), input=str(root / "data" / "ctrl"),
                                                  targets=None, source=None, steps=7, seed=3,
                                                  inversion="fixed-point", inversion_iters=5, batch_size=16)))
    if measure:
        write_measure(run / "measure")
    return run


def write_measure(mdir: Path) -> None:
    rng = np.random.default_rng(0)
    features = ["nucleus_area", "mean_intensity_ch1", "texture_contrast"]
    rows = []
    groups = [("real", "source", "ctrl", "", 0.0, 8), ("real", "reference", "low", "", 1.0, 8),
              ("real", "reference", "high", "", 2.0, 8), ("reconstruction", "generated", "ctrl", "ctrl", 0.0, 3),
              ("translation", "generated", "low", "low", 0.9, 3), ("translation", "generated", "high", "high", 1.8, 3)]
    for kind, role, cond, target, shift, n in groups:
        for i in range(n):
            rows.append(dict(image=f"{kind}_{cond}_{i}.tif", condition=cond, kind=kind, role=role,
                             source_image=f"img{i}.tif" if kind != "real" else "", target_condition=target,
                             **{f: f"{rng.normal(shift * (k + 1), 0.5):.4f}" for k, f in enumerate(features)}))
    _write_csv(mdir / "features.csv", rows)
    stats = [dict(feature=f, source_condition="ctrl", target_condition=t, n_source=8, n_real_target=8,
                  n_translation=3, real_diff=0.5, real_d=rd, real_p_welch=rq / 2, real_p_mw=rq, real_q=rq,
                  trans_diff=0.4, trans_d=td, trans_p_welch=tq / 2, trans_p_mw=tq, trans_q=tq,
                  direction_agrees=agree, d_ratio=td / rd)
             for _, f, t, td, rd, tq, rq, agree in RANKED]
    _write_csv(mdir / "stats.csv", stats)
    _write_csv(mdir / "ranked.csv", [dict(rank=r, feature=f, target_condition=t, trans_d=td, real_d=rd, trans_q=tq,
                                          real_q=rq, direction_agrees=a) for r, f, t, td, rd, tq, rq, a in RANKED])
    _write_csv(mdir / "dose_correlation.csv", [dict(feature=f, pearson_r=r, p_value=0.01, n_conditions=3)
                                               for f, r in zip(features, (0.987, -0.5, 0.1))])
    (mdir / "metrics.json").write_text(json.dumps({
        "reconstruction": {"mse_mean": 1.5e-05, "psnr_mean": 48.25, "ssim_mean": 0.9931},
        "targets": {"low": {"fid_classifier": 3.21, "success_ratio": 0.5, "source_success_ratio": 0.1},
                    "high": {"fid_classifier": 7.65, "success_ratio": 0.8125, "source_success_ratio": 0.05}},
        "segmentation": {"method": "<script>alert(1)</script>", "cells": {"ctrl": 12, "high": 9}},
    }))


def data_uris(page: str, mime: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rf'src="data:image/{mime};base64,([A-Za-z0-9+/=]+)"', page)]


def gallery_uris(page: str, column: str) -> list[str]:
    return re.findall(rf'id="g\d+-\d+-{column}" src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', page)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path)


def test_page_shows_every_pair_with_embedded_images_and_measurements(run_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path / "model")  # the relative source path must resolve beside the run, not via cwd
    path = write_report(run_dir, progress=False)
    assert path == run_dir / "report.html"
    page = path.read_text()

    assert page.count('class="gallery-row"') == N_PAIRS
    for t in ("low", "high"):
        assert len(re.findall(rf'class="gallery-row" data-source="[^"]+" data-target="{t}"', page)) == N_SOURCES
    assert page.count('class="dose-row"') == N_SOURCES
    assert "not found" not in page  # every source resolved, including the one relative to the run's parent

    # one looping 2-frame GIF per pair, frames ~600 ms that differ
    gifs = data_uris(page, "gif")
    assert len(gifs) == N_PAIRS
    for data in gifs:
        gif = Image.open(io.BytesIO(data))
        assert gif.n_frames == 2 and gif.info.get("loop") == 0 and 400 <= gif.info["duration"] <= 1000
        frames = []
        for k in range(2):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("RGB")).astype(int))
        assert np.abs(frames[0] - frames[1]).sum() > 0
    assert page.count('class="toggle"') == N_PAIRS

    # stills: upscaled with nearest neighbour; source and an identical reconstruction look the same
    sources, recons = gallery_uris(page, "src"), gallery_uris(page, "rec")
    tile = Image.open(io.BytesIO(base64.b64decode(sources[0].split(",", 1)[1])))
    assert tile.format == "PNG" and min(tile.size) >= 128
    assert sources[0] == recons[0] and sources[1] != recons[1]

    # self-contained: no URL anywhere, every src is a data URI
    assert "http://" not in page and "https://" not in page
    assert all(s.startswith("data:image/") for s in re.findall(r'src="([^"]*)"', page))

    # settings, model, footer
    assert "inversion_iters" in page and "fixed-point" in page
    assert "ctrl, low, high" in page
    assert f"phenolens {__version__}" in page

    # measure: box plots for the strongest target (high, last in condition order), tables, metrics
    plots = re.findall(r'class="boxplot" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(plots) == 3  # three ranked features for high, fewer than --top-features 6
    assert Image.open(io.BytesIO(base64.b64decode(plots[0]))).size[0] > 200
    assert "box plot of nucleus_area" in page
    for value in ("2.35", "1.88", "-0.65", "0.79", "0.00034", "0.987"):  # ranked d's and q, dose r
        assert value in page, value
    # direction agreement, written as character references so the file is ASCII
    assert page.count("&#10007; opposite") == 1 and page.count("&#10003; same") == 3
    assert "0.8125" in page and "48.25" in page and "fid_classifier" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "phenolens measure" not in page


def test_page_without_measure_missing_source_and_model(tmp_path):
    run = make_run(tmp_path, measure=False)
    shutil.rmtree(tmp_path / "model")  # no phenolens.json: scaled per image set
    (tmp_path / "data" / "ctrl" / "img1.tif").unlink()
    out = tmp_path / "pages" / "r.html"
    assert write_report(run, out, max_images=2, top_features=2, progress=False) == out
    page = out.read_text()
    assert page.count('class="gallery-row"') == 2 * 2 and len(data_uris(page, "gif")) == 4
    assert f"phenolens measure {run}" in page and "box plots" in page and "metric tables" in page
    assert "img1.tif: not found" in page  # warning, and a placeholder tile instead of a crash
    assert "no phenolens.json" in page and "source percentiles" in page
    assert 'class="boxplot"' not in page


def test_cli_report_options_and_errors(run_dir, tmp_path):
    out = tmp_path / "cli.html"
    code, stdout, err = run_cli("report", run_dir, "--out", out, "--max-images", 1, "--top-features", 1,
                                "--order", "high,low,ctrl")
    assert code == 0, err
    assert str(out) in stdout
    page = out.read_text()
    assert page.count('class="gallery-row"') == 2 and page.count('class="boxplot"') == 1
    header = re.search(r'<table class="dose"><thead><tr>(.*?)</tr>', page).group(1)
    assert re.findall(r"<th>(\w+)</th>", header)[-3:] == ["high", "low", "ctrl"]
    # the strongest target is the last in --order that ranked.csv has features for: low, not high
    assert "Target low" in page and "box plot of nucleus_area" in page

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli("report", empty)
    assert code == 2
    assert "index.csv" in err and "phenolens translate" in err and str(empty) in err and "Traceback" not in err
    code, _, err = run_cli("report", run_dir, "--max-images", 0)
    assert code == 2 and "--max-images" in err
    code, _, err = run_cli("report", run_dir, "--order", "ctrl,nope")
    assert code == 2 and "nope" in err
    with pytest.raises(PhenolensError, match="index.csv"):
        write_report(empty)


# ------------------------------------------------------------------------------- browser

def find_chromium() -> str | None:
    """A Chromium on PATH; as root with apt-get, try installing one (quietly, time-limited)."""
    names = ("chromium", "chromium-browser", "google-chrome")
    found = next((shutil.which(n) for n in names if shutil.which(n)), None)
    if found or not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")):
        return found
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=300,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    except (OSError, subprocess.SubprocessError):
        return None
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


TOGGLE_PROBE = """<script>window.addEventListener('load',function(){
var im=document.querySelector('img.toggle'),before=im.src;im.click();
var tr=document.getElementById(im.dataset.b).src;var after=im.src;im.click();
document.body.dataset.toggleWorks=String(before!==after&&after===tr&&im.src===before);});</script></body>"""


def test_chromium_loads_every_image(run_dir, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium/chromium-browser/google-chrome on PATH and it could not be installed with apt-get")
    page = write_report(run_dir, progress=False).read_text()
    probe = tmp_path / "probe.html"  # the page plus a script that clicks the first toggle image
    probe.write_text(page.replace("</body>", TOGGLE_PROBE, 1))
    result = subprocess.run([exe, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=5000",
                             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
                            capture_output=True, text=True, timeout=120)
    dom = result.stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, f"chromium did not run the page's script: {result.stderr[-2000:]}"
    n_img = page.count("<img ")
    assert int(total.group(1)) == n_img > 0
    assert int(loaded.group(1)) == n_img
    assert 'data-toggle-works="true"' in dom
