"""`phenolens measure` split over processes (`torchrun` / `accelerate launch`) and resumed from its journals.

One small translate run (no model: real simulated images stand in for the renders, conftest's
`write_fake_run`) is measured once by one process; then by a launch of two processes, and by a run
killed (SIGKILL) after its first journalled images and measured again: each must write the same
files, byte for byte, and the re-run must measure only what the killed run had not journalled.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, write_fake_run

CONDS = ["control", "low", "high"]
OPTIONS = ("--no-judges", "--max-reference", "3")
SAME = ("features.csv", "stats.csv", "ranked.csv", "dose_correlation.csv", "segmentation_scores.json")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """The run folder and what a one-process run from scratch writes into measure/."""
    from phenolens.data.simulate import simulate

    root = tmp_path_factory.mktemp("shards")
    sim = simulate(root / "data", conditions=CONDS, per_condition=6, size=48, seed=3, progress=False)
    # 4 sources, 8 renders (reconstruction, high), 3 reference images of control and of high: 18 images
    run = write_fake_run(sim, root / "run", root / "model", CONDS, 4, targets=("high",)).absolute()
    code, _, err = run_cli("measure", run, *OPTIONS, "--workers", "1")
    assert code == 0, err
    return run, _outputs(run / "measure")


def _rounded(x):
    """metrics.json's numbers to 3 significant digits: FID's matrix square root of a tiny set's covariance is
    ill-conditioned, and its last digits follow the BLAS's threads, not the sharding."""
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return float(f"{x:.3g}") if isinstance(x, float) else x


def _outputs(m: Path) -> dict[str, bytes]:
    files = {f: (m / f).read_bytes() for f in SAME}
    with np.load(m / "centroids.npz") as z:
        files["centroids.npz"] = json.dumps({k: z[k].tolist() for k in z.files}).encode()
    files["metrics.json"] = json.dumps(_rounded(json.loads((m / "metrics.json").read_text()))).encode()
    return files


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _jobs(m: Path) -> int:
    with open(m / "features.csv", newline="") as fh:
        return sum(1 for _ in csv.DictReader(fh))


def test_two_processes_write_what_one_writes(clean):
    run, expected = clean
    m = run / "measure"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "phenolens", "measure", str(run), *OPTIONS, "--overwrite"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _outputs(m) == expected
    n = _jobs(m)
    # both processes measured a share (chunks of 16 images: 16 and n - 16)
    assert f"process 1 of 2 measures 16 of the {n} images left" in proc.stdout, proc.stdout[-3000:]
    assert f"process 2 of 2 measures {n - 16} of the {n} images left" in proc.stdout, proc.stdout[-3000:]
    assert not (m / "_journal").exists()  # merged, then removed
    marker = json.loads((m / ".phenolens.json").read_text())
    assert {"features.csv", "_journal/features-0.csv", "_journal/features-1.csv"} <= set(marker["files"])


