"""Is cp_measure's granularity repeatable at a crop size? The same images measured twice in one process.

    python bench/granularity_repeat.py WORK [--sizes 32,48,64] [--per-condition 60]

For each size, simulated images (2 conditions) are measured twice, one after the other, by
`phenolens measure`'s own per-image job, and the Granularity_* values that differ between the two
passes are counted (every other feature is printed too: it should be 0). On small crops the
granularity background is estimated on a tiny image (subsampled 4x, then 4x again: 2 x 2 px at
32 px), what its subtraction leaves is near rounding, and summation-order differences flip it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def count(work: Path, size: int, per_condition: int) -> tuple[int, int, int, int]:
    from phenolens.data.simulate import simulate
    from phenolens.measure.features import FeatureSettings
    from phenolens.measure.segment import SegmentationSettings
    from phenolens.run.measure import _Job, _measure_job, estimate_nucleus_diameter

    data = simulate(work / f"sim-{size}", conditions=["control", "high"], per_condition=per_condition, size=size,
                    seed=3, progress=False, overwrite=True)
    paths = sorted(data.glob("*/*.tif"))
    feats = FeatureSettings(channel_names=("DNA", "tubulin", "actin", "Golgi"))
    seg = SegmentationSettings(nuclei_channel=0, cell_channel=1,
                               nucleus_diameter=estimate_nucleus_diameter(paths[:8], None, 0))
    jobs = [_Job(str(p), p.parent.name, "real", "source", "", "", None, feats, seg, None, None) for p in paths]
    passes = [[_measure_job(j)[0] for j in jobs] for _ in range(2)]
    granular = granular_all = other = other_all = 0
    for a, b in zip(*passes):
        for k, v in a.items():
            same = v == b[k] or (np.isnan(v) and np.isnan(b[k]))
            if "Granularity" in k:
                granular, granular_all = granular + (not same), granular_all + 1
            else:
                other, other_all = other + (not same), other_all + 1
    return granular, granular_all, other, other_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="a scratch folder for the simulated images")
    ap.add_argument("--sizes", default="32,48,64", help="crop sizes in px (default 32,48,64)")
    ap.add_argument("--per-condition", type=int, default=60, help="images per condition (default 60)")
    args = ap.parse_args()
    print("| crop px | granularity values that differ between passes | other feature values that differ |")
    print("|---:|---:|---:|")
    for size in (int(s) for s in args.sizes.split(",")):
        g, ga, o, oa = count(args.work, size, args.per_condition)
        print(f"| {size} | {g} of {ga} ({100 * g / ga:.1f} %) | {o} of {oa} |")


if __name__ == "__main__":
    main()
