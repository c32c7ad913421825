"""Smoke test of bench/phenldiff_conditioning.py: the whole pipeline (simulate, VAE pre-training,
finetune --conditioning prompt/learned, translate, scoring) at toy sizes, so the bench does not rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "phenldiff_conditioning.py"


def test_conditioning_bench_runs_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("phenldiff_conditioning", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "table.md"
    argv = ["--out", str(out), "--work", str(tmp_path / "work"), "--per-condition", "4", "--held-out", "2",
            "--vae-steps", "3", "--vae-batch-size", "4", "--steps", "2", "--batch-size", "4", "--warmup-steps", "1",
            "--sample-steps", "2", "--classifier-steps", "2"]
    assert bench.main(argv) == 0
    text = out.read_text()
    assert "| prompt |" in text and "| learned |" in text
    assert "held-out reconstruction PSNR" in text and "exact McNemar" in text
    vae = (tmp_path / "work" / "base" / "vae")
    assert (vae / "pretrained.json").is_file() and (vae / "config.json").is_file()
    # a rerun reuses the data, the VAE, both models and both translations
    kept = [tmp_path / "work" / p for p in ("base/vae/pretrained.json", "model_prompt/phenolens.json",
                                             "model_learned/phenolens.json", "translate_learned/index.csv")]
    stamps = [p.stat().st_mtime_ns for p in kept]
    assert bench.main(argv) == 0
    assert "| prompt |" in out.read_text()
    assert [p.stat().st_mtime_ns for p in kept] == stamps