def test_a_killed_run_resumes_without_measuring_again(clean, monkeypatch):
    import phenolens.run.measure as measure_module
    from phenolens.run.shards import read_journal

    run, expected = clean
    m = run / "measure"
    journal = m / "_journal" / "features-0.csv"
    cmd = [sys.executable, "-m", "phenolens", "measure", str(run), *OPTIONS, "--workers", "1", "--overwrite"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (journal.is_file() and journal.stat().st_size > 0) and proc.poll() is None:
            assert time.monotonic() < deadline, "no journal after 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # after its first group of images, before the rest
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err[-2000:]!r}"
    assert not (m / "features.csv").exists()  # --overwrite removed it; the killed run never got there

    done = [r["key"] for r in read_journal(journal)]
    n = len(json.loads(expected["centroids.npz"]))
    assert 0 < len(done) < n
    # and a kill in the middle of an append: a cut last line (the next image's row, half of it)
    lines = journal.read_bytes().splitlines(keepends=True)
    with open(journal, "ab") as fh:
        fh.write(lines[-1][: len(lines[-1]) // 2])
    assert [r["key"] for r in read_journal(journal)] == done

    measured = []
    original = measure_module._measure_job

    def counting(job):
        measured.append("|".join((job.image, job.kind, job.role, job.target_condition)))
        return original(job)

    monkeypatch.setattr(measure_module, "_measure_job", counting)
    code, _, err = run_cli("measure", run, *OPTIONS, "--workers", "1")
    assert code == 0, err
    assert len(measured) == n - len(done) and not set(measured) & set(done)
    assert _outputs(m) == expected  # every row whole, in the jobs' order, with the same numbers
    assert not (m / "_journal").exists()


def test_journals_of_other_settings_are_not_used(clean, monkeypatch):
    import phenolens.run.measure as measure_module
    from phenolens.folders import OutputFolder
    from phenolens.run.shards import Journal

    run, expected = clean
    m = run / "measure"
    with open(m / "features.csv", newline="") as fh:
        first = next(csv.DictReader(fh))
    key = "|".join(first[k] for k in ("image", "kind", "role", "target_condition"))
    row = dict(first, Nuclei_Area=1e9)  # a row that must not reach features.csv
    settings = json.loads((m / "measure.json").read_text())
    (m / "measure.json").unlink()  # no completed run to reuse: only the journal could count
    Journal(m / "_journal" / "features-0.csv", measure_module.JOURNAL_COLUMNS).append(
        [measure_module._journal_row(key, (row, np.zeros((0, 3)), {}))])
    other = {k: settings[k] for k in measure_module.MeasureSettings().cache_key() if k in settings}
    (m / measure_module.JOURNAL_SETTINGS).write_text(json.dumps(dict(other, profile="full")))
    OutputFolder.open(m, "measure").record(measure_module.JOURNAL_SETTINGS, "_journal/features-0.csv")

    measured = []
    original = measure_module._measure_job
    monkeypatch.setattr(measure_module, "_measure_job", lambda job: measured.append(job) or original(job))
    code, _, err = run_cli("measure", run, *OPTIONS, "--workers", "1")
    assert code == 0, err
    assert len(measured) == len(json.loads(expected["centroids.npz"]))
    assert _outputs(m) == expected
    assert not (m / "_journal").exists()


def test_journal_rows_keep_what_the_csv_would_have_written():
    import io

    from phenolens.run.measure import _journal_row

    row = {"image": "a|b", "Nuclei_Area": 12.5, "Count": np.int64(3), "Small": np.float32(0.1), "Empty": None,
           "Nan": float("nan"), "Flag": True}
    journal = _journal_row("a|b|real|source|", (row, np.zeros((0, 3)), {}))
    back = json.loads(journal["row"])
    assert np.asarray(json.loads(journal["centroids"]), dtype=np.float64).reshape(-1, 3).shape == (0, 3)

    def written(r):
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=list(row)).writerow(r)
        return buf.getvalue()

    assert written(back) == written(row)


def test_workers_default_to_one_per_launched_process():
    from phenolens.run.measure import _effective_workers

    assert _effective_workers(None, 2) == 1
    assert _effective_workers(3, 2) == 3  # given explicitly: as given
    assert _effective_workers(None, 1) == min(os.cpu_count() or 1, 8)


def test_a_cut_last_row_is_cut_off_before_the_next_append(tmp_path):
    from phenolens.run.shards import trim_cut_row

    for text, kept in ((b"key,row\na,1\nb,", b"key,row\na,1\n"), (b"key,ro", b""), (b"key,row\na,1\n", b"key,row\na,1\n"),
                       (b"key,row\n" + b"x" * 70000, b"key,row\n")):  # a cut row longer than one block read
        path = tmp_path / "j.csv"
        path.write_bytes(text)
        trim_cut_row(path)
        assert path.read_bytes() == kept
