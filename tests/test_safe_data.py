"""Issue 9, the data side: output folders of simulate / demo / measure / report never destroy a
user's file, inputs are checked as they are read (NaN/inf pixels, huge images, duplicate manifest
rows, damaged index.csv, impossible measure options), outputs get the user's umask, and a dataset
of condition folders keeps its dose order.

Each test is named after the issue item it checks and fails on the code before issue 9.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import fails_with, run_cli, snapshot, write_blob_images, write_fake_run

from phenolens.errors import PhenolensError

FAST = ["--steps", "2", "--inversion-iters", "1"]
TRAIN = ["--steps", "2", "--size", "16", "--batch-size", "2"]
MEASURE = ["--channel-names", "DNA,tubulin,actin,Golgi", "--no-judges", "--workers", "1", "--max-reference", "2"]
SIM_CONDS = ["control", "high"]


def user_folder(path: Path) -> dict[str, str]:
    """A folder of a user's own files (what --overwrite must never touch)."""
    (path / "plate1").mkdir(parents=True)
    (path / "plate1" / "A01.tif").write_bytes(b"irreplaceable image")
    (path / "notes.txt").write_text("my notes\n")
    return snapshot(path)


def float_tiff(path: Path, channels: int = 2, size: int = 24, nans: int = 3) -> Path:
    """A float32 channel-first TIFF with NANS NaN pixels in channel 0 (and one inf when nans > 1)."""
    rng = np.random.default_rng(0)
    img = rng.uniform(100, 3000, (channels, size, size)).astype(np.float32)
    img[0].flat[:nans] = np.nan
    if nans > 1:
        img[0].flat[0] = np.inf
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, img, photometric="minisblack", metadata={"axes": "CYX"})
    return path


# ------------------------------------------------------------------- a translate run, built by hand
@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    from phenolens.data.simulate import simulate

    return simulate(tmp_path_factory.mktemp("safe_sim") / "data", conditions=SIM_CONDS, per_condition=3, size=64,
                    seed=3, progress=False)


def fake_run(sim: Path, run: Path) -> Path:
    """A translate run whose 'translations' are real images (conftest.write_fake_run)."""
    return write_fake_run(sim, run, run.parent / f"{run.name}_model", SIM_CONDS, 2)


# =================================================================== item 1: output folders
def test_item1_simulate_overwrite_removes_only_what_the_simulator_wrote(tmp_path):
    out = tmp_path / "sim"
    assert run_cli("simulate", out, "--conditions", "a,b", "--per-condition", "2", "--size", "32")[0] == 0
    mine = out / "a" / "my_own_image.tif"
    mine.write_bytes(b"a user's image, put beside the simulated ones")
    (out / "b" / "annotations.csv").write_text("cell,label\n1,mitotic\n")
    code, _, err = run_cli("simulate", out, "--conditions", "x", "--per-condition", "1", "--size", "32", "--overwrite")
    assert code == 0, err
    assert mine.read_bytes() == b"a user's image, put beside the simulated ones"
    assert (out / "b" / "annotations.csv").is_file()
    assert not (out / "a" / "a_00000.tif").exists() and not (out / "b").joinpath("b_00001.tif").exists()
    assert (out / "x" / "x_00000.tif").is_file()


def test_item1_simulate_overwrite_of_an_older_dataset_keeps_users_files(tmp_path):
    out = tmp_path / "sim"
    assert run_cli("simulate", out, "--conditions", "a,b", "--per-condition", "2", "--size", "32")[0] == 0
    (out / ".phenolens.json").unlink(missing_ok=True)  # as written before phenolens marked its folders
    (out / "a" / "mine.tif").write_bytes(b"user")
    code, _, err = run_cli("simulate", out, "--conditions", "a", "--per-condition", "1", "--size", "32", "--overwrite")
    assert code == 0, err
    assert (out / "a" / "mine.tif").read_bytes() == b"user"
    assert not (out / "a" / "a_00001.tif").exists() and not (out / "b").exists()


def test_item1_simulate_refuses_a_users_folder(tmp_path):
    out = tmp_path / "mine"
    before = user_folder(out)
    fails_with(run_cli("simulate", out, "--per-condition", "1", "--size", "32", "--overwrite"), str(out))
    assert snapshot(out) == before


class _Stop(Exception):
    """Raised by a stand-in simulator: the test needs only what happens before the demo simulates."""


