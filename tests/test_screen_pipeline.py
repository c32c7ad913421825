"""A simulated screen end to end: whole fields -> `phenolens crop` -> train -> translate -> measure.

The simulated screen (`phenolens simulate --layout screen`) knows where every cell is and what was
planted in it, so cropping is scored cell by cell, and the translated crops are scored on the
planted phenotypes.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

CHANNELS = "DNA,tubulin,actin,Golgi"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_manifest(path: Path, rows: list[dict], root: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "condition", "plate"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(path=str(root / r["path"]), condition=r["condition"], plate=r["plate"]))
    return path


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    from phenolens.data.simulate_screen import simulate_screen

    return simulate_screen(tmp_path_factory.mktemp("screen") / "screen", plates=2, wells_per_condition=1, sites=2,
                           field_size=256, seed=3, progress=False)


def test_every_simulated_cell_is_cropped_once_with_its_metadata_and_truth(screen, tmp_path):
    from phenolens.data.simulate_screen import crops_truth

    out = tmp_path / "crops"
    code, _, err = run_cli("crop", screen / "load_data.csv", out, "--size", "48", "--nucleus-diameter", "11",
                           "--border", "pad", "--workers", "2")
    assert code == 0, err
    crops = _rows(out / "manifest.csv")
    truth = _rows(screen / "_groundtruth" / "cells.csv")
    matched = crops_truth(screen, crops)
    found = [m["truth"] for m in matched if m["truth"] is not None]
    keys = [(t["field"], t["cell_id"]) for t in found]
    assert len(keys) == len(set(keys)), "a cell was cropped twice"
    coverage = len(set(keys)) / len(truth)
    assert coverage >= 0.95, coverage  # measured 0.99 (the rest: nuclei pressed against a neighbour)
    for crop, m in zip(crops, matched):
        t = m["truth"]
        if t is None:
            continue
        assert (crop["Metadata_Plate"], crop["Metadata_Well"], crop["Metadata_Site"], crop["condition"]) == \
               (t["plate"], t["well"], t["site"], t["condition"])
        assert abs(float(crop["center_y"]) - float(t["nucleus_centroid_y"])) < 3
    # without padding, crops whose 48 px window leaves the field are skipped, and only those
    strict = tmp_path / "strict"
    assert run_cli("crop", screen / "load_data.csv", strict, "--size", "48", "--nucleus-diameter", "11")[0] == 0
    fields = _rows(strict / "fields.csv")
    assert sum(int(f["crops"]) for f in fields) + sum(int(f["skipped_border"]) for f in fields) \
        + sum(int(f["skipped_overlap"]) for f in fields) == sum(int(f["nuclei"]) for f in fields)
    for r in _rows(strict / "manifest.csv"):
        assert 0 <= int(r["y0"]) and int(r["y1"]) <= 256 and 0 <= int(r["x0"]) and int(r["x1"]) <= 256


def test_cell_loss_shows_in_the_nuclei_found_per_field(screen, tmp_path):
    out = tmp_path / "crops"
    assert run_cli("crop", screen / "load_data.csv", out, "--size", "32", "--nucleus-diameter", "11")[0] == 0
    per = {}
    for f in _rows(out / "fields.csv"):
        per.setdefault(f["condition"], []).append(int(f["nuclei"]))
    truth = {}
    for f in _rows(screen / "_groundtruth" / "fields.csv"):
        truth.setdefault(f["condition"], []).append(int(f["n_cells"]))
    assert np.mean(per["high"]) < np.mean(per["mid"]) < np.mean(per["control"])
    for c in per:  # nuclei found per field against the true cell count
        assert abs(np.mean(per[c]) / np.mean(truth[c]) - 1) < 0.1


@pytest.mark.slow
def test_screen_crop_train_translate_measure_shows_the_planted_phenotypes(tmp_path_factory):
    """Crops of plate P1 train a PhenDiff model; P2's control crops are translated to mid and high and
    measured against P2's real crops. Every planted phenotype a single-cell crop can show moves the
    way the real crops move (cell loss is also read per field, in the test above).

    Measured on the 2-core CPU (one thread, 70 min with another job beside it): at 10000 steps every
    phenotype moves the real way at every dose where the real effect is significant. Here that is mid
    alone for the subtle tubulin shift, and the translated mid effect is only just positive (+0.01;
    -0.02 with 192 sources, where high becomes significant and agrees: 0.35 against 0.18). At 5000
    steps tubulin moves the wrong way (-0.36 against +0.18 with 192 sources); the others are right."""
    from phenolens.data.simulate_screen import simulate_screen
    from phenolens.measure.planted import format_planted_table, planted_table

    work = tmp_path_factory.mktemp("pipeline")
    steps = int(os.environ.get("PHENOLENS_SCREEN_STEPS", "10000"))
    screen = simulate_screen(work / "screen", plates=2, wells_per_condition=2, sites=4, field_size=256, seed=0,
                             progress=False)
    crops = work / "crops"
    code, _, err = run_cli("crop", screen / "load_data.csv", crops, "--size", "32", "--nucleus-diameter", "11",
                           "--illumination", "--normalize", "plate", "--workers", "2")
    assert code == 0, err
    rows = _rows(crops / "manifest.csv")
    train = _write_manifest(work / "train.csv", [r for r in rows if r["plate"] == "P1"], crops)
    held = [r for r in rows if r["plate"] == "P2"]
    reference = _write_manifest(work / "reference.csv", held, crops)
    sources = _write_manifest(work / "sources.csv", [r for r in held if r["condition"] == "control"][:64], crops)
    model = work / "model"
    code, _, err = run_cli("train", train, model, "--preset", "tiny", "--size", "32", "--steps", steps,
                           "--batch-size", "16")
    assert code == 0, err
    run = work / "run"
    code, _, err = run_cli("translate", model, sources, run, "--to", "mid", "high", "--steps", "50")
    assert code == 0, err
    code, _, err = run_cli("measure", run, "--reference", reference, "--channel-names", CHANNELS,
                           "--nuclei-channel", "0", "--cell-channel", "1", "--nucleus-diameter", "11", "--no-judges")
    assert code == 0, err
    table = planted_table(run / "measure", ["control", "mid", "high"])
    print(format_planted_table(table))
    checked = [r for r in table if r["doses_checked"]]
    assert {r["phenotype"] for r in checked} >= {"nuclear enlargement", "Golgi fragmentation", "actin translocation",
                                                  "tubulin +10 % (subtle)"}, table
    for r in checked:
        assert r["same_direction_all_doses"], r
