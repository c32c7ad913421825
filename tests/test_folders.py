"""OutputFolder and check_apart: a folder phenolens writes only ever loses what phenolens wrote (issue 9, item 1)."""

from __future__ import annotations

import pytest

from phenolens.errors import PhenolensError
from phenolens.folders import MARKER, OutputFolder, check_apart


def test_overwrite_removes_only_recorded_paths(tmp_path):
    out = tmp_path / "run"
    folder = OutputFolder.open(out, "translate")
    (out / "a" / "b").mkdir(parents=True)
    (out / "a" / "b" / "x.tif").write_bytes(b"ours")
    (out / "index.csv").write_text("ours")
    folder.record(out / "a" / "b" / "x.tif", "index.csv")
    (out / "a" / "notes.txt").write_text("the user's")  # dropped in by the user afterwards
    (out / "mine.txt").write_text("the user's")

    again = OutputFolder.open(out, "translate", overwrite=True)

    assert not (out / "a" / "b").exists() and not (out / "index.csv").exists()
    assert (out / "a" / "notes.txt").read_text() == "the user's"
    assert (out / "mine.txt").read_text() == "the user's"
    assert again.files == []


def test_inventory_survives_reopening(tmp_path):
    folder = OutputFolder.open(tmp_path / "m", "model")
    (tmp_path / "m" / "checkpoints").mkdir()
    folder.record("checkpoints")
    reopened = OutputFolder.open(tmp_path / "m", "model")
    assert reopened.owns(tmp_path / "m" / "checkpoints" / "step-1" / "state.json")
    assert not reopened.owns("unet")


def test_unmarked_non_empty_folder_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cell.tif").write_bytes(b"irreplaceable")
    with pytest.raises(PhenolensError, match="not written by phenolens"):
        OutputFolder.open(tmp_path / "photos", "translate", overwrite=True)
    assert (tmp_path / "photos" / "cell.tif").read_bytes() == b"irreplaceable"
    assert not (tmp_path / "photos" / MARKER).exists()


def test_other_kind_is_refused(tmp_path):
    OutputFolder.open(tmp_path / "m", "model")
    with pytest.raises(PhenolensError, match="model"):
        OutputFolder.open(tmp_path / "m", "translate", overwrite=True)


def test_adopt_keeps_existing_files_out_of_the_inventory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "phenolens.json").write_text("{}")
    folder = OutputFolder.open(tmp_path / "m", "model", adopt=True)
    folder.clear()
    assert (tmp_path / "m" / "phenolens.json").is_file()


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PhenolensError, match="not a folder"):
        OutputFolder.open(tmp_path / "f", "translate")
    with pytest.raises(PhenolensError, match="cannot write"):
        OutputFolder.open(tmp_path / "f" / "out", "translate")


def test_paths_outside_the_folder_cannot_be_recorded(tmp_path):
    folder = OutputFolder.open(tmp_path / "run", "translate")
    with pytest.raises(ValueError):
        folder.record(tmp_path / "elsewhere.tif")
    with pytest.raises(ValueError):
        folder.record("../elsewhere.tif")


@pytest.mark.parametrize("out_rel, why", [
    ("data", "is the input"),
    ("data/control/run", "lies inside the input"),
    (".", "contains the input"),
    ("model", "is the model folder"),
    ("model/run", "lies inside the model folder"),
])
def test_check_apart_refuses_overlaps(tmp_path, out_rel, why):
    (tmp_path / "data" / "control").mkdir(parents=True)
    (tmp_path / "data" / "control" / "a.tif").write_bytes(b"x")
    (tmp_path / "model").mkdir()
    with pytest.raises(PhenolensError, match=why):
        check_apart(tmp_path / out_rel, inputs=[tmp_path / "data", tmp_path / "data" / "control" / "a.tif"],
                    models=[tmp_path / "model"])


def test_check_apart_allows_a_sibling_and_a_folder_beside_a_manifest(tmp_path):
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,condition\n")
    check_apart(tmp_path / "run", inputs=[tmp_path / "data", manifest], models=[tmp_path / "model"])