@pytest.fixture
def no_simulation(monkeypatch):
    import phenolens.data.simulate as simulate_module

    calls = []

    def stop(out, *args, **kwargs):
        calls.append(Path(out))
        raise _Stop(str(out))

    monkeypatch.setattr(simulate_module, "simulate", stop)
    return calls


def test_item1_demo_overwrite_refuses_a_users_folder(tmp_path, no_simulation):
    out = tmp_path / "mine"
    before = user_folder(out)
    fails_with(run_cli("demo", out, "--overwrite"), str(out))
    assert snapshot(out) == before and no_simulation == []


def test_item1_demo_overwrite_clears_only_what_the_demo_wrote(tmp_path, no_simulation):
    from phenolens.folders import OutputFolder

    out = tmp_path / "demo"
    folder = OutputFolder.open(out, "demo")
    (out / "summary.txt").write_text("old summary\n")
    folder.record("summary.txt")
    (out / "my_notes.txt").write_text("the user's notes\n")
    with pytest.raises(_Stop):  # got as far as simulating: the folder was accepted
        run_cli("demo", out, "--overwrite")
    assert (out / "my_notes.txt").read_text() == "the user's notes\n"
    assert not (out / "summary.txt").exists()
    # without --overwrite an earlier demo is kept and the command says why
    (out / "summary.txt").write_text("old summary\n")
    fails_with(run_cli("demo", out), "--overwrite")


@pytest.mark.parametrize("n", ["0", "-2"])
def test_item1_demo_n_images_refused_before_anything_is_written(tmp_path, no_simulation, n):
    out = tmp_path / "demo"
    fails_with(run_cli("demo", out, "--n-images", n), "--n-images")
    assert no_simulation == []
    assert not out.exists() or not any(out.iterdir())


def test_item1_measure_refuses_a_measure_folder_it_did_not_write(sim, tmp_path):
    run = fake_run(sim, tmp_path / "run")
    (run / "measure").mkdir()
    (run / "measure" / "features.csv").write_text("my own measurements\n")
    before = snapshot(run)
    fails_with(run_cli("measure", run, *MEASURE), "measure")
    assert snapshot(run) == before


def test_item1_measure_adopts_an_older_measure_folder_and_keeps_other_files(sim, tmp_path):
    run = fake_run(sim, tmp_path / "run")
    code, _, err = run_cli("measure", run, *MEASURE)
    assert code == 0, err
    m = run / "measure"
    marker = json.loads((m / ".phenolens.json").read_text())
    assert marker["kind"] == "measure" and "features.csv" in marker["files"]
    (m / ".phenolens.json").unlink()  # a measure/ from before the marker: it holds measure.json
    (m / "my_plot.png").write_bytes(b"the user's figure")
    code, _, err = run_cli("measure", run, *MEASURE)
    assert code == 0, err
    assert (m / "my_plot.png").read_bytes() == b"the user's figure"
    assert "my_plot.png" not in json.loads((m / ".phenolens.json").read_text())["files"]
    from phenolens.run.measure import open_measure_folder

    open_measure_folder(run, overwrite=True)  # clears only measure's own files
    assert sorted(p.name for p in m.iterdir()) == [".phenolens.json", "my_plot.png"]
    assert (run / "index.csv").is_file() and (run / "control").is_dir()


def test_item1_report_never_overwrites_a_file_it_did_not_write(sim, tmp_path):
    run = fake_run(sim, tmp_path / "run")
    page = tmp_path / "paper_figure.html"
    page.write_text("<html>the user's own page</html>")
    fails_with(run_cli("report", run, "--out", page, "--max-images", "1"), str(page), "not a phenolens report")
    assert page.read_text() == "<html>the user's own page</html>"
    # a report phenolens wrote is replaced
    new = tmp_path / "report.html"
    assert run_cli("report", run, "--out", new, "--max-images", "1")[0] == 0
    assert "<meta name='generator' content='phenolens report" in new.read_text()[:2000]
    code, _, err = run_cli("report", run, "--out", new, "--max-images", "1")
    assert code == 0, err


