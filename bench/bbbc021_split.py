"""Split the BBBC021 cycloheximide crops into training and held-out manifests (one third of each
condition held out: 120 DMSO and 40 cells of each dose), the split the shipped BBBC021 model and
`phenolens validate` use.

    python bench/bbbc021_split.py [DATA] [OUT]      (defaults: ../shared/data/bbbc021-cycloheximide, bbbc021_split)

Writes OUT/train.csv and OUT/heldout.csv (the source manifest's columns, paths relative to OUT), so
`phenolens train OUT/train.csv ...` never sees a held-out cell. The split is a seeded shuffle within
each condition: the same files give the same split on every machine.
"""

from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path

HELD_OUT_FRACTION = 1 / 3
SEED = 2021


def split(data: Path, out: Path) -> tuple[Path, Path]:
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        sys.exit(f"{manifest}: not found; DATA must be the bbbc021-cycloheximide folder of ../shared/data")
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    by_condition: dict[str, list[dict]] = {}
    for row in rows:
        by_condition.setdefault(row["condition"], []).append(row)
    train, held = [], []
    rng = random.Random(SEED)
    for cond in sorted(by_condition):
        group = sorted(by_condition[cond], key=lambda r: r["path"])
        rng.shuffle(group)
        n_held = round(len(group) * HELD_OUT_FRACTION)
        held += group[:n_held]
        train += group[n_held:]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, part in (("train.csv", train), ("heldout.csv", held)):
        path = out / name
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            for row in sorted(part, key=lambda r: (r["condition"], r["path"])):
                row = dict(row, path=os.path.relpath((data / row["path"]).resolve(), out.resolve()))
                writer.writerow(row)
        os.replace(tmp, path)
        written.append(path)
    return written[0], written[1]


if __name__ == "__main__":
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("../shared/data/bbbc021-cycloheximide")
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("bbbc021_split")
    train, held = split(data, out)
    print(f"wrote {train} and {held}")
