"""`accelerate launch -m phenolens translate`: the sources split over processes, one index.csv, resumable.

The launches here are real: `accelerate launch --multi_gpu --num_processes 2` starts two CPU processes
talking over gloo (on a machine without GPUs `--multi_gpu` is what starts several; `--cpu` starts one).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import accelerate_launch, write_blob_images
from phenolens.data.io import read_image

FAST = ["--steps", "3", "--inversion-iters", "1", "--batch-size", "2", "--to", "ctrl", "dose2"]


def launch(n: int) -> list[str]:
    """The command line of a launch of N processes (1: phenolens alone)."""
    return [sys.executable, "-m", "phenolens"] if n == 1 else [*accelerate_launch(n), "-m", "phenolens"]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))


def translate(n: int, model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*launch(n), "translate", str(model), str(data), str(out), *FAST, *extra],
                          capture_output=True, text=True, env=env(), timeout=600)


def rows_of(out: Path) -> list[dict]:
    with open(out / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def key(row: dict) -> tuple:
    return row["source_path"], row["target_condition"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return write_blob_images(tmp_path_factory.mktemp("shard-data"), conditions=["ctrl", "dose1"], per_condition=7,
                             size=16)


def test_two_processes_write_what_one_process_writes(tiny_model, sources, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for n, out in ((1, one), (2, two)):
        done = translate(n, tiny_model, sources, out)
        assert done.returncode == 0, done.stderr[-3000:]
    rows_one, rows_two = rows_of(one), rows_of(two)
    assert len(rows_one) == 14 * 2 and len({key(r) for r in rows_two}) == len(rows_two)
    assert sorted(map(key, rows_one)) == sorted(map(key, rows_two))
    by_key = {key(r): r for r in rows_one}
    for row in rows_two:  # every column, and every pixel of every output (the same batches, one thread each)
        assert row == by_key[key(row)]
        assert np.array_equal(read_image(two / row["output_path"])[0], read_image(one / row["output_path"])[0])
    assert not (two / "_journal").exists()  # merged, then removed
    assert (two / "index.csv").read_text().count("\n") == len(rows_two) + 1


def child_of_rank(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for proc in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if proc.environ().get("RANK") == str(rank) and "phenolens" in " ".join(proc.cmdline()):
                return proc
        except psutil.Error:
            continue
    return None


def journal_images(out: Path) -> set[str]:
    """The source images whose rows a journal holds complete (both targets)."""
    counts: dict[str, int] = {}
    for path in (out / "_journal").glob("rows-*.csv"):
        text = path.read_text()
        text = text[:text.rfind("\n") + 1]
        for row in csv.DictReader(text.splitlines()):
            counts[row["source_path"]] = counts.get(row["source_path"], 0) + 1
    return {s for s, n in counts.items() if n == 2}


def test_kill_9_of_one_process_then_rerun_translates_each_image_once(tiny_model, tmp_path):
    data = write_blob_images(tmp_path / "data", conditions=["ctrl"], per_condition=40, size=16, seed=3)
    out = tmp_path / "run"
    launcher = subprocess.Popen([*launch(2), "translate", str(tiny_model), str(data), str(out), *FAST],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    journal = out / "_journal" / "rows-1.csv"
    deadline = time.monotonic() + 300
    victim = None
    while time.monotonic() < deadline and launcher.poll() is None:
        if journal.is_file() and journal.read_text().count("\n") >= 1 + 2 * 2 * 2:  # two batches of process 1
            victim = child_of_rank(launcher, 1)
            if victim is not None:
                victim.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    log = launcher.communicate(timeout=120)[0]
    assert victim is not None, f"process 1 was never seen mid-run:\n{log[-3000:]}"
    assert launcher.returncode != 0, log[-3000:]

    finished = journal_images(out)
    assert 4 <= len(finished) < 40  # both processes did some, the kill left some undone
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("ctrl/*/*.tif")}
    finished_files = [p for p in stamps if any(Path(s).stem == p.parent.name.rsplit("-", 1)[0] for s in finished)]
    assert len(finished_files) == 2 * len(finished)

    rerun = translate(2, tiny_model, data, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = rows_of(out)
    assert sorted(map(key, rows)) == sorted((str(p), t) for p in data.glob("ctrl/*.tif") for t in ("ctrl", "dose2"))
    assert all(all(v not in ("", None) for k, v in r.items() if k in ("recon_mse", "change_mse", "output_path",
                                                                      "reconstruction_path", "model_hash")) for r in rows)
    for row in rows:
        assert (out / row["output_path"]).is_file()
    untouched = [p for p in finished_files if p.stat().st_mtime_ns == stamps[p]]
    assert untouched == finished_files  # the images finished before the kill were not translated again
    assert not (out / "_journal").exists()


def test_a_relative_out_leaves_no_journal_and_a_rerun_redoes_nothing(tiny_model, sources, tmp_path, monkeypatch):
    """OUT given relative to the working folder: the journals are still recognised as phenolens's, merged and
    removed, so a second run keeps every image and index.csv lists each once."""
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    args = ["translate", tiny_model, sources / "ctrl", "rel", *FAST]
    assert run_cli(*args)[0] == 0
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "rel").glob("ctrl/*/*.tif")}
    assert not (tmp_path / "rel" / "_journal").exists()
    assert run_cli(*args)[0] == 0
    rows = rows_of(tmp_path / "rel")
    assert len(rows) == len({key(r) for r in rows}) == 7 * 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
