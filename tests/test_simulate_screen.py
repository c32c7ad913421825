"""The simulated screen (`phenolens simulate --layout screen`): layout, balance, truth vs masks,
determinism, the two screen effects (plate gain, vignette), a planted phenotype, --overwrite, the CLI."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from phenolens.cli import main
from phenolens.data.simulate import CHANNEL_NAMES
from phenolens.data.simulate_screen import simulate_screen
from phenolens.errors import PhenolensError

SMALL = dict(plates=2, wells_per_condition=1, sites=2, field_size=128, seed=3, progress=False)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _channels(root: Path, row: dict) -> np.ndarray:
    return np.stack([tifffile.imread(root / row[f"PathName_{c}"] / row[f"FileName_{c}"]) for c in CHANNEL_NAMES])


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    return simulate_screen(tmp_path_factory.mktemp("screen") / "s", workers=1, **SMALL)


def test_layout(screen):
    rows = _read_csv(screen / "load_data.csv")
    with open(screen / "load_data.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == [c for ch in CHANNEL_NAMES for c in (f"FileName_{ch}", f"PathName_{ch}")] + [
        "Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Condition", "Metadata_Strength"]
    assert len(rows) == 2 * 3 * 1 * 2
    seen = set()
    for r in rows:
        field = f"{r['Metadata_Plate']}_{r['Metadata_Well']}_s{r['Metadata_Site']}"
        for n, ch in enumerate(CHANNEL_NAMES, start=1):
            assert r[f"PathName_{ch}"] == "images" and r[f"FileName_{ch}"] == f"{field}_w{n}.tif"
            img = tifffile.imread(screen / "images" / r[f"FileName_{ch}"])
            assert img.ndim == 2 and img.dtype == np.uint16 and img.shape == (128, 128)
            seen.add(f"images/{field}_w{n}.tif")
        for kind in ("nuclei", "cells"):
            mask = tifffile.imread(screen / "_groundtruth" / "masks" / f"{field}_{kind}.tif")
            assert mask.dtype == np.uint16 and mask.shape == (128, 128)
    assert {r["Metadata_Plate"] for r in rows} == {"P1", "P2"}
    assert {r["Metadata_Site"] for r in rows} == {"1", "2"}
    assert {f"images/{p.name}" for p in (screen / "images").iterdir()} == seen
    # the marker records every file written, and nothing else
    marker = json.loads((screen / ".phenolens.json").read_text())
    assert marker["kind"] == "simulated screen"
    assert set(marker["files"]) == set(_files(screen)) - {".phenolens.json"}
    fields = _read_csv(screen / "_groundtruth" / "fields.csv")
    assert [f["field"] for f in fields] == [f"{r['Metadata_Plate']}_{r['Metadata_Well']}_s{r['Metadata_Site']}"
                                            for r in rows]
    for key in ("plate_gain", "vignette", "camera_offset", "n_cells", "nucleus_area_scale", "golgi_scatter"):
        assert key in fields[0]


def test_conditions_balanced_across_plates(screen):
    rows = _read_csv(screen / "load_data.csv")
    for plate in ("P1", "P2"):
        counts = Counter(r["Metadata_Condition"] for r in rows if r["Metadata_Plate"] == plate)
        assert counts == {"control": 2, "mid": 2, "high": 2}
    strength = {r["Metadata_Condition"]: float(r["Metadata_Strength"]) for r in rows}
    assert strength == {"control": 0.0, "mid": 0.5, "high": 1.0}
    # a well holds one condition
    by_well = {}
    for r in rows:
        assert by_well.setdefault((r["Metadata_Plate"], r["Metadata_Well"]), r["Metadata_Condition"]) == \
            r["Metadata_Condition"]


def test_cells_csv_matches_the_masks(screen):
    cells = _read_csv(screen / "_groundtruth" / "cells.csv")
    fields = _read_csv(screen / "_groundtruth" / "fields.csv")
    assert sum(int(f["n_cells"]) for f in fields) == len(cells)
    for f in fields:
        mine = [c for c in cells if c["field"] == f["field"]]
        assert all(c["condition"] == f["condition"] and c["plate"] == f["plate"] for c in mine)
        nuc = tifffile.imread(screen / "_groundtruth" / "masks" / f"{f['field']}_nuclei.tif")
        cell = tifffile.imread(screen / "_groundtruth" / "masks" / f"{f['field']}_cells.tif")
        ids = [int(c["cell_id"]) for c in mine]
        assert sorted(ids) == sorted(set(np.unique(nuc)) - {0}) == sorted(set(np.unique(cell)) - {0})
        centres = ndimage.center_of_mass(nuc > 0, nuc, ids)
        for c, (y, x) in zip(mine, centres):
            assert abs(float(c["nucleus_centroid_y"]) - y) < 0.5 and abs(float(c["nucleus_centroid_x"]) - x) < 0.5
            assert int(c["nucleus_area"]) == int((nuc == int(c["cell_id"])).sum())
        assert np.all(cell[nuc > 0] == nuc[nuc > 0])  # every nucleus lies in its own cell


def test_same_seed_same_bytes_whatever_the_workers(screen, tmp_path):
    two = simulate_screen(tmp_path / "two", workers=2, **SMALL)
    assert _files(two) == _files(screen)
    other = simulate_screen(tmp_path / "other", workers=1, **{**SMALL, "seed": 4, "plates": 1, "sites": 1})
    assert _files(other)["images/P1_B02_s1_w1.tif"] != _files(screen)["images/P1_B02_s1_w1.tif"]


def test_vignette_dims_the_corners_and_plate_gain_is_recorded(tmp_path):
    opts = dict(SMALL, plates=2, sites=1, workers=1)
    flat = simulate_screen(tmp_path / "flat", vignette=0.0, plate_gain_sd=0.0, **opts)
    vig = simulate_screen(tmp_path / "vig", vignette=0.6, plate_gain_sd=0.0, **opts)
    gain = simulate_screen(tmp_path / "gain", vignette=0.0, plate_gain_sd=0.3, **opts)
    k = 12
    corner, centre, ratios = [], [], []
    for rf, rv, rg, f in zip(_read_csv(flat / "load_data.csv"), _read_csv(vig / "load_data.csv"),
                             _read_csv(gain / "load_data.csv"), _read_csv(gain / "_groundtruth" / "fields.csv")):
        off = float(f["camera_offset"])
        a, b, g = (_channels(root, r).astype(float) - off for root, r in ((flat, rf), (vig, rv), (gain, rg)))
        corners = [(slice(0, k), slice(0, k)), (slice(0, k), slice(-k, None)),
                   (slice(-k, None), slice(0, k)), (slice(-k, None), slice(-k, None))]
        mid = (slice(64 - k // 2, 64 + k // 2),) * 2
        corner.append(sum(b[:, ys, xs].sum() for ys, xs in corners) / sum(a[:, ys, xs].sum() for ys, xs in corners))
        centre.append(b[:, mid[0], mid[1]].sum() / a[:, mid[0], mid[1]].sum())
        ratios.append((g.sum() / a.sum(), float(f["plate_gain"])))
    assert 0.42 < np.mean(corner) < 0.6 and np.mean(centre) > 0.97, (np.mean(corner), centre)  # flat field: 0.50
    for measured, recorded in ratios:
        assert abs(measured / recorded - 1) < 0.01, ratios
    gains = {f["plate"]: float(f["plate_gain"]) for f in _read_csv(gain / "_groundtruth" / "fields.csv")}
    assert len(set(gains.values())) == 2 and all(g != 1.0 for g in gains.values())
    # the vignette is measurable in one screen alone: corners dimmer than the centre, on average over fields
    b_all = [_channels(vig, r).astype(float) - float(f["camera_offset"])
             for r, f in zip(_read_csv(vig / "load_data.csv"), _read_csv(vig / "_groundtruth" / "fields.csv"))]
    bg = np.mean([np.median(x[:, :k, :k]) + np.median(x[:, -k:, -k:]) for x in b_all]) / 2
    bc = np.mean([np.median(x[:, 58:70, 58:70]) for x in b_all])
    assert bg < bc


def test_planted_phenotype_in_truth(screen):
    cells = _read_csv(screen / "_groundtruth" / "cells.csv")
    area = {c: np.mean([float(r["nucleus_area"]) for r in cells if r["condition"] == c]) for c in ("control", "high")}
    assert area["high"] > 1.2 * area["control"], area
    fields = _read_csv(screen / "_groundtruth" / "fields.csv")
    n = {c: np.mean([int(f["n_cells"]) for f in fields if f["condition"] == c]) for c in ("control", "high")}
    assert n["high"] < n["control"], n


def test_overwrite_removes_only_what_it_wrote(tmp_path):
    out = tmp_path / "s"
    opts = dict(SMALL, plates=1, workers=1)
    simulate_screen(out, **opts)
    (out / "notes.txt").write_text("mine")
    (out / "images" / "mine.tif").write_bytes(b"mine")
    with pytest.raises(PhenolensError, match="exists already; pass --overwrite"):
        simulate_screen(out, **opts)
    simulate_screen(out, overwrite=True, **{**opts, "sites": 1})
    assert (out / "notes.txt").read_text() == "mine" and (out / "images" / "mine.tif").read_bytes() == b"mine"
    assert not list((out / "images").glob("*_s2_w*.tif"))
    assert len(list((out / "images").glob("*_s1_w*.tif"))) == 3 * 4
    # a user's folder is never written into
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.txt").write_text("x")
    with pytest.raises(PhenolensError, match="not a simulated screen"):
        simulate_screen(user, overwrite=True, **opts)
    assert [p.name for p in user.iterdir()] == ["data.txt"]


@pytest.mark.parametrize("kwargs, option", [
    (dict(plates=0), "--plates"), (dict(sites=0), "--sites"), (dict(field_size=48), "--field-size"),
    (dict(vignette=0.95), "--vignette"), (dict(vignette=-0.1), "--vignette"),
    (dict(wells_per_condition=0), "--wells-per-condition"), (dict(wells_per_condition=200), "--wells-per-condition"),
    (dict(phenotypes=["lc3-puncta"]), "lc3-puncta"), (dict(conditions=["a", "a"]), "--conditions"),
])
def test_bad_values_name_the_option(tmp_path, kwargs, option):
    with pytest.raises(PhenolensError, match=option):
        simulate_screen(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["simulate", str(out), "--layout", "screen", "--plates", "1", "--wells-per-condition", "1",
                 "--sites", "1", "--field-size", "64", "--conditions", "control,high", "--vignette", "0.3",
                 "--phenotypes", "nuclear-enlargement"]) == 0
    fields = _read_csv(out / "_groundtruth" / "fields.csv")
    assert [f["condition"] for f in fields] == ["control", "high"]
    assert {f["vignette"] for f in fields} == {"0.3"} and {f["phenotypes"] for f in fields} == {"nuclear-enlargement"}
    capsys.readouterr()
    for argv, option in ((["--layout", "screen", "--per-condition", "3"], "--per-condition"),
                         (["--layout", "screen", "--puncta"], "--puncta"),
                         (["--field-size", "128"], "--field-size"),
                         (["--plates", "2"], "--plates"),
                         (["--layout", "screen", "--field-size", "32"], "--field-size")):
        assert main(["simulate", str(tmp_path / "no"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and option in err, err
    assert not (tmp_path / "no").exists()