# =================================================================== item 5: NaN / inf pixels
def test_item5_read_image_names_the_file_and_counts_nan_pixels(tmp_path):
    from phenolens.data.io import read_image

    bad = float_tiff(tmp_path / "bad.tif", nans=3)
    with pytest.raises(PhenolensError, match=r"bad\.tif: has 3 NaN/inf pixels"):
        read_image(bad)
    # the channel holding them is not used: nothing to refuse
    assert read_image(bad, channels=[1])[0].shape == (1, 24, 24)


def test_item5_translate_refuses_nan_pixels_naming_the_file(tiny_model, tmp_path):
    src = float_tiff(tmp_path / "d" / "ctrl" / "with_nan.tif")
    out = tmp_path / "out"
    fails_with(run_cli("translate", tiny_model, src.parent, out, *FAST), "with_nan.tif", "NaN")
    assert not (out / "index.csv").exists()


def test_item5_train_refuses_nan_pixels_naming_the_file(tmp_path):
    data = tmp_path / "d"
    for cond in ("a", "b"):  # float images throughout: only the NaN pixels are wrong
        float_tiff(data / cond / "img0.tif", nans=0)
        float_tiff(data / cond / "img1.tif", nans=0)
    float_tiff(data / "b" / "img9.tif", channels=2, size=24)
    fails_with(run_cli("train", data, tmp_path / "m", *TRAIN), "img9.tif", "NaN")


def test_item5_measure_with_nan_output_names_the_file(sim, tmp_path):
    run = fake_run(sim, tmp_path / "run")
    out = run / "control" / "control_00000" / "high.tif"
    img = tifffile.imread(out).astype(np.float32)
    img[0, 5, 5] = np.nan
    tifffile.imwrite(out, img, photometric="minisblack", metadata={"axes": "CYX"})
    fails_with(run_cli("measure", run, *MEASURE), "high.tif", "NaN")


# =================================================================== item 9: duplicate manifest rows
def test_item9_duplicate_manifest_rows_are_refused_naming_the_lines(tmp_path):
    from phenolens.data.records import discover

    write_blob_images(tmp_path, conditions=["ctrl", "treated"], per_condition=2)
    m = tmp_path / "m.csv"
    m.write_text("path,condition\nctrl/img0.tif,ctrl\nctrl/img1.tif,ctrl\n./ctrl/img0.tif,ctrl\n")
    with pytest.raises(PhenolensError, match=r"m\.csv: rows 2 and 4 .*img0\.tif"):
        discover(m)
    # the same file under two conditions stays allowed (translate keeps both)
    m.write_text("path,condition\nctrl/img0.tif,ctrl\nctrl/img0.tif,treated\n")
    assert [r.condition for r in discover(m)] == ["ctrl", "treated"]
    m.write_text("path,condition\nctrl/img0.tif,ctrl\nctrl/img0.tif,ctrl\n")
    fails_with(run_cli("train", m, tmp_path / "model", *TRAIN), "m.csv", "rows 2 and 3")


# =================================================================== item 11: tracebacks -> one line
@pytest.mark.parametrize("option", ["--nuclei-channel", "--cell-channel"])
def test_item11_measure_channel_beyond_the_images(sim, tmp_path, option):
    run = fake_run(sim, tmp_path / "run")
    fails_with(run_cli("measure", run, *MEASURE, option, "9"), option, "4 channel")
    assert not (run / "measure").exists()


@pytest.mark.parametrize("n", ["0", "-1"])
def test_item11_measure_max_reference_below_one(sim, tmp_path, n):
    run = fake_run(sim, tmp_path / "run")
    fails_with(run_cli("measure", run, *MEASURE, "--max-reference", n), "--max-reference")


@pytest.mark.parametrize("cut", ["mid_row", "missing_fields"])
def test_item11_truncated_index_is_one_line(sim, tmp_path, cut):
    from phenolens.run.index import open_run

    run = fake_run(sim, tmp_path / "run")
    index = run / "index.csv"
    text = index.read_text()
    if cut == "mid_row":
        index.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    else:
        lines = text.splitlines()
        lines[2] = ",".join(lines[2].split(",")[:3])
        index.write_text("\n".join(lines) + "\n")
    with pytest.raises(PhenolensError, match=r"index\.csv: line \d"):
        open_run(run)
    fails_with(run_cli("measure", run, *MEASURE), "index.csv", "line")
    fails_with(run_cli("report", run), "index.csv", "line")


