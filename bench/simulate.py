"""Images/s of `phenolens simulate`: 4 conditions x 250 images of 64 x 64 (1000 images, all files).

    python bench/simulate.py [--per-condition 250] [--size 64] [--workers N]

Times the whole call (rendering, TIFF + mask writing, ground-truth CSVs) into a temporary folder,
once with one process and once with the default pool, and checks that both wrote identical files.
Target: 1000 images in under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from phenolens.data.simulate import DEFAULT_CONDITIONS, simulate


def _timed(out: Path, args: argparse.Namespace, workers: int | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its pool) - CPU time shows a shared machine's load."""
    c0, t0 = os.times(), time.perf_counter()
    simulate(out, conditions=DEFAULT_CONDITIONS, per_condition=args.per_condition, size=args.size, seed=0,
             progress=False, workers=workers)
    wall, c1 = time.perf_counter() - t0, os.times()
    cpu = sum(c1[:4]) - sum(c0[:4])
    return wall, cpu


def _digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-condition", type=int, default=250)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="pool size for the second run (default: simulate's)")
    args = ap.parse_args(argv)
    n = len(DEFAULT_CONDITIONS) * args.per_condition
    print(f"python {sys.version.split()[0]}, {platform.machine()}, {os.cpu_count()} cpus; "
          f"{n} images of {args.size}x{args.size}, 4 channels")
    with tempfile.TemporaryDirectory() as tmp:
        t1, cpu1 = _timed(Path(tmp) / "w1", args, 1)
        print(f"workers=1      : {t1:6.2f} s total, {n / t1:7.1f} images/s  (cpu {cpu1:.1f} s)")
        t2, cpu2 = _timed(Path(tmp) / "wN", args, args.workers)
        label = f"workers={args.workers}" if args.workers else "workers=default"
        print(f"{label:<15}: {t2:6.2f} s total, {n / t2:7.1f} images/s  (cpu {cpu2:.1f} s)")
        same = _digest(Path(tmp) / "w1") == _digest(Path(tmp) / "wN")
        print(f"identical files: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
