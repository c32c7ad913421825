"""discover(): manifests, a folder per condition, a single-condition folder, and their errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from phenolens.data.records import ImageRecord, conditions_in_order, discover, validate_training_conditions
from phenolens.errors import PhenolensError

BBBC021 = Path(os.environ.get("PHENOLENS_TEST_DATA", "/work/shared/data")) / "bbbc021-cycloheximide"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # contents are only checked at read time
    return path


def names(records):
    return [(r.condition, r.path.name) for r in records]


def test_folder_per_condition_natural_order_and_ignored_entries(tmp_path):
    for name in ["img10.tif", "img2.TIF", "img1.png", "Img3.tiff", "notes.txt", ".hidden.tif"]:
        touch(tmp_path / "dose10" / name)
    touch(tmp_path / "dose2" / "a.tif")
    touch(tmp_path / "_groundtruth" / "truth.tif")
    touch(tmp_path / ".cache" / "x.tif")
    touch(tmp_path / "root_level.tif")
    records = discover(tmp_path)
    assert names(records) == [("dose2", "a.tif"), ("dose10", "img1.png"), ("dose10", "img2.TIF"),
                              ("dose10", "Img3.tiff"), ("dose10", "img10.tif")]
    assert all(r.meta == {} for r in records)
    assert conditions_in_order(records) == ["dose2", "dose10"]
    assert names(discover(tmp_path, condition="dose10"))[0] == ("dose10", "img1.png")
    with pytest.raises(PhenolensError, match="--from nope"):
        discover(tmp_path, condition="nope")


def test_single_condition_folder(tmp_path):
    folder = tmp_path / "ctrl"
    for name in ["b.tif", "a.png"]:
        touch(folder / name)
    assert names(discover(folder)) == [("ctrl", "a.png"), ("ctrl", "b.tif")]
    assert {r.condition for r in discover(folder, condition="DMSO")} == {"DMSO"}
    # a single image file: its folder names the condition
    assert names(discover(folder / "a.png")) == [("ctrl", "a.png")]


def test_empty_condition_folder_is_named(tmp_path):
    touch(tmp_path / "a" / "x.tif")
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "other" / "readme.txt")
    with pytest.raises(PhenolensError, match="empty"):
        discover(tmp_path)


def test_no_images(tmp_path):
    touch(tmp_path / "readme.txt")
    with pytest.raises(PhenolensError, match="no images"):
        discover(tmp_path)
    with pytest.raises(PhenolensError, match="nope"):
        discover(tmp_path / "nope")
    with pytest.raises(PhenolensError, match="readme.txt"):
        discover(tmp_path / "readme.txt")


def test_manifest_relative_absolute_and_meta(tmp_path):
    touch(tmp_path / "imgs" / "a.tif")
    b = touch(tmp_path / "elsewhere" / "b.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"plate,path,condition,well\nP1,imgs/a.tif,ctrl,A01\n\nP2,{b},treated,B02\n")
    records = discover(manifest)
    assert records == [ImageRecord(tmp_path / "imgs" / "a.tif", "ctrl", {"plate": "P1", "well": "A01"}),
                       ImageRecord(b, "treated", {"plate": "P2", "well": "B02"})]
    assert list(records[0].meta) == ["plate", "well"]
    assert names(discover(manifest, condition="treated")) == [("treated", "b.png")]
    with pytest.raises(PhenolensError, match="--from"):
        discover(manifest, condition="other")


def test_manifest_errors(tmp_path):
    touch(tmp_path / "a.tif")
    m = tmp_path / "m.csv"
    m.write_text("file,condition\na.tif,ctrl\n")
    with pytest.raises(PhenolensError, match=r"m\.csv.*missing column.*path"):
        discover(m)
    m.write_text("path,condition\na.tif,ctrl\nmissing.tif,ctrl\n")
    with pytest.raises(PhenolensError, match=r"m\.csv row 3: missing\.tif"):
        discover(m)
    m.write_text("path,condition\na.tif,\n")
    with pytest.raises(PhenolensError, match=r"m\.csv row 2.*empty condition"):
        discover(m)
    m.write_text("")
    with pytest.raises(PhenolensError, match=r"m\.csv"):
        discover(m)


def test_validate_training_conditions():
    validate_training_conditions(["a", "b"])
    with pytest.raises(PhenolensError, match="at least 2 conditions, found 1"):
        validate_training_conditions(["only"])
    with pytest.raises(PhenolensError, match="at least 2 conditions, found 0"):
        validate_training_conditions([])


@pytest.mark.skipif(not BBBC021.is_dir(), reason=f"{BBBC021} missing")
def test_real_bbbc021_folder_and_manifest():
    by_folder = discover(BBBC021)
    by_manifest = discover(BBBC021 / "manifest.csv")
    assert len(by_folder) == len(by_manifest) == 720
    assert set(conditions_in_order(by_folder)) == {"DMSO", "CHX_5uM", "CHX_15uM", "CHX_50uM"}
    # issue 9: the manifest.csv beside the folders gives the dose order (it was alphabetical before)
    assert conditions_in_order(by_folder) == ["DMSO", "CHX_5uM", "CHX_15uM", "CHX_50uM"]
    assert set(by_manifest[0].meta) >= {"compound", "plate", "well"}
    assert len(discover(BBBC021 / "manifest.csv", condition="DMSO")) == 360
