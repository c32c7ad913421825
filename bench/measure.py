"""Benchmark: CellProfiler features (segmentation + cp_measure) for 100 images of 128x128 with 3 channels.

Goal (issue 3): under a minute on the 2-core developer machine. The baseline, measured in the same
run, is the same work in one process; the result is the default (one process per core).

    .venv/bin/python bench/measure.py [--n 100] [--size 128] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="images (default 100)")
    ap.add_argument("--size", type=int, default=128, help="image side in px (default 128)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: CPU count)")
    ap.add_argument("--profile", default="standard", choices=("standard", "full"))
    args = ap.parse_args()

    from phenolens.data.simulate import simulate
    from phenolens.measure.features import FeatureSettings
    from phenolens.measure.segment import SegmentationSettings
    from phenolens.run.measure import _Job, _measure_job

    with tempfile.TemporaryDirectory() as tmp:
        data = simulate(Path(tmp) / "sim", conditions=["control", "treated"], per_condition=(args.n + 1) // 2,
                        size=args.size, seed=0, progress=False)
        paths = sorted(data.glob("*/*.tif"))[: args.n]
        feats = FeatureSettings(channel_names=("DNA", "tubulin", "actin"), profile=args.profile)
        jobs = [_Job(str(p), p.parent.name, "real", "reference", "", "", [0, 1, 2], feats, SegmentationSettings(),
                     None, None) for p in paths]
        _measure_job(jobs[0])  # warm imports

        t0 = time.perf_counter()
        rows = [_measure_job(j)[0] for j in jobs]
        serial = time.perf_counter() - t0

        t0 = time.perf_counter()
        with ProcessPoolExecutor(args.workers) as pool:
            parallel_rows = [r[0] for r in pool.map(_measure_job, jobs, chunksize=4)]
        parallel = time.perf_counter() - t0

    assert [r.keys() for r in rows] == [r.keys() for r in parallel_rows]
    n_feat = len([k for k in rows[0] if k[:1].isupper()])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; profile {args.profile}; "
          f"{len(jobs)} images {args.size}x{args.size}x3; {n_feat} features per image")
    print(f"baseline, 1 process:     {serial:6.1f} s  ({len(jobs) / serial:.2f} img/s)")
    print(f"phenolens, {args.workers} processes: {parallel:6.1f} s  ({len(jobs) / parallel:.2f} img/s)  "
          f"speed-up x{serial / parallel:.2f}")
    print(f"goal: under 60 s for 100 images -> {'met' if parallel * 100 / len(jobs) < 60 else 'MISSED'}")


if __name__ == "__main__":
    main()