_READ_HUGE = """
import sys
from phenolens.data.io import read_image
from phenolens.errors import PhenolensError
try:
    read_image(sys.argv[1])
except PhenolensError as err:
    print(err)
    sys.exit(3)
except MemoryError:
    sys.exit(4)
"""


def test_item11_huge_image_refused_from_its_header(tmp_path):
    huge = tmp_path / "slide.tif"
    mm = tifffile.memmap(huge, shape=(30000, 30000), dtype=np.uint8)  # a sparse 900 MB file, quickly
    del mm

    def limit_memory():  # so the old code fails fast with MemoryError instead of filling the machine
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    res = subprocess.run([sys.executable, "-c", _READ_HUGE, str(huge)], capture_output=True, text=True,
                         timeout=120, preexec_fn=limit_memory)
    assert res.returncode == 3, (res.returncode, res.stdout, res.stderr)
    line = res.stdout.strip()
    assert str(huge) in line and "30000 x 30000" in line and "268,435,456" in line and "tile" in line, line


# =================================================================== also: umask, condition order
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("fmt, name", [("tiff", "out.tif"), ("png", "out.png")])
def test_also_written_images_get_the_users_umask(tmp_path, umask_022, fmt, name):
    from phenolens.data.io import ImageLayout, write_image

    axes = "CYX" if fmt == "tiff" else "YX"
    write_image(tmp_path / name, np.full((1, 8, 8), 7.0, np.float32), ImageLayout(fmt, "uint16", axes, 1))
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name != name]  # no temporary file left


def _folders(root: Path, names) -> Path:
    for n in names:
        (root / n).mkdir(parents=True)
        tifffile.imwrite(root / n / "a.tif", np.zeros((4, 4), np.uint16))
    return root


def test_also_condition_folders_in_dose_order(tmp_path):
    from phenolens.data.records import conditions_in_order, discover

    order = lambda root: conditions_in_order(discover(root))
    assert order(_folders(tmp_path / "a", ["dose_10", "untreated", "dose_2", "dose_1"])) == \
        ["untreated", "dose_1", "dose_2", "dose_10"]
    assert order(_folders(tmp_path / "b", ["10uM", "1uM", "0.5uM", "0.25uM", "vehicle"])) == \
        ["vehicle", "0.25uM", "0.5uM", "1uM", "10uM"]
    # a manifest.csv beside the folders gives the order (first appearance)
    root = _folders(tmp_path / "c", ["control", "high", "low", "mid"])
    (root / "manifest.csv").write_text("path,condition\ncontrol/a.tif,control\nlow/a.tif,low\n"
                                       "mid/a.tif,mid\nhigh/a.tif,high\n")
    assert order(root) == ["control", "low", "mid", "high"]
    from phenolens.data.records import condition_order_source  # what `train` prints beside the order

    assert "manifest.csv" in condition_order_source(root)


def test_also_simulated_dataset_comes_back_in_dose_order(tmp_path):
    from phenolens.data.records import conditions_in_order, discover, training_records
    from phenolens.data.simulate import DEFAULT_CONDITIONS, simulate

    out = simulate(tmp_path / "sim", per_condition=1, size=32, progress=False)
    assert DEFAULT_CONDITIONS == ["control", "low", "mid", "high"]
    assert conditions_in_order(discover(out)) == DEFAULT_CONDITIONS
    assert training_records(out)[1] == DEFAULT_CONDITIONS


def test_item1_demo_folder_of_an_older_phenolens_is_adopted_only_when_it_holds_nothing_else(tmp_path):
    """`make demo` (= demo OUT --overwrite) on a demo_out written before markers: replaced, not refused;
    the same folder with one file of the user's in it is refused, and that file kept."""
    from phenolens.demo import _open_demo_folder

    old = tmp_path / "demo_out"
    old.mkdir()
    for name in ("summary.json", "summary.txt", "grids.png", "report.html"):
        (old / name).write_text("from an older demo")
    folder = _open_demo_folder(old, overwrite=True)
    assert folder.kind == "demo"
    assert not (old / "summary.json").exists() and not (old / "grids.png").exists()

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "summary.json").write_text("{}")
    (mixed / "thesis.docx").write_text("the user's")
    with pytest.raises(PhenolensError, match="not written by phenolens"):
        _open_demo_folder(mixed, overwrite=True)
    assert (mixed / "thesis.docx").read_text() == "the user's" and (mixed / "summary.json").exists()
