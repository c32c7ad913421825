"""`phenolens translate` and the PhenDiff Python API on a tiny random-weight model."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import CONDITIONS, run_cli, write_blob_images

FAST = ["--steps", "4", "--inversion-iters", "2"]


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.tif"))}


def test_translate_folder_writes_outputs_like_the_source(tiny_model, blob_data, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli("translate", tiny_model, blob_data / "ctrl", out, *FAST)
    assert code == 0, err
    rows = read_rows(out / "index.csv")
    assert len(rows) == 4 * len(CONDITIONS)  # every source x every target, reconstruction included
    assert {r["target_condition"] for r in rows} == set(CONDITIONS)
    assert all(r["source_condition"] == "ctrl" for r in rows)
    for col in ("source_path", "source_condition", "target_condition", "output_path", "recon_mse",
                "recon_psnr", "change_mse"):
        assert col in rows[0]
    for r in rows:
        src = tifffile.imread(r["source_path"])
        res = tifffile.imread(out / r["output_path"])
        assert res.dtype == np.uint16 and res.shape == src.shape == (2, 24, 24)
        if r["target_condition"] == "ctrl":
            assert r["kind"] == "reconstruction" and r["output_path"] == r["reconstruction_path"]
            assert float(r["change_mse"]) == pytest.approx(float(r["recon_mse"]))


def test_translate_manifest_carries_metadata_columns(tiny_model, blob_data, tmp_path):
    manifest = tmp_path / "plate.csv"
    manifest.write_text("path,condition,plate,well\n"
                        f"{blob_data / 'ctrl/img0.tif'},ctrl,P1,A01\n"
                        f"{blob_data / 'dose2/img1.tif'},dose2,P2,B07\n")
    out = tmp_path / "run"
    code, _, err = run_cli("translate", tiny_model, manifest, out, "--to", "dose1", *FAST)
    assert code == 0, err
    rows = read_rows(out / "index.csv")
    assert [(r["source_condition"], r["target_condition"], r["plate"], r["well"]) for r in rows] == [
        ("ctrl", "dose1", "P1", "A01"), ("dose2", "dose1", "P2", "B07")]


def test_rerun_is_bit_identical_and_skips_done_work(tiny_model, blob_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("translate", tiny_model, blob_data, a, "--seed", "3", *FAST)[0] == 0
    assert run_cli("translate", tiny_model, blob_data, b, "--seed", "3", *FAST)[0] == 0
    assert digest(a) == digest(b) and len(digest(a)) == 12 * 3
    assert (a / "index.csv").read_text() == (b / "index.csv").read_text()
    # same settings again: nothing is recomputed
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*.tif")}
    assert run_cli("translate", tiny_model, blob_data, a, "--seed", "3", *FAST)[0] == 0
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*.tif")} == mtimes
    # other settings: refused without --overwrite, done with it
    other = ["--steps", "4", "--inversion-iters", "3"]
    code, _, err = run_cli("translate", tiny_model, blob_data, a, "--seed", "3", *other)
    assert code == 2 and "--overwrite" in err and "inversion_iters" in err
    assert run_cli("translate", tiny_model, blob_data, a, "--seed", "3", "--overwrite", *other)[0] == 0
    assert digest(a) != digest(b)


def test_resume_after_partial_run(tiny_model, blob_data, tmp_path):
    out = tmp_path / "run"
    args = ("translate", tiny_model, blob_data, out, "--batch-size", "4", *FAST)
    assert run_cli(*args)[0] == 0
    full = read_rows(out / "index.csv")
    # pretend the run died after the first batch: drop later rows and one output file
    kept = [r for r in full if r["source_condition"] == "ctrl"]
    with (out / "index.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(full[0]))
        w.writeheader()
        w.writerows(kept)
    (out / full[-1]["output_path"]).unlink()
    assert run_cli(*args)[0] == 0
    again = read_rows(out / "index.csv")
    key = lambda r: (r["source_path"], r["target_condition"])  # noqa: E731
    assert sorted(map(key, again)) == sorted(map(key, full))
    assert (out / full[-1]["output_path"]).is_file()


def test_worker_processes_translate_as_one_process_does(tiny_model, blob_data, tmp_path):
    """--workers 2 spreads the batches over two CPU processes; the files, the index and EF-DDPM's
    per-image noise are those of a one-process run (to the last unit of a uint16 pixel: the processes
    run fewer torch threads, which may round differently)."""
    args = ["--batch-size", "4", "--inversion", "ef-ddpm", "--seed", "5", "--steps", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli("translate", tiny_model, blob_data, one, *args)[0] == 0
    code, _, err = run_cli("translate", tiny_model, blob_data, two, *args, "--workers", "2")
    assert code == 0, err
    a, b = read_rows(one / "index.csv"), read_rows(two / "index.csv")
    assert [(r["source_path"], r["target_condition"], r["output_path"]) for r in a] == \
        [(r["source_path"], r["target_condition"], r["output_path"]) for r in b]
    assert len(a) == 12 * 3
    for ra, rb in zip(a, b):
        assert float(ra["change_mse"]) == pytest.approx(float(rb["change_mse"]), rel=1e-3, abs=1e-9)
        x = tifffile.imread(one / ra["output_path"]).astype(np.int64)
        y = tifffile.imread(two / rb["output_path"]).astype(np.int64)
        assert np.abs(x - y).max() <= 1
    assert {r["change_mse"] for r in a if r["kind"] == "translation"} != {"0"}  # the edits changed something
    code, _, err = run_cli("translate", tiny_model, blob_data, tmp_path / "bad", *args, "--workers", "0")
    assert code == 2 and "--workers" in err and "Traceback" not in err


def test_images_not_a_multiple_of_the_unet_are_padded_and_cropped_back(tiny_model, tmp_path):
    data = write_blob_images(tmp_path / "odd", conditions=["ctrl"], per_condition=2, size=22)
    out = tmp_path / "run"
    code, _, err = run_cli("translate", tiny_model, data / "ctrl", out, "--to", "dose2", *FAST)
    assert code == 0, err
    row = read_rows(out / "index.csv")[0]
    assert tifffile.imread(out / row["output_path"]).shape == (2, 22, 22)


def test_python_api_mirrors_the_cli(trained_model, blob_data):
    from phenolens.data.io import read_image
    from phenolens.diffusion.inversion import InversionSettings
    from phenolens.measure.image_metrics import psnr_from_mse
    from phenolens.methods.phendiff import PhenDiff

    model = PhenDiff.from_pretrained(trained_model)
    images = [read_image(p)[0] for p in sorted((blob_data / "ctrl").glob("*.tif"))]
    result = model.translate(images, source="ctrl", edits=["dose1", "to=dose2"],
                             inversion=InversionSettings(steps=4, iters=2))
    assert set(result.translations) == {"dose1", "to=dose2"}  # keyed as the caller wrote the edits
    assert result.reconstructions[0].shape == images[0].shape
    assert result.recon_mse.shape == (4,) and np.all(psnr_from_mse(result.recon_mse) > 0)
    assert np.all(result.inversion_forwards > 0) and np.all(result.render_forwards == 3 * 4)


def test_fixed_point_inversion_reconstructs_better_than_plain_ddim(trained_model, blob_data):
    from phenolens.data.io import read_image
    from phenolens.diffusion.inversion import InversionSettings
    from phenolens.measure.image_metrics import psnr_from_mse
    from phenolens.methods.phendiff import PhenDiff

    model = PhenDiff.from_pretrained(trained_model)
    images = [read_image(p)[0] for p in sorted((blob_data / "ctrl").glob("*.tif"))]
    plain = model.translate(images, source="ctrl", edits=["dose2"], inversion=InversionSettings(method="ddim", steps=20))
    fixed = model.translate(images, source="ctrl", edits=["dose2"], inversion=InversionSettings(steps=20, iters=3))
    assert fixed.recon_mse.mean() * 10 < plain.recon_mse.mean()
    assert psnr_from_mse(fixed.recon_mse).mean() > 40
    # the reconstruction error is a floor far under the change the translation makes
    assert fixed.change_mse["dose2"].mean() > 20 * fixed.recon_mse.mean()
