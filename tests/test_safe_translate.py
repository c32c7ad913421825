"""`phenolens translate` never loses a file, never mixes up outputs, and never passes a wrong input
silently (issue 9: items 1, 2, 4, 6, 9, 10, 11 and the Unicode-names line, translate's part)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import CONDITIONS, fails_with, run_cli, snapshot, write_blob_images

FAST = ["--steps", "2", "--inversion-iters", "1"]


# ------------------------------------------------------------------------------------ helpers
def read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*.tif")}


def write_tif(path: Path, size: int = 16, seed: int = 0, dtype=np.uint16, scale: float = 3000, offset: float = 200):
    rng = np.random.default_rng(seed)
    img = offset + scale * rng.random((2, size, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, img.astype(dtype), photometric="minisblack")
    return path


def copy_model(model: Path, dest: Path, **info_changes) -> Path:
    shutil.copytree(model, dest)
    if info_changes:
        info = json.loads((dest / "phenolens.json").read_text())
        info.update(info_changes)
        (dest / "phenolens.json").write_text(json.dumps(info))
    return dest


def make_model(dest: Path, conditions: list[str], data: Path, seed: int = 0) -> Path:
    from phenolens.data.io import read_image
    from phenolens.data.normalize import Normalizer
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.models.store import ModelInfo, save_model
    from phenolens.models.unet import build_unet

    torch.manual_seed(seed)
    unet = build_unet("tiny", channels=2, size=16, num_conditions=len(conditions))
    images = [read_image(p)[0] for p in sorted(data.glob("*/*.tif"))]
    info = ModelInfo(conditions=list(conditions), n_channels=2, image_size=16,
                     normalization=Normalizer.fit(images).to_dict())
    save_model(dest, unet, make_scheduler(), info)
    return dest


def manifest(path: Path, rows: list[tuple], header: str = "path,condition") -> Path:
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_blob_images(tmp_path_factory.mktemp("small"), conditions=["ctrl", "dose1"], per_condition=2, size=16)


# ------------------------------------------------------------------- 1: nothing of the user's lost
def test_item1_overwrite_into_the_inputs_parent_is_refused_and_keeps_every_source(tiny_model, tmp_path):
    data = write_blob_images(tmp_path / "selfds", conditions=["ctrl", "dose1"], per_condition=2, size=16)
    before = snapshot(data)
    fails_with(run_cli("translate", tiny_model, data / "ctrl", data, "--to", "dose1", "--overwrite", *FAST),
                   str(data))
    assert snapshot(data) == before


def test_item1_overwrite_into_the_model_folder_is_refused_and_keeps_the_model(tiny_model, small_data, tmp_path):
    model = copy_model(tiny_model, tmp_path / "model")
    (model / "checkpoints" / "step-0000010").mkdir(parents=True)
    (model / "checkpoints" / "step-0000010" / "state.json").write_text("{}")
    before = snapshot(model)
    fails_with(run_cli("translate", model, small_data / "ctrl", model, "--overwrite", *FAST), "model")
    assert snapshot(model) == before


def test_item1_overwrite_removes_only_what_the_run_wrote(tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    assert run_cli("translate", tiny_model, small_data / "ctrl", out, *FAST)[0] == 0
    marker = json.loads((out / ".phenolens.json").read_text())
    assert marker["kind"] == "translate"
    written = {p for p in snapshot(out) if p != ".phenolens.json"}
    assert written <= set(marker["files"]), written - set(marker["files"])
    some_output = out / read_rows(out / "index.csv")[0]["output_path"]
    (out / "notes.txt").write_text("the user's")
    (some_output.parent / "mine.txt").write_text("the user's too")
    code, _, err = run_cli("translate", tiny_model, small_data / "ctrl", out, "--seed", "5", "--overwrite", *FAST)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "the user's"
    assert (some_output.parent / "mine.txt").read_text() == "the user's too"


def test_item1_run_folder_of_an_older_phenolens_resumes_and_is_adopted(tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    args = ("translate", tiny_model, small_data, out, "--to", "dose1", *FAST)
    assert run_cli(*args)[0] == 0
    # make it look like a run of an older phenolens: no marker, no provenance, the old index columns only
    rows = read_rows(out / "index.csv")
    old_columns = ["source_path", "source_condition", "target_condition", "output_path", "recon_mse", "recon_psnr",
                   "change_mse", "kind", "reconstruction_path"]
    with (out / "index.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=old_columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    settings = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({k: v for k, v in settings.items() if k not in ("model_hash", "max_clipped")}))
    (out / ".phenolens.json").unlink()
    (out / "provenance.json").unlink()
    (out / "notes.txt").write_text("the user's")
    before = mtimes(out)
    legacy_copy = shutil.copytree(out, tmp_path / "run2")

    code, _, err = run_cli(*args)
    assert code == 0, err
    assert mtimes(out) == before  # nothing redone: the outputs are newer than model and sources
    recorded = set(json.loads((out / ".phenolens.json").read_text())["files"])
    assert {"run.json", "index.csv"} | {r["output_path"] for r in rows} <= recorded
    assert "notes.txt" not in recorded
    assert run_cli(*args[:-len(FAST)], "--seed", "9", "--overwrite", *FAST)[0] == 0
    assert (out / "notes.txt").read_text() == "the user's"
    # --overwrite straight onto an older run folder: its listed outputs go, the user's file stays
    code, _, err = run_cli("translate", tiny_model, small_data, legacy_copy, "--to", "dose2", "--overwrite", *FAST)
    assert code == 0, err
    assert (legacy_copy / "notes.txt").read_text() == "the user's"
    assert not any((legacy_copy / r["output_path"]).exists() for r in rows if r["kind"] == "translation")
    assert {r["target_condition"] for r in read_rows(legacy_copy / "index.csv")} == {"dose2"}


# ------------------------------------------------------------------------ 2: names never collide
def test_item2_same_stem_in_two_plates_gets_own_files(tiny_model, tmp_path):
    # different sizes, so a row pointing at another source's image shows in its shape
    sources = [write_tif(tmp_path / "plate1" / "a.tif", 16, 1), write_tif(tmp_path / "plate2" / "a.tif", 24, 2),
               write_tif(tmp_path / "plate3" / "a_2.tif", 20, 3)]
    m = manifest(tmp_path / "m.csv", [(p, "ctrl") for p in sources])
    out = tmp_path / "run"
    code, _, err = run_cli("translate", tiny_model, m, out, "--to", "dose1", *FAST)
    assert code == 0, err
    rows = read_rows(out / "index.csv")
    assert len({r["output_path"] for r in rows}) == len({r["reconstruction_path"] for r in rows}) == 3
    for r in rows:
        src = tifffile.imread(r["source_path"])
        assert tifffile.imread(out / r["output_path"]).shape == src.shape
        assert tifffile.imread(out / r["reconstruction_path"]).shape == src.shape


def test_item2_names_are_keyed_by_the_source_not_its_row(tiny_model, tmp_path):
    b = write_tif(tmp_path / "plate2" / "a.tif", 24, 2)
    a = write_tif(tmp_path / "plate1" / "a.tif", 16, 1)
    out = tmp_path / "run"
    args = ("--to", "dose1", *FAST)
    assert run_cli("translate", tiny_model, manifest(tmp_path / "m.csv", [(b, "ctrl")]), out, *args)[0] == 0
    first = read_rows(out / "index.csv")[0]
    # the manifest is edited: another a.tif comes first
    code, _, err = run_cli("translate", tiny_model, manifest(tmp_path / "m.csv", [(a, "ctrl"), (b, "ctrl")]), out, *args)
    assert code == 0, err
    rows = {r["source_path"]: r for r in read_rows(out / "index.csv")}
    assert rows[str(b)]["output_path"] == first["output_path"]
    for r in rows.values():
        assert tifffile.imread(out / r["output_path"]).shape == tifffile.imread(r["source_path"]).shape


def test_item2_condition_names_never_share_a_file(small_data, tmp_path):
    conditions = ["ctrl", "dose 1", "dose_1", "reconstruction", "High", "high"]
    model = make_model(tmp_path / "model", conditions, small_data)
    out = tmp_path / "run"
    code, _, err = run_cli("translate", model, small_data / "ctrl", out, "--from", "ctrl", *FAST)
    assert code == 0, err
    rows = read_rows(out / "index.csv")
    for src in {r["source_path"] for r in rows}:
        mine = [r for r in rows if r["source_path"] == src]
        assert sorted(r["target_condition"] for r in mine) == sorted(conditions)
        files = [r["output_path"].lower() for r in mine]  # lower: one file on a case-insensitive disk
        assert len(set(files)) == len(conditions), files
        assert all((out / r["output_path"]).is_file() for r in mine)


def test_item2_same_file_under_two_conditions_keeps_both_reconstructions(tiny_model, small_data, tmp_path):
    img = small_data / "ctrl" / "img0.tif"
    m = manifest(tmp_path / "m.csv", [(img, "ctrl"), (img, "dose1")])
    out = tmp_path / "run"
    code, _, err = run_cli("translate", tiny_model, m, out, "--to", "dose2", *FAST)
    assert code == 0, err
    rows = read_rows(out / "index.csv")
    assert sorted(r["source_condition"] for r in rows) == ["ctrl", "dose1"]
    recons = {r["reconstruction_path"] for r in rows}
    assert len(recons) == 2 and all((out / p).is_file() for p in recons)
    assert len({r["output_path"] for r in rows}) == 2


def test_also_unicode_letters_are_kept_in_output_names(tiny_model, tmp_path):
    data = tmp_path / "ctrl"
    write_tif(data / "ßild 1 µ.tif", seed=1)
    write_tif(data / "图像 2.tif", seed=2)
    out = tmp_path / "run"
    code, _, err = run_cli("translate", tiny_model, data, out, "--to", "dose1", *FAST)
    assert code == 0, err
    names = {Path(r["output_path"]).parent.name for r in read_rows(out / "index.csv")}
    assert any(n.startswith("ßild_1_µ") for n in names), names
    assert any(n.startswith("图像_2") for n in names), names


# ------------------------------------------------------------- 4: inputs unlike the training set
def test_item4_index_reports_clipping_and_raw_errors(tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    assert run_cli("translate", tiny_model, small_data / "ctrl", out, "--to", "dose1", *FAST)[0] == 0
    rows = read_rows(out / "index.csv")
    for col in ("source_path", "source_condition", "target_condition", "output_path", "recon_mse", "recon_psnr",
                "change_mse", "kind", "reconstruction_path", "clipped_fraction", "recon_mae_raw", "recon_mse_raw"):
        assert col in rows[0]
    for r in rows:
        src = tifffile.imread(r["source_path"]).astype(np.float64)
        recon = tifffile.imread(out / r["reconstruction_path"]).astype(np.float64)
        assert float(r["recon_mae_raw"]) == pytest.approx(np.abs(src - recon).mean(), rel=1e-4)
        assert float(r["recon_mse_raw"]) == pytest.approx(((src - recon) ** 2).mean(), rel=1e-4)
        assert 0 <= float(r["clipped_fraction"]) < 0.05


@pytest.mark.parametrize("kind", ["uint8", "float01"])
def test_item4_eight_bit_or_unit_float_input_into_a_sixteen_bit_model_is_refused(tiny_model, tmp_path, kind):
    if kind == "uint8":
        img = write_tif(tmp_path / "ctrl" / "small.tif", dtype=np.uint8, scale=200, offset=0)
    else:
        img = write_tif(tmp_path / "ctrl" / "small.tif", dtype=np.float32, scale=1, offset=0)
    fails_with(run_cli("translate", tiny_model, tmp_path / "ctrl", tmp_path / "run", *FAST),
                   str(img), "training range", "--max-clipped")


def test_item4_when_allowed_the_clipping_is_reported_and_warned(tiny_model, tmp_path, capsys):
    from phenolens.run.translate import TranslateSettings, run_translate

    img = write_tif(tmp_path / "ctrl" / "small.tif", dtype=np.uint8, scale=120, offset=0)
    settings = TranslateSettings(model_dir=str(tiny_model), input=str(tmp_path / "ctrl"), targets=["dose1"],
                                 steps=2, inversion_iters=1, max_clipped=1.0)
    index = run_translate(settings, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert f"warning: {img}" in err and "uint8" in err and "clipped" in err
    row = read_rows(index)[0]
    assert float(row["clipped_fraction"]) > 0.5 and row["source_dtype"] == "uint8"
    assert float(row["recon_mae_raw"]) > 20  # the raw error shows what the [-1, 1] PSNR hides


def test_item4_dtype_unlike_the_training_set_is_warned(tiny_model, tmp_path):
    info = json.loads((tiny_model / "phenolens.json").read_text())
    model = copy_model(tiny_model, tmp_path / "model", input_stats={"dtype": "uint16", "min": [0, 0], "max": [255, 255]},
                       normalization=dict(info["normalization"], low=[0, 0], high=[255, 255]))
    img = write_tif(tmp_path / "ctrl" / "small.tif", dtype=np.uint8, scale=250, offset=0)
    code, _, err = run_cli("translate", model, tmp_path / "ctrl", tmp_path / "run", "--to", "dose1", *FAST)
    assert code == 0, err
    assert any(line.startswith(f"warning: {img}") and "uint16" in line for line in err.splitlines()), err


# ----------------------------------------------------------------------------- 6: stale results
def test_item6_model_retrained_in_place_redoes_the_run(tiny_model, small_data, tmp_path):
    model = copy_model(tiny_model, tmp_path / "model")
    out = tmp_path / "run"
    args = ("translate", model, small_data / "ctrl", out, "--to", "dose1", *FAST)
    assert run_cli(*args)[0] == 0
    before, rows = snapshot(out), read_rows(out / "index.csv")
    make_model(model, CONDITIONS, small_data, seed=7)  # "retrained": other weights, same place
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert "earlier version of the model" in err
    after = snapshot(out)
    assert all(after[r["output_path"]] != before[r["output_path"]] for r in rows)
    assert {r["model_hash"] for r in read_rows(out / "index.csv")} != {r["model_hash"] for r in rows}


def test_item6_changed_source_image_alone_is_redone(tiny_model, tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["ctrl"], per_condition=3, size=16)
    out = tmp_path / "run"
    args = ("translate", tiny_model, data / "ctrl", out, "--to", "dose1", *FAST)
    assert run_cli(*args)[0] == 0
    before = mtimes(out)
    changed = data / "ctrl" / "img1.tif"
    write_tif(changed, seed=42)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert str(changed) in err
    after = mtimes(out)
    redone = {p for p in before if after[p] != before[p]}
    rows = read_rows(out / "index.csv")
    theirs = {r["output_path"] for r in rows if r["source_path"] == str(changed)} | \
             {r["reconstruction_path"] for r in rows if r["source_path"] == str(changed)}
    assert redone == theirs and len(theirs) == 2


# ------------------------------------------------------------------- 9: no duplicate/lost columns
def test_item9_repeated_target_gives_one_row_per_target(tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli("translate", tiny_model, small_data / "ctrl", out, "--to", "dose1", "dose1", *FAST)
    assert code == 0, err
    rows = read_rows(out / "index.csv")
    assert len(rows) == 2 and "dose1" in err


def test_item9_manifest_column_named_like_an_output_column_is_renamed(tiny_model, small_data, tmp_path):
    m = manifest(tmp_path / "m.csv", [(small_data / "ctrl" / "img0.tif", "ctrl", "orig/x.tif", "P1")],
                 header="path,condition,source_path,plate")
    out = tmp_path / "run"
    code, _, err = run_cli("translate", tiny_model, m, out, "--to", "dose1", *FAST)
    assert code == 0, err
    row = read_rows(out / "index.csv")[0]
    assert row["manifest_source_path"] == "orig/x.tif" and row["plate"] == "P1"
    assert row["source_path"] == str(small_data / "ctrl" / "img0.tif")
    assert "manifest_source_path" in err


# --------------------------------------------------------------- 10: guidance without dropout
def test_item10_guidance_on_a_model_without_condition_dropout_is_refused(tiny_model, small_data, tmp_path):
    for i, change in enumerate([dict(cond_dropout=0.0), dict(training={"config": {"cond_dropout": 0.0}})]):
        model = copy_model(tiny_model, tmp_path / f"model{i}", **change)
        fails_with(run_cli("translate", model, small_data / "ctrl", tmp_path / f"run{i}", "--guidance-scale", "3",
                               *FAST), "--guidance-scale", "dropout")
        assert not (tmp_path / f"run{i}").exists()


def test_item10_guidance_on_a_model_of_unknown_dropout_warns(tiny_model, small_data, tmp_path):
    code, _, err = run_cli("translate", tiny_model, small_data / "ctrl", tmp_path / "run", "--to", "dose1",
                           "--guidance-scale", "3", *FAST)
    assert code == 0, err
    assert any(line.startswith("warning: --guidance-scale") for line in err.splitlines()), err


def test_default_guidance_follows_the_model_and_the_inversion(tiny_model, small_data, tmp_path, caplog):
    """Unasked, guidance is 2 for a PhenDiff model trained with the default recipe (README "Edit strength"),
    1 with EF-DDPM, for a model trained otherwise or without dropout, and for one that does not record
    how it was trained; the scale used is recorded."""
    def trained(name: str, dropout: float, schedule: str = "cosine", prediction: str = "epsilon") -> Path:
        return copy_model(tiny_model, tmp_path / name, cond_dropout=dropout, prediction_type=prediction,
                          training={"config": {"lr_schedule": schedule, "cond_dropout": dropout}})

    with_dropout = trained("recipe", 0.1)
    cases = [(with_dropout, [], 2.0), (with_dropout, ["--inversion", "ef-ddpm"], 1.0),
             (trained("none", 0.0), [], 1.0), (trained("constant", 0.1, "constant"), [], 1.0),
             (trained("v", 0.1, prediction="v_prediction"), [], 1.0), (tiny_model, [], 1.0)]
    for i, (model, extra, expected) in enumerate(cases):
        out = tmp_path / f"run{i}"
        caplog.clear()
        code, _, err = run_cli("translate", model, small_data / "ctrl", out, "--to", "dose1", *FAST, *extra)
        assert code == 0, err
        assert json.loads((out / "run.json").read_text())["guidance_scale"] == expected, model
        assert ("guidance scale 2 (the default" in caplog.text) == (expected == 2.0), caplog.text
    # the value compared on a re-run is the one used: the default run continues under an explicit 2,
    # and an explicit 1 is another run (refused without --overwrite)
    again = run_cli("translate", with_dropout, small_data / "ctrl", tmp_path / "run0", "--to", "dose1", *FAST,
                    "--guidance-scale", "2")
    assert again[0] == 0, again[2]
    fails_with(run_cli("translate", with_dropout, small_data / "ctrl", tmp_path / "run0", "--to", "dose1", *FAST,
                       "--guidance-scale", "1"), "guidance")


# ------------------------------------------------------------- 11: a damaged index.csv on resume
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_item11_damaged_index_on_resume_is_redone_without_traceback(tiny_model, small_data, tmp_path, damage):
    out = tmp_path / "run"
    args = ("translate", tiny_model, small_data, out, "--to", "dose2", *FAST)
    assert run_cli(*args)[0] == 0
    full = read_rows(out / "index.csv")
    data = (out / "index.csv").read_bytes()
    cut = data.rfind(b"\n", 0, len(data) * 2 // 3) + 6  # in the middle of a row
    (out / "index.csv").write_bytes(data[:cut] if damage == "truncated" else b"\xff\xfe\x00garbage")
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert "Traceback" not in err and "index.csv" in err
    again = read_rows(out / "index.csv")
    key = lambda r: (r["source_path"], r["source_condition"], r["target_condition"])  # noqa: E731
    assert sorted(map(key, again)) == sorted(map(key, full))
