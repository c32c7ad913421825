"""The simulator: files, determinism, ground truth, and every planted phenotype measured from pixels.

The phenotype checks read only the images and the label masks (as a user's pipeline would), so
they check what a model can actually learn, not just what the CSV claims.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from phenolens.data.simulate import CHANNEL_NAMES, DEFAULT_CONDITIONS, simulate
from phenolens.errors import PhenolensError

DNA, TUB, ACT, GOLGI = range(4)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _masks(root: Path, rel: str) -> tuple[np.ndarray, np.ndarray]:
    cond, name = rel.split("/")
    stem = name[: -len(".tif")]
    mdir = root / "_groundtruth" / "masks" / cond
    return tifffile.imread(mdir / f"{stem}_nuclei.tif"), tifffile.imread(mdir / f"{stem}_cells.tif")


def _dist_to_outline(labels: np.ndarray) -> np.ndarray:
    """Distance of each pixel to the nearest label change (the image border is not an outline)."""
    pad = np.pad(labels, 1, mode="edge")
    b = np.zeros(labels.shape, bool)
    for sl in ((slice(0, -2), slice(1, -1)), (slice(2, None), slice(1, -1)),
               (slice(1, -1), slice(0, -2)), (slice(1, -1), slice(2, None))):
        b |= pad[sl] != labels
    return ndimage.distance_transform_edt(~b)


def _measure(root: Path) -> dict[str, dict[str, list[float]]]:
    """Per condition: per-image and per-cell measurements from images + masks only."""
    out: dict[str, dict[str, list[float]]] = {}
    for row in _read_csv(root / "manifest.csv"):
        m = out.setdefault(row["condition"], {k: [] for k in (
            "n_cells", "nuc_area", "golgi_objects", "golgi_spread", "golgi_total", "actin_nc", "tub_cyto")})
        img = tifffile.imread(root / row["path"]).astype(np.float64)
        nuc, cell = _masks(root, row["path"])
        far = ~ndimage.binary_dilation(cell > 0, iterations=4)
        bg = np.median(img[:, far], axis=1) if far.sum() > 30 else np.percentile(img.reshape(4, -1), 2, axis=1)
        sig = img - bg[:, None, None]
        ids = np.unique(cell[cell > 0])
        m["n_cells"].append(len(ids))
        d_cell = _dist_to_outline(cell)
        near_nuc = ndimage.binary_dilation(nuc > 0, iterations=2)
        nuc_in = (_dist_to_outline(nuc) >= 1.5) & (nuc > 0)
        g = sig[GOLGI]
        above = g > 150.0
        puncta = above & (g == ndimage.maximum_filter(g, 3))  # resolvable Golgi puncta
        yy, xx = np.mgrid[: cell.shape[0], : cell.shape[1]]
        m["golgi_total"].append(float(g[cell > 0].sum()) / max(len(ids), 1))
        for i in ids:
            cm = cell == i
            m["nuc_area"].append(float((nuc == i).sum()))
            sel = cm & above
            m["golgi_objects"].append(int((puncta & cm).sum()))
            if sel.sum() >= 3:
                w = g[sel]
                cy, cx = np.average(yy[sel], weights=w), np.average(xx[sel], weights=w)
                m["golgi_spread"].append(float(np.sqrt(np.average((yy[sel] - cy) ** 2 + (xx[sel] - cx) ** 2, weights=w))))
            cyto = cm & ~near_nuc & (d_cell >= 3)
            nin = nuc_in & (nuc == i)
            if cyto.sum() >= 10 and nin.sum() >= 5:
                m["actin_nc"].append(float(sig[ACT][nin].mean() / sig[ACT][cyto].mean()))
                m["tub_cyto"].append(float(sig[TUB][cyto].mean()))
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """Control vs the strongest condition, enough cells for stable comparisons (~3 s)."""
    return simulate(tmp_path_factory.mktemp("sim") / "pair", conditions=["control", "high"], per_condition=50,
                    size=64, seed=3, progress=False)


@pytest.fixture(scope="module")
def measured(pair) -> dict[str, dict[str, np.ndarray]]:
    return {c: {k: np.asarray(v) for k, v in m.items()} for c, m in _measure(pair).items()}


# ------------------------------------------------------------------------------ files
def test_layout_and_manifest(tmp_path):
    out = simulate(tmp_path / "d", per_condition=3, size=40, seed=0, progress=False)
    assert out == tmp_path / "d"
    manifest = _read_csv(out / "manifest.csv")
    assert list(manifest[0]) == ["path", "condition", "strength"]
    assert [r["condition"] for r in manifest] == [c for c in DEFAULT_CONDITIONS for _ in range(3)]
    assert [float(r["strength"]) for r in manifest[::3]] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert manifest[0]["path"] == "control/control_00000.tif"
    for r in manifest:
        img = tifffile.imread(out / r["path"])
        assert img.dtype == np.uint16 and img.shape == (len(CHANNEL_NAMES), 40, 40)
        nuc, cell = _masks(out, r["path"])
        assert nuc.dtype == np.uint16 and cell.dtype == np.uint16 and nuc.shape == (40, 40)
    # only conditions (and the ground truth, which starts with "_") are folders
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(DEFAULT_CONDITIONS + ["_groundtruth"])
    assert not list(out.rglob("*.tmp"))
    img = tifffile.imread(out / manifest[0]["path"])
    bg = np.percentile(img, 5, axis=(1, 2))
    assert np.all((bg > 90) & (bg < 300)), bg  # camera offset + autofluorescence, not zero


def test_deterministic_and_independent_of_workers(tmp_path):
    kw = dict(conditions=["a", "b"], per_condition=8, size=32, progress=False)  # 16 jobs: the pool runs
    a = _files(simulate(tmp_path / "a", seed=5, workers=1, **kw))
    b = _files(simulate(tmp_path / "b", seed=5, workers=2, **kw))
    assert a == b
    c = _files(simulate(tmp_path / "c", seed=6, workers=1, **kw))
    assert a.keys() == c.keys() and a["a/a_00000.tif"] != c["a/a_00000.tif"]
    # an image does not depend on how many others were drawn
    d = _files(simulate(tmp_path / "d", seed=5, workers=1, **{**kw, "per_condition": 2}))
    assert d["b/b_00001.tif"] == a["b/b_00001.tif"]


def test_ground_truth_matches_masks(pair):
    planted = _read_csv(pair / "_groundtruth" / "planted.csv")
    cells = _read_csv(pair / "_groundtruth" / "cells.csv")
    by_path: dict[str, list[dict]] = {}
    for c in cells:
        by_path.setdefault(c["path"], []).append(c)
    ratios = []
    for p in planted:
        nuc, cell = _masks(pair, p["path"])
        n = int(p["n_cells"])
        assert sorted(np.unique(cell[cell > 0])) == list(range(1, n + 1))
        assert sorted(np.unique(nuc[nuc > 0])) == list(range(1, n + 1))
        assert np.all(cell[nuc > 0] == nuc[nuc > 0])  # every nucleus inside its own cell
        rows = by_path[p["path"]]
        assert [int(r["cell_id"]) for r in rows] == list(range(1, n + 1))
        for r in rows:
            i = int(r["cell_id"])
            assert int(r["nucleus_area"]) == int((nuc == i).sum())
            assert int(r["cell_area"]) == int((cell == i).sum())
            ys, xs = np.nonzero(cell == i)
            assert float(r["centroid_y"]) == pytest.approx(ys.mean(), abs=1e-2)
            assert float(r["centroid_x"]) == pytest.approx(xs.mean(), abs=1e-2)
            ratios.append(int(r["nucleus_area"]) / float(r["nucleus_area_planted"]))
        assert float(p["nucleus_area_mean"]) == pytest.approx(
            np.mean([float(r["nucleus_area_planted"]) for r in rows]), rel=1e-3)
    assert 0.93 < np.mean(ratios) < 1.07 and np.percentile(np.abs(np.log(ratios)), 95) < 0.2


# ------------------------------------------------------------------------------ phenotypes
def test_nucleus_grows(measured):
    r = measured["high"]["nuc_area"].mean() / measured["control"]["nuc_area"].mean()
    assert 1.25 < r < 1.55, r


def test_cells_are_lost(measured):
    r = measured["high"]["n_cells"].mean() / measured["control"]["n_cells"].mean()
    assert 0.45 < r < 0.8, r
    assert 3 <= measured["control"]["n_cells"].mean() <= 6


def test_golgi_fragments_and_scatters_with_total_conserved(measured):
    ctl, high = measured["control"], measured["high"]
    assert ctl["golgi_objects"].mean() < 1.3  # one compact blob per cell
    assert high["golgi_objects"].mean() > 3 * ctl["golgi_objects"].mean()  # many puncta (some merge in the PSF)
    assert np.median(high["golgi_spread"]) > 1.8 * np.median(ctl["golgi_spread"])
    r = high["golgi_total"].mean() / ctl["golgi_total"].mean()
    assert 0.85 < r < 1.15, r


def test_actin_translocates_into_the_nucleus(measured):
    ctl, high = np.median(measured["control"]["actin_nc"]), np.median(measured["high"]["actin_nc"])
    assert ctl < 0.6 and high > 1.3 and high > 3 * ctl, (ctl, high)


def test_tubulin_cytoplasm_is_ten_percent_brighter(measured):
    r = measured["high"]["tub_cyto"].mean() / measured["control"]["tub_cyto"].mean()
    assert 1.04 < r < 1.17, r


def test_cell_count_scales_with_area(tmp_path):
    small = simulate(tmp_path / "s", conditions=["c"], per_condition=8, size=32, progress=False)
    large = simulate(tmp_path / "l", conditions=["c"], per_condition=6, size=96, progress=False)
    n = {k: np.mean([int(r["n_cells"]) for r in _read_csv(p / "_groundtruth" / "planted.csv")])
         for k, p in (("s", small), ("l", large))}
    assert n["l"] > 4 * n["s"]


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, option", [
    (dict(size=16), "--size"),
    (dict(per_condition=0), "--per-condition"),
    (dict(conditions=["a", "a"]), "--conditions"),
    (dict(conditions=["a", ""]), "--conditions"),
    (dict(conditions=[]), "--conditions"),
    (dict(conditions=["_hidden"]), "--conditions"),
    (dict(conditions=["a", "b"], strengths=[0.0]), "strengths"),
    (dict(seed=-1), "--seed"),
])
def test_bad_options(tmp_path, kwargs, option):
    with pytest.raises(PhenolensError, match=option):
        simulate(tmp_path / "x", progress=False, **{"per_condition": 1, **kwargs})
    assert not (tmp_path / "x").exists()


def test_existing_dataset_needs_overwrite(tmp_path):
    out = simulate(tmp_path / "d", conditions=["a", "b"], per_condition=2, size=32, progress=False)
    with pytest.raises(PhenolensError, match="exists already"):
        simulate(out, conditions=["a", "b"], per_condition=2, size=32, progress=False)
    simulate(out, conditions=["x"], per_condition=1, size=32, seed=1, progress=False, overwrite=True)
    # issue 9: the folder also holds phenolens's marker (the inventory --overwrite removes)
    assert sorted(p.name for p in out.iterdir()) == [".phenolens.json", "_groundtruth", "manifest.csv", "x"]
    assert len(_read_csv(out / "_groundtruth" / "planted.csv")) == 1


def test_refuses_foreign_files(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "mine.tif").write_bytes(b"x")
    with pytest.raises(PhenolensError, match="not a simulated dataset"):
        simulate(tmp_path / "d", conditions=["a"], per_condition=1, size=32, progress=False, overwrite=True)
    assert (tmp_path / "d" / "a" / "mine.tif").exists()


def test_puncta_channel_plants_small_spots_and_leaves_the_other_channels_alone(tmp_path):
    """--puncta: a fifth channel (LC3) whose cytoplasmic spots multiply with strength while the cell's
    LC3 stays the same; the first four channels are the files a run without it writes."""
    import tifffile
    from scipy import ndimage

    from phenolens.data.simulate import simulate

    plain = simulate(tmp_path / "plain", conditions=["control", "high"], per_condition=6, size=48, seed=4,
                     progress=False, workers=1)
    punct = simulate(tmp_path / "punct", conditions=["control", "high"], per_condition=6, size=48, seed=4,
                     progress=False, workers=1, puncta=True)
    contrast, totals, maxima = {}, {}, {}
    for cond in ("control", "high"):
        cvs, tot, peaks = [], [], []
        for j in range(6):
            name = f"{cond}_{j:05d}"
            a = tifffile.imread(plain / cond / f"{name}.tif")
            b = tifffile.imread(punct / cond / f"{name}.tif")
            assert b.shape == (5, 48, 48) and np.array_equal(a, b[:4])
            cells = tifffile.imread(punct / "_groundtruth" / "masks" / cond / f"{name}_cells.tif")
            nuclei = tifffile.imread(punct / "_groundtruth" / "masks" / cond / f"{name}_nuclei.tif")
            lc3 = b[4].astype(float) - np.median(b[4][cells == 0])
            for i in range(1, int(cells.max()) + 1):
                cyto = (cells == i) & (nuclei == 0)
                if cyto.sum() > 30:
                    v = lc3[cyto]
                    cvs.append(v.std() / v.mean())
                    tot.append(lc3[cells == i].sum())
                    # small bright spots: local maxima standing well above the cell's median
                    peak = (ndimage.maximum_filter(lc3, size=3) == lc3) & cyto & (lc3 > 1.8 * np.median(v))
                    peaks.append(int(peak.sum()))
        contrast[cond], totals[cond], maxima[cond] = np.mean(cvs), np.mean(tot), np.mean(peaks)
    assert contrast["high"] > 1.5 * contrast["control"], contrast
    assert maxima["high"] > 2 * maxima["control"] + 1, maxima
    # the signal gathers into spots, it is not created: total LC3 per cell within 25 %
    assert abs(totals["high"] / totals["control"] - 1) < 0.25, totals
    import csv

    with open(punct / "_groundtruth" / "planted.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    spots = {c: np.mean([float(r["lc3_puncta"]) for r in rows if r["condition"] == c]) for c in ("control", "high")}
    assert spots["control"] < 6 < 10 < spots["high"], spots


def test_phenotypes_plants_only_the_named_ones(tmp_path):
    """--phenotypes: a phenotype left out keeps the control's value at every strength (here cell loss,
    whose absence makes 'source nuclei found again' a measure of identity alone), the named ones move."""
    import csv

    from phenolens.data.simulate import simulate
    from phenolens.errors import PhenolensError

    out = simulate(tmp_path / "sel", conditions=["control", "high"], per_condition=30, size=48, seed=2,
                   progress=False, phenotypes=["nuclear-enlargement", "lc3-puncta"], puncta=True)
    with open(out / "_groundtruth" / "planted.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by = {c: [r for r in rows if r["condition"] == c] for c in ("control", "high")}
    for key in ("expected_cells", "golgi_fragments_expected", "translocation_ratio", "tubulin_gain"):
        assert {r[key] for r in by["high"]} == {r[key] for r in by["control"]}, key  # not planted
    assert float(by["high"][0]["nucleus_area_scale"]) == pytest.approx(1.4)
    assert float(by["high"][0]["lc3_puncta_expected"]) > 3 * float(by["control"][0]["lc3_puncta_expected"])
    assert by["high"][0]["phenotypes"] == "nuclear-enlargement+lc3-puncta"
    cells = {c: np.mean([int(r["n_cells"]) for r in by[c]]) for c in by}
    assert abs(cells["high"] / cells["control"] - 1) < 0.25, cells  # no cell loss (40 % when planted)
    with pytest.raises(PhenolensError, match="unknown golgi"):
        simulate(tmp_path / "bad", phenotypes=["golgi"], progress=False)
    with pytest.raises(PhenolensError, match="needs --puncta"):
        simulate(tmp_path / "bad2", phenotypes=["lc3-puncta"], progress=False)


def test_every_planted_phenotype_has_one_readout_feature():
    from phenolens.data.simulate import PHENOTYPES
    from phenolens.measure.planted import PLANTED_FEATURES, SIMULATOR_NAMES

    assert set(SIMULATOR_NAMES) == set(PLANTED_FEATURES)
    assert sorted(SIMULATOR_NAMES.values()) == sorted(PHENOTYPES)


def test_separate_mode_plants_one_phenotype_per_condition(tmp_path):
    """--mode separate (issue 12, item 7): 'control' plus one condition per phenotype, named after it; each
    plants its phenotype alone, and the cell count stays the control's (cell loss left out by default)."""
    import csv

    from phenolens.data.simulate import simulate

    out = simulate(tmp_path / "sep", per_condition=30, size=48, seed=3, progress=False, mode="separate")
    with open(out / "manifest.csv", newline="") as fh:
        conds = list(dict.fromkeys(r["condition"] for r in csv.DictReader(fh)))
    assert conds == ["control", "golgi-fragmentation", "nuclear-enlargement", "actin-translocation",
                     "tubulin-shift"]
    with open(out / "_groundtruth" / "planted.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    first = {c: next(r for r in rows if r["condition"] == c) for c in conds}
    ctrl = first["control"]
    assert ctrl["phenotypes"] == "" and float(ctrl["strength"]) == 0.0
    # the parameter each phenotype moves, and its value at strength 1
    moved = {"golgi-fragmentation": "golgi_fragments_expected", "nuclear-enlargement": "nucleus_area_scale",
             "actin-translocation": "translocation_ratio", "tubulin-shift": "tubulin_gain"}
    for cond, key in moved.items():
        r = first[cond]
        assert r["phenotypes"] == cond and float(r["strength"]) == 1.0
        for other_key in moved.values():  # its own parameter moves, every other one is the control's
            assert (r[other_key] != ctrl[other_key]) == (other_key == key), (cond, other_key)
        assert r["expected_cells"] == ctrl["expected_cells"]
    # in the pixels: nuclei grow only where nuclear enlargement is planted
    with open(out / "_groundtruth" / "cells.csv", newline="") as fh:
        cells = list(csv.DictReader(fh))
    area = {c: np.mean([float(r["nucleus_area"]) for r in cells if r["condition"] == c]) for c in conds}
    assert area["nuclear-enlargement"] > 1.2 * area["control"], area
    assert abs(area["golgi-fragmentation"] / area["control"] - 1) < 0.1, area
    n = {c: np.mean([int(r["n_cells"]) for r in rows if r["condition"] == c]) for c in conds}
    assert all(abs(n[c] / n["control"] - 1) < 0.25 for c in conds), n


def test_separate_mode_options(tmp_path):
    import csv

    from phenolens.cli import main
    from phenolens.data.simulate import simulate
    from phenolens.errors import PhenolensError

    main(["simulate", str(tmp_path / "s"), "--mode", "separate", "--phenotypes", "cell-loss,lc3-puncta",
          "--puncta", "--per-condition", "1", "--size", "32"])
    with open(tmp_path / "s" / "manifest.csv", newline="") as fh:
        assert [r["condition"] for r in csv.DictReader(fh)] == ["control", "cell-loss", "lc3-puncta"]
    with pytest.raises(PhenolensError, match="--conditions cannot be given with --mode separate"):
        simulate(tmp_path / "x", conditions=["a", "b"], mode="separate", progress=False)
    with pytest.raises(PhenolensError, match="--mode: 'apart' is unknown"):
        simulate(tmp_path / "y", mode="apart", progress=False)
    with pytest.raises(PhenolensError, match="strengths: got 2 values for 5 conditions"):
        simulate(tmp_path / "z", mode="separate", strengths=[0, 1], progress=False)
