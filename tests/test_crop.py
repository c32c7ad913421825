"""`phenolens crop`: a screen's whole fields (LoadData CSV or per-channel files) -> single-cell crops.

The real fields are CellProfiler's ExampleFly images (read from PHENOLENS_TEST_DATA by path); the
rest are small synthetic fields whose nuclei sit at known places.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import SHARED_DATA, run_cli

FLY = SHARED_DATA / "cellprofiler-examplefly"
FLY_SITES = ("002", "076", "218")
FLY_CHANNELS = (("D", "DNA"), ("F", "FITC"), ("R", "Rhodamine"))
needs_fly = pytest.mark.skipif(not (FLY / "01_POS002_D.TIF").is_file(),
                               reason=f"ExampleFly images not found at {FLY}; set PHENOLENS_TEST_DATA")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_fly_loaddata(path: Path) -> Path:
    """A CellProfiler LoadData CSV for the three ExampleFly fields (absolute PathName, as CellProfiler writes)."""
    rows = []
    for site in FLY_SITES:
        row = {}
        for token, name in FLY_CHANNELS:
            row[f"FileName_{name}"] = f"01_POS{site}_{token}.TIF"
            row[f"PathName_{name}"] = str(FLY)
        row.update(Metadata_Plate="01", Metadata_Site=site, Metadata_Treatment="untreated")
        rows.append(row)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def careful_threshold_count(dna: np.ndarray) -> int:
    """An independent nucleus count by another recipe than phenolens's (whose Otsu threshold and
    distance-transform split it checks): three-class Otsu on the smoothed DNA image with the middle
    class as foreground (CellProfiler's three-class thresholding, which keeps dim nuclei), objects of
    8-40 px diameter, touching nuclei split at the peaks of the intensity smoothed at sigma 3. On the
    top-left 250 x 250 px of POS002 it finds 34 nuclei; a count by eye there gives about 36."""
    from scipy import ndimage as ndi
    from skimage import filters, measure, morphology, segmentation
    from skimage.feature import peak_local_max

    smooth = filters.gaussian(dna.astype(float), sigma=1.5, preserve_range=True)
    t = filters.threshold_multiotsu(smooth, classes=3)[0]
    fg = ndi.binary_fill_holes(morphology.remove_small_objects(smooth > t, max_size=int(np.pi * 4 ** 2)))
    peaks = peak_local_max(filters.gaussian(dna.astype(float), sigma=3), min_distance=6, labels=measure.label(fg))
    markers = np.zeros(dna.shape, int)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    lab = segmentation.watershed(-smooth, markers, mask=fg)
    areas = np.bincount(lab.ravel())[1:]
    return int(((areas >= np.pi * 4 ** 2) & (areas <= np.pi * 20 ** 2)).sum())


@needs_fly
def test_examplefly_by_pattern_and_by_loaddata_give_the_same_crops(tmp_path):
    by_pattern, by_table = tmp_path / "pattern", tmp_path / "table"
    code, out, err = run_cli("crop", FLY, by_pattern, "--pattern", "01_POS{site}_{channel}.TIF",
                             "--channel-names", "D=DNA,F=FITC,R=Rhodamine", "--condition", "untreated", "--size", "64")
    assert code == 0, err
    table = write_fly_loaddata(tmp_path / "load_data.csv")
    code, out2, err = run_cli("crop", table, by_table, "--condition-from", "Metadata_Treatment", "--size", "64")
    assert code == 0, err
    a, b = _rows(by_pattern / "manifest.csv"), _rows(by_table / "manifest.csv")
    assert len(a) == len(b) > 900  # ~1500 crops of ~1900 nuclei in the three fields
    assert [(r["center_y"], r["center_x"]) for r in a] == [(r["center_y"], r["center_x"]) for r in b]
    # metadata carried: the table's every Metadata_* column, the pattern's fields
    assert {"Metadata_Plate", "Metadata_Site", "Metadata_Treatment", "source_DNA", "source_FITC",
            "source_Rhodamine", "y0", "x0", "y1", "x1"} <= set(b[0])
    assert {r["Metadata_Site"] for r in a} == set(FLY_SITES)
    # a crop is exactly its window of the field's files, channel by channel, named
    for r in (b[0], b[len(b) // 2], b[-1]):
        crop = tifffile.imread(by_table / r["path"])
        assert crop.dtype == np.uint16 and crop.shape == (3, 64, 64)
        y0, x0 = int(r["y0"]), int(r["x0"])
        for c, name in enumerate(("DNA", "FITC", "Rhodamine")):
            field = tifffile.imread(r[f"source_{name}"])
            assert np.array_equal(crop[c], field[y0:y0 + 64, x0:x0 + 64])
        with tifffile.TiffFile(by_table / r["path"]) as tif:
            assert json.loads(tif.pages[0].description)["Channel"]["Name"] == ["DNA", "FITC", "Rhodamine"]
    # the crop dataset is what `train` reads: a folder per condition with the manifest beside it
    from phenolens.data.records import discover

    assert len(discover(by_table)) == len(b)


@needs_fly
def test_examplefly_nuclei_found_against_a_careful_threshold(tmp_path):
    out = tmp_path / "crops"
    code, _, err = run_cli("crop", FLY, out, "--pattern", "01_POS{site}_{channel}.TIF", "--condition", "fly",
                           "--channel-names", "D=DNA,F=FITC,R=Rhodamine", "--size", "64")
    assert code == 0, err
    fields = {r["field"]: r for r in _rows(out / "fields.csv")}
    for site in FLY_SITES:
        reference = careful_threshold_count(tifffile.imread(FLY / f"01_POS{site}_D.TIF"))
        found = int(fields[site]["nuclei"])
        assert 0.9 <= found / reference <= 1.1, (site, found, reference)  # measured 0.96, 1.00, 1.01
        kept = int(fields[site]["crops"]) + int(fields[site]["skipped_border"]) + int(fields[site]["skipped_overlap"])
        assert kept == found


# ------------------------------------------------------------------------------ synthetic fields
def write_field_files(folder: Path, name: str, centers, *, size: int = 96, dtype=np.uint16, gain: float = 1.0,
                      radius: float = 5.0, seed: int = 0) -> None:
    """Per-channel TIFFs `{name}_w1.tif` (DNA: a disc per center) and `{name}_w2.tif` (a smooth cytoplasm)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    dna = np.full((size, size), 100.0)
    cyto = np.full((size, size), 80.0)
    for cy, cx in centers:
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        dna += 2000.0 * (d2 <= radius ** 2)
        cyto += 600.0 * np.exp(-d2 / (2 * (2.5 * radius) ** 2))
    top = 250 if dtype == np.uint8 else 60000
    for ch, img in (("w1", dna), ("w2", cyto)):
        img = img * gain + rng.normal(0, 5, img.shape)
        if dtype == np.uint8:
            img = img / 10
        tifffile.imwrite(folder / f"{name}_w{ch[1]}.tif", np.clip(img, 0, top).astype(dtype))


def write_screen(root: Path, fields: dict[str, list], **kw) -> Path:
    """A folder of per-channel files, one field per entry of FIELDS ('P1_A01' -> nucleus centers)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, centers) in enumerate(fields.items()):
        write_field_files(root, name, centers, seed=i, **kw)
    return root


GRID = [(24, 24), (24, 72), (72, 24), (72, 72), (48, 48)]
PATTERN = "{plate}_{well}_w{channel}.tif"


def test_crops_follow_the_windows_and_options(tmp_path):
    screen = write_screen(tmp_path / "screen", {"P1_A01": GRID, "P1_B01": GRID[:2], "P2_A01": GRID})
    out = tmp_path / "crops"
    code, _, err = run_cli("crop", screen, out, "--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin",
                           "--condition-from", "well", "--size", "32", "--nucleus-diameter", "10")
    assert code == 0, err
    rows = _rows(out / "manifest.csv")
    assert len(rows) == 5 + 2 + 5
    assert {r["condition"] for r in rows} == {"A01", "B01"}
    assert {r["Metadata_Plate"] for r in rows} == {"P1", "P2"} and rows[0]["plate"] == "P1"
    centers = sorted((round(float(r["center_y"])), round(float(r["center_x"]))) for r in rows if r["field"] == "P1_A01")
    assert centers == sorted(GRID)
    # --scale 0.5 bins a 2*size window 2x2 (the mean of each block), --border pad keeps windows that leave the field
    binned = tmp_path / "binned"
    code, _, err = run_cli("crop", screen, binned, "--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin",
                           "--condition-from", "well", "--size", "32", "--scale", "0.5", "--nucleus-diameter", "10")
    assert code == 0, err
    assert len(_rows(binned / "manifest.csv")) == 2  # a 64 px window fits the 96 px fields only at their centre
    r = _rows(binned / "manifest.csv")[0]
    crop = tifffile.imread(binned / r["path"]).astype(float)
    field = tifffile.imread(screen / "P1_A01_w1.tif").astype(float)
    y0, x0 = int(r["y0"]), int(r["x0"])
    window = field[y0:y0 + 64, x0:x0 + 64]
    assert np.allclose(crop[0], np.rint(window.reshape(32, 2, 32, 2).mean(axis=(1, 3))), atol=0.51)
    padded = tmp_path / "padded"
    code, _, err = run_cli("crop", screen, padded, "--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin",
                           "--condition-from", "well", "--size", "32", "--scale", "0.5", "--border", "pad",
                           "--nucleus-diameter", "10")
    assert code == 0, err
    assert len(_rows(padded / "manifest.csv")) == 12


def test_touching_nuclei_are_skipped_past_the_overlap_limit(tmp_path):
    pair = [(30, 30), (30, 40), (70, 70)]  # two discs of radius 5 touching side by side, one alone
    screen = write_screen(tmp_path / "screen", {"P1_A01": pair})
    base = ["--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin", "--condition", "c", "--size", "24",
            "--nucleus-diameter", "10"]
    code, out, err = run_cli("crop", screen, tmp_path / "strict", *base, "--max-overlap", "0.05")
    assert code == 0, err
    summary = _rows(tmp_path / "strict" / "fields.csv")[0]
    assert summary["nuclei"] == "3" and summary["skipped_overlap"] == "2" and summary["crops"] == "1"
    code, _, err = run_cli("crop", screen, tmp_path / "all", *base, "--max-overlap", "1")
    assert code == 0, err
    assert _rows(tmp_path / "all" / "fields.csv")[0]["crops"] == "3"


def test_two_workers_write_the_same_crops_as_one(tmp_path):
    screen = write_screen(tmp_path / "screen", {f"P1_A0{i}": GRID for i in range(1, 5)})
    args = ["--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin", "--condition", "c", "--size", "32",
            "--nucleus-diameter", "10", "--border", "pad"]
    assert run_cli("crop", screen, tmp_path / "one", *args)[0] == 0
    assert run_cli("crop", screen, tmp_path / "two", *args, "--workers", "2")[0] == 0
    one, two = _rows(tmp_path / "one" / "manifest.csv"), _rows(tmp_path / "two" / "manifest.csv")
    assert one == two and len(one) == 20
    for r in one:
        assert (tmp_path / "one" / r["path"]).read_bytes() == (tmp_path / "two" / r["path"]).read_bytes()


def test_a_killed_run_resumes_without_redoing_or_duplicating(tmp_path, monkeypatch):
    import phenolens.run.crop as crop_module

    screen = write_screen(tmp_path / "screen", {f"P1_A0{i}": GRID for i in range(1, 5)})
    out = tmp_path / "crops"
    args = ["crop", screen, out, "--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin", "--condition", "c",
            "--size", "32", "--nucleus-diameter", "10", "--border", "pad"]
    real = crop_module.crop_field
    calls = []

    def dies_on_the_third(field, *a):
        calls.append(field.key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill mid-run: two fields done, the third in flight
        return real(field, *a)

    monkeypatch.setattr(crop_module, "crop_field", dies_on_the_third)
    code, _, err = run_cli(*args)
    assert code == 130 and "interrupted" in err
    assert not (out / "manifest.csv").exists()
    assert sorted(p.stem for p in (out / "_fields").glob("*.json")) == ["P1_A01", "P1_A02"]
    calls.clear()
    monkeypatch.setattr(crop_module, "crop_field", lambda field, *a: (calls.append(field.key), real(field, *a))[1])
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert calls == ["P1_A03", "P1_A04"]  # finished fields are not redone
    rows = _rows(out / "manifest.csv")
    assert len(rows) == 20 and len({r["path"] for r in rows}) == 20
    assert sorted(p.relative_to(out).as_posix() for p in (out / "c").iterdir()) == sorted(r["path"] for r in rows)
    # the same OUT with other settings is refused, not mixed
    code, _, err = run_cli(*args[:-4], "--size", "24", "--border", "pad")
    assert code == 2 and "other settings" in err and "--overwrite" in err


def test_illumination_and_plate_normalisation(tmp_path):
    """Two plates of 40 fields, the second twice as bright, both under a vignette: after --illumination the crops of
    cells at the edge and at the centre agree, after --normalize plate the two plates agree."""
    rng = np.random.default_rng(1)
    root = tmp_path / "screen"
    root.mkdir()
    size = 96
    yy, xx = np.mgrid[:size, :size]
    vignette = 1.0 - 0.8 * (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 2) ** 2))
    for plate, gain in (("P1", 1.0), ("P2", 2.0)):
        for i in range(40):
            centers = rng.uniform(10, size - 10, (3, 2))
            dna = np.full((size, size), 200.0)
            for cy, cx in centers:
                dna += 1500.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) <= 25)
            dna = dna * vignette * gain
            for ch in ("1", "2"):
                tifffile.imwrite(root / f"{plate}_A{i:02d}_w{ch}.tif", np.clip(dna, 0, 65535).astype(np.uint16))
    args = ["--pattern", PATTERN, "--channel-names", "1=DNA,2=Other", "--condition", "c", "--size", "16",
            "--nucleus-diameter", "10", "--border", "pad", "--max-overlap", "1"]
    code, _, err = run_cli("crop", root, tmp_path / "raw", *args)
    assert code == 0, err
    code, _, err = run_cli("crop", root, tmp_path / "flat", *args, "--illumination", "--normalize", "plate")
    assert code == 0, err
    assert (tmp_path / "flat" / "_plates" / "P1_illumination.tif").is_file()

    def nucleus_level(out: Path) -> dict[str, list[tuple[float, float]]]:
        by_plate: dict[str, list] = {}
        for r in _rows(out / "manifest.csv"):
            crop = tifffile.imread(out / r["path"])[0].astype(float)
            dist = np.hypot(float(r["center_y"]) - size / 2, float(r["center_x"]) - size / 2)
            by_plate.setdefault(r["plate"], []).append((dist, crop[6:10, 6:10].mean()))
        return by_plate

    def edge_over_centre(values):
        values = np.array(values)
        near, far = values[values[:, 0] < np.median(values[:, 0])], values[values[:, 0] >= np.median(values[:, 0])]
        return far[:, 1].mean() / near[:, 1].mean()

    raw, flat = nucleus_level(tmp_path / "raw"), nucleus_level(tmp_path / "flat")
    assert edge_over_centre(raw["P1"]) < 0.92, edge_over_centre(raw["P1"])  # the vignette dims the edge
    assert abs(edge_over_centre(flat["P1"]) - 1) < abs(edge_over_centre(raw["P1"]) - 1) / 2, edge_over_centre(flat["P1"])
    plate_ratio = lambda d: np.mean([v for _, v in d["P2"]]) / np.mean([v for _, v in d["P1"]])  # noqa: E731
    assert plate_ratio(raw) > 1.8 and abs(plate_ratio(flat) - 1) < 0.1


# ------------------------------------------------------------------------------ bad input
def test_loaddata_whose_channel_columns_disagree(tmp_path):
    screen = write_screen(tmp_path / "screen", {"P1_A01": GRID})
    table = tmp_path / "load_data.csv"
    table.write_text("FileName_DNA,PathName_DNA,FileName_Actin,PathName_Tubulin,Metadata_Condition\n"
                     f"P1_A01_w1.tif,{screen},P1_A01_w2.tif,{screen},c\n")
    code, out, err = run_cli("crop", table, tmp_path / "out", "--size", "32")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "channel columns disagree" in err and "FileName_Actin has no PathName_Actin" in err
    assert not (tmp_path / "out").exists()


def test_pattern_that_matches_nothing(tmp_path):
    screen = write_screen(tmp_path / "screen", {"P1_A01": GRID})
    code, _, err = run_cli("crop", screen, tmp_path / "out", "--pattern", "{well}_s{site}_w{channel}.TIF",
                           "--condition", "c")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "matches none of the 2 files" in err and "P1_A01_w1.tif" in err
    assert not (tmp_path / "out").exists()


def test_a_field_without_nuclei_is_one_line_and_the_rest_is_cropped(tmp_path):
    screen = write_screen(tmp_path / "screen", {"P1_A01": GRID, "P1_A02": []})
    args = ["--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin", "--condition", "c", "--size", "32",
            "--nucleus-diameter", "10", "--border", "pad"]
    code, out, err = run_cli("crop", screen, tmp_path / "out", *args)
    assert code == 0, err
    lines = [x for x in err.splitlines() if "no nuclei" in x]
    assert len(lines) == 1 and "P1_A02" in lines[0]
    assert len(_rows(tmp_path / "out" / "manifest.csv")) == 5
    # a screen where no field has nuclei: an error, and nothing of the user's touched
    empty = write_screen(tmp_path / "empty", {"P1_A01": [], "P1_A02": []})
    code, _, err = run_cli("crop", empty, tmp_path / "out2", *args)
    assert code == 2 and "no crops from any of the 2 field(s)" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in empty.iterdir()) == ["P1_A01_w1.tif", "P1_A01_w2.tif", "P1_A02_w1.tif", "P1_A02_w2.tif"]


def test_mixed_bit_depths(tmp_path):
    screen = tmp_path / "screen"
    screen.mkdir()
    write_field_files(screen, "P1_A01", GRID)
    write_field_files(screen, "P1_A02", GRID, dtype=np.uint8)
    code, _, err = run_cli("crop", screen, tmp_path / "out", "--pattern", PATTERN, "--condition", "c",
                           "--channel-names", "1=DNA,2=Actin", "--size", "32")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "mixed bit depths" in err and "16-bit" in err and "8-bit" in err
    # within one field too (read_field checks the files it reads together)
    from phenolens.screen.fields import ChannelSource, Field
    from phenolens.screen.read import read_field
    from phenolens.errors import PhenolensError

    mixed = Field("x", "c", {"DNA": ChannelSource(screen / "P1_A01_w1.tif"), "Actin": ChannelSource(screen / "P1_A02_w2.tif")})
    with pytest.raises(PhenolensError, match="field x: mixed bit depths"):
        read_field(mixed)


def test_output_inside_the_screen_or_over_user_files_is_refused(tmp_path):
    screen = write_screen(tmp_path / "screen", {"P1_A01": GRID})
    args = ["--pattern", PATTERN, "--condition", "c", "--channel-names", "1=DNA,2=Actin", "--size", "32"]
    code, _, err = run_cli("crop", screen, screen / "crops", *args)
    assert code == 2 and "lies inside the input" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = run_cli("crop", screen, mine, *args)
    assert code == 2 and "not written by phenolens" in err
    assert (mine / "notes.txt").read_text() == "keep"


def test_channel_names_travel_from_the_screen_to_the_model_and_the_features(tmp_path):
    screen = write_screen(tmp_path / "screen", {"P1_A01": GRID, "P1_A02": GRID, "P1_B01": GRID, "P1_B02": GRID})
    crops = tmp_path / "crops"
    assert run_cli("crop", screen, crops, "--pattern", PATTERN, "--channel-names", "2=Actin,1=Hoechst",
                   "--condition-from", "well", "--size", "32", "--nucleus-diameter", "10", "--border", "pad")[0] == 0
    from phenolens.data.io import stored_channel_names

    first = crops / _rows(crops / "manifest.csv")[0]["path"]
    assert stored_channel_names(first) == ["Actin", "Hoechst"]  # --channel-names orders them: Actin first
    assert stored_channel_names(first, [1]) == ["Hoechst"]
    crop = tifffile.imread(first)
    assert crop[1].max() > 1500 > crop[0].max()  # channel 1 is the DNA file (w1), as named
    model = tmp_path / "model"
    code, _, err = run_cli("train", crops / "manifest.csv", model, "--preset", "tiny", "--size", "32", "--steps", "2",
                           "--batch-size", "4")
    assert code == 0, err
    info = json.loads((model / "phenolens.json").read_text())
    assert info["input_stats"]["channel_names"] == ["Actin", "Hoechst"]
    from phenolens.run.measure import _named_channels

    assert _named_channels(info, first, None, 2) == ["Actin", "Hoechst"]
    assert _named_channels({}, first, None, 2) == ["Actin", "Hoechst"]  # from the images themselves
    assert _named_channels({}, screen / "P1_A01_w1.tif", None, 1) == ["ch0"]  # a file that names none


def test_users_label_images_replace_the_segmentation(tmp_path):
    screen = write_screen(tmp_path / "screen", {"P1_A01": GRID})
    labels = tmp_path / "labels"
    labels.mkdir()
    lab = np.zeros((96, 96), np.uint16)
    lab[40:56, 40:56] = 7  # one square "nucleus" at the centre; the discs elsewhere are not labelled
    tifffile.imwrite(labels / "P1_A01_nuclei.tif", lab)
    out = tmp_path / "crops"
    code, _, err = run_cli("crop", screen, out, "--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin",
                           "--condition", "c", "--size", "32", "--labels", labels)
    assert code == 0, err
    rows = _rows(out / "manifest.csv")
    assert [(r["nucleus"], r["center_y"], r["center_x"], r["nucleus_area"]) for r in rows] == [("7", "47.5", "47.5", "256")]
    (labels / "P1_A01_nuclei.tif").unlink()
    code, _, err = run_cli("crop", screen, tmp_path / "o2", "--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin",
                           "--condition", "c", "--size", "32", "--labels", labels)
    assert code == 2 and "no label image for field P1_A01" in err


def test_ome_tiff_fields_are_cropped_with_their_channel_names(tmp_path):
    """Vendor files: one OME-TIFF per field (ZCYX, cropped at the maximum over z), names from the OME-XML."""
    screen = tmp_path / "plate"
    screen.mkdir()
    for i in range(2):
        write_field_files(tmp_path, f"f{i}", GRID, seed=i)
        planes = np.stack([tifffile.imread(tmp_path / f"f{i}_w{c}.tif") for c in (1, 2)])
        stack = np.stack([planes // 2, planes])  # z = 1 is the brighter, in-focus plane
        tifffile.imwrite(screen / f"well{i}.ome.tif", stack, metadata={"axes": "ZCYX", "Channel": {"Name": ["DAPI", "GFP"]}})
    out = tmp_path / "crops"
    code, _, err = run_cli("crop", screen, out, "--condition", "DMSO", "--z", "max", "--size", "32",
                           "--nucleus-diameter", "10", "--border", "pad")
    assert code == 0, err
    rows = _rows(out / "manifest.csv")
    assert len(rows) == 10
    assert {r["Metadata_File"] for r in rows} == {"well0.ome.tif", "well1.ome.tif"}, rows[0]
    from phenolens.data.io import stored_channel_names

    first = out / rows[0]["path"]
    assert stored_channel_names(first) == ["DAPI", "GFP"]
    centre = next(r for r in rows if r["Metadata_File"] == "well0.ome.tif" and int(r["y0"]) == 32 and int(r["x0"]) == 32)
    crop = tifffile.imread(out / centre["path"])
    for c in (1, 2):  # the maximum over z is the in-focus plane, the field's own pixels
        field = tifffile.imread(tmp_path / f"f0_w{c}.tif")
        assert np.array_equal(crop[c - 1], field[32:64, 32:64])


def test_a_plate_map_names_the_conditions_and_travels_into_the_manifest(tmp_path):
    screen = write_screen(tmp_path / "screen", {"P1_B04": GRID, "P1_B05": GRID, "P2_B04": GRID})
    platemap = tmp_path / "platemap.txt"  # as the Cell Painting Gallery writes them: tab-separated, wells unpadded
    platemap.write_text("plate_map_name\twell_position\tcompound\tconcentration\n"
                        "map1\tB4\tDMSO\t0\nmap1\tB5\ttaxol\t0.3\n")
    out = tmp_path / "crops"
    code, _, err = run_cli("crop", screen, out, "--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin",
                           "--platemap", platemap, "--condition-from", "Metadata_compound,Metadata_concentration",
                           "--size", "32", "--nucleus-diameter", "10", "--border", "pad")
    assert code == 0, err
    rows = _rows(out / "manifest.csv")
    assert {(r["field"], r["condition"], r["Metadata_compound"]) for r in rows} == \
        {("P1_B04", "DMSO_0", "DMSO"), ("P1_B05", "taxol_0.3", "taxol"), ("P2_B04", "DMSO_0", "DMSO")}
    # a well the map does not list: one line naming it
    platemap.write_text("well_position\tcompound\nB4\tDMSO\n")
    code, _, err = run_cli("crop", screen, tmp_path / "o2", "--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin",
                           "--platemap", platemap, "--condition-from", "Metadata_compound")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no row for well B05" in err


def test_overwrite_removes_the_crops_and_nothing_a_user_put_beside_them(tmp_path):
    screen = write_screen(tmp_path / "screen", {"P1_A01": GRID, "P1_A02": GRID})
    out = tmp_path / "crops"
    args = ["crop", screen, out, "--pattern", PATTERN, "--channel-names", "1=DNA,2=Actin", "--condition-from", "well",
            "--size", "32", "--nucleus-diameter", "10", "--border", "pad"]
    assert run_cli(*args)[0] == 0
    (out / "A01" / "my_notes.txt").write_text("keep")
    (out / "A01" / "favourite_n1.png").write_bytes(b"mine")
    assert len(list((out / "A02").iterdir())) == 5
    # again with the condition from the plate instead of the well: other condition folders
    code, _, err = run_cli(*[a if a != "well" else "plate" for a in args], "--overwrite")
    assert code == 0, err
    assert (out / "A01" / "my_notes.txt").read_text() == "keep" and (out / "A01" / "favourite_n1.png").is_file()
    assert sorted(p.name for p in (out / "A01").iterdir()) == ["favourite_n1.png", "my_notes.txt"]
    assert not (out / "A02").exists()  # the earlier run's folder, emptied of its crops
    assert len(list((out / "P1").iterdir())) == 10 and len(_rows(out / "manifest.csv")) == 10


def test_a_field_of_another_bit_depth_in_the_middle_of_a_plate_is_refused(tmp_path):
    """The up-front check reads the first and last field of each plate; the others are checked as read."""
    screen = tmp_path / "screen"
    screen.mkdir()
    for name, dtype in (("P1_A01", np.uint16), ("P1_A02", np.uint8), ("P1_A03", np.uint16)):
        write_field_files(screen, name, GRID, dtype=dtype)
    code, _, err = run_cli("crop", screen, tmp_path / "out", "--pattern", PATTERN, "--condition", "c",
                           "--channel-names", "1=DNA,2=Actin", "--size", "32", "--nucleus-diameter", "10")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "mixed bit depths: field P1_A02" in err and "8-bit" in err and "16-bit" in err
    assert not (tmp_path / "out" / "manifest.csv").exists()
