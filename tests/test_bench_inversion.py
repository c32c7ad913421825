"""Smoke test of bench/inversion.py on the tiny random model: every row is there, with the call counts
each inversion is defined to spend, so the bench that chooses the inversion defaults does not rot."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "inversion.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_inversion", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(bench)
    return bench


def test_inversion_bench_rows_and_calls(tmp_path, tiny_model, blob_data, capsys):
    bench = _load_bench()
    out = tmp_path / "table.csv"
    steps, cap = 4, 3
    argv = [str(blob_data), "--model", str(tiny_model), "--n", "2", "--steps", str(steps), "--tols", "1e-3",
            "--skips", "0,2", "--cap", str(cap), "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    labels = ["ddim", "legacy", "picard tol=0.001", "anderson tol=0.001", "ef-ddpm skip=0", "ef-ddpm skip=2"]
    for label in labels:
        assert f"| {label} |" in printed
    assert "recommended fixed-point default:" in printed

    rows = {r["row"]: r for r in csv.DictReader(out.open())}
    assert list(rows) == labels
    calls = {k: float(r["calls_per_image"]) for k, r in rows.items()}
    assert calls["ddim"] == steps
    assert calls["legacy"] == 6 * steps  # 1 guess + 5 iterations, no tolerance
    assert float(rows["legacy"]["calls_vs_legacy"]) == 1.0
    for solver in ("picard", "anderson"):  # warm start: one call for the first guess, then at most CAP a step
        assert steps <= calls[f"{solver} tol=0.001"] <= 1 + cap * steps
    assert calls["ef-ddpm skip=0"] == steps and calls["ef-ddpm skip=2"] == steps - 2
    assert float(rows["ef-ddpm skip=2"]["calls_per_step"]) == 1.0
    # EF-DDPM reconstructs exactly by construction; plain DDIM on a random network does not
    for k in ("ef-ddpm skip=0", "ef-ddpm skip=2"):
        assert float(rows[k]["psnr_min_db"]) > 60 and rows[k]["meets"] == "True"
    assert float(rows["ddim"]["psnr_mean_db"]) < float(rows["ef-ddpm skip=0"]["psnr_mean_db"])
    for r in rows.values():
        assert float(r["psnr_min_db"]) <= float(r["psnr_mean_db"]) and float(r["sec_per_image"]) > 0
