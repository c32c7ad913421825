"""Crop the real ExampleFly fields and score the nuclei found; draw a grid of crops for the README.

    python bench/examplefly_crops.py WORK [--png docs/figures/examplefly_crops.png]

Runs `phenolens crop` on CellProfiler's ExampleFly fields (three fields of 1006 x 1000 px, one 8-bit
file per channel) twice, through a LoadData CSV and through --pattern, checks both give the same
crops, and prints per field: the nuclei phenolens found, an independent careful-threshold count
(tests/test_crop.py `careful_threshold_count`: three-class Otsu, peak-split clumps), and crops kept
or skipped. The PNG shows 32 crops picked evenly through the manifest (DNA blue, FITC green,
rhodamine red, each channel scaled to the crops' 0.5th-99.8th percentiles).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_crop import FLY, FLY_SITES, careful_threshold_count, write_fly_loaddata  # noqa: E402

from phenolens.cli import main as phenolens  # noqa: E402
from phenolens.data.display import composite, upscale  # noqa: E402
from phenolens.data.records import pick_evenly  # noqa: E402


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def crop_grid(crops: Path, manifest: list[dict], png: Path, n: int = 32, per_row: int = 8) -> None:
    picked = pick_evenly(manifest, n)
    stack = np.stack([tifffile.imread(crops / r["path"]).astype(np.float32) for r in picked])
    lo = np.percentile(stack, 0.5, axis=(0, 2, 3))[None, :, None, None]
    hi = np.percentile(stack, 99.8, axis=(0, 2, 3))[None, :, None, None]
    scaled = np.clip((stack - lo) / np.maximum(hi - lo, 1e-6), 0, 1) * 2 - 1
    tiles = [upscale(composite(x), 2) for x in scaled]
    h, w, _ = tiles[0].shape
    pad = 4
    rows_n = (len(tiles) + per_row - 1) // per_row
    canvas = np.full((rows_n * (h + pad) + pad, per_row * (w + pad) + pad, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, per_row)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = t
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    by_pattern, by_table = a.work / "by_pattern", a.work / "by_table"
    common = ["--size", str(a.size), "--overwrite"]
    assert phenolens(["crop", str(FLY), str(by_pattern), "--pattern", "01_POS{site}_{channel}.TIF", "--channel-names",
                      "D=DNA,F=FITC,R=Rhodamine", "--condition", "untreated", *common]) == 0
    table = write_fly_loaddata(a.work / "load_data.csv")
    assert phenolens(["crop", str(table), str(by_table), "--condition-from", "Metadata_Treatment", *common]) == 0
    same = [(r["center_y"], r["center_x"]) for r in rows(by_pattern / "manifest.csv")] == \
           [(r["center_y"], r["center_x"]) for r in rows(by_table / "manifest.csv")]
    print(f"LoadData CSV and --pattern give the same crops: {same}")
    print("| field | nuclei found | careful threshold | found / threshold | crops | skipped: border | skipped: overlap |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    total = dict(found=0, ref=0, crops=0, border=0, overlap=0)
    fields = {r["field"]: r for r in rows(by_pattern / "fields.csv")}
    for site in FLY_SITES:
        f = fields[site]
        ref = careful_threshold_count(tifffile.imread(FLY / f"01_POS{site}_D.TIF"))
        found = int(f["nuclei"])
        for k, v in (("found", found), ("ref", ref), ("crops", int(f["crops"])), ("border", int(f["skipped_border"])),
                     ("overlap", int(f["skipped_overlap"]))):
            total[k] += v
        print(f"| 01_POS{site} | {found} | {ref} | {found / ref:.2f} | {f['crops']} | {f['skipped_border']} | "
              f"{f['skipped_overlap']} |")
    print(f"| all | {total['found']} | {total['ref']} | {total['found'] / total['ref']:.2f} | {total['crops']} | "
          f"{total['border']} | {total['overlap']} |")
    if a.png:
        crop_grid(by_table, rows(by_table / "manifest.csv"), a.png)
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
