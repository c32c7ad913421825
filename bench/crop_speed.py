"""Fields per minute of `phenolens crop`, one worker against two, on real and simulated fields.

    python bench/crop_speed.py WORK [--repeats 2] [--fly-copies 4] [--sim-fields-side 512]

Two screens, each cropped with --workers 1 and --workers 2 in the same run (fresh output folder
each time; the best of --repeats runs is kept):
- the real ExampleFly fields (1006 x 1000 px, 8-bit, three files per field), listed --fly-copies
  times in a LoadData table under different site numbers, so there are enough fields to share out;
- a simulated screen (`phenolens simulate --layout screen`, 24 fields of --sim-fields-side px, four
  16-bit channel files per field), cropped with --illumination and --normalize plate as well.
Each configuration runs as a whole `phenolens crop` command in a fresh process (start-up included),
one thread per process (OMP_NUM_THREADS=1), as a user's run would.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

FLY = Path(os.environ.get("PHENOLENS_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "cellprofiler-examplefly"


def fly_table(work: Path, copies: int) -> Path:
    """A LoadData CSV listing the three ExampleFly fields COPIES times (sites 1..3*COPIES)."""
    path = work / "fly_load_data.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["FileName_DNA", "PathName_DNA", "FileName_FITC", "PathName_FITC", "FileName_Rhodamine",
                    "PathName_Rhodamine", "Metadata_Site", "Metadata_Condition"])
        site = 0
        for _ in range(copies):
            for pos in ("002", "076", "218"):
                site += 1
                w.writerow([f"01_POS{pos}_D.TIF", FLY, f"01_POS{pos}_F.TIF", FLY, f"01_POS{pos}_R.TIF", FLY, site,
                            "untreated"])
    return path


def time_crop(args: list[str], out: Path, repeats: int) -> tuple[float, dict]:
    """Best wall time of REPEATS `phenolens crop` runs into a fresh OUT; the run's fields.csv totals."""
    best = float("inf")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(repeats):
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "phenolens", "crop", *args, str(out)],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    with open(out / "fields.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return best, dict(fields=len(rows), crops=sum(int(r["crops"]) for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--fly-copies", type=int, default=4)
    ap.add_argument("--sim-fields-side", type=int, default=512)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    screens = []
    if (FLY / "01_POS002_D.TIF").is_file():
        screens.append(("ExampleFly (real, 1006x1000, 8-bit)",
                        [str(fly_table(a.work, a.fly_copies)), "--size", "64"]))
    sim = a.work / f"sim{a.sim_fields_side}"
    if not (sim / "load_data.csv").is_file():
        from phenolens.data.simulate_screen import simulate_screen

        simulate_screen(sim, plates=2, wells_per_condition=2, sites=2, field_size=a.sim_fields_side, seed=0,
                        progress=False)
    screens.append((f"simulated ({a.sim_fields_side}x{a.sim_fields_side}, 16-bit, 4 channels)",
                    [str(sim / "load_data.csv"), "--size", "64", "--nucleus-diameter", "11"]))
    screens.append(("simulated, --illumination --normalize plate",
                    [str(sim / "load_data.csv"), "--size", "64", "--nucleus-diameter", "11", "--illumination",
                     "--normalize", "plate"]))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print("| screen | fields | crops | 1 worker: fields/min | 2 workers: fields/min | ratio 2/1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, args in screens:
        t1, s = time_crop(args, a.work / "out1", a.repeats)
        t2, _ = time_crop(args + ["--workers", "2"], a.work / "out2", a.repeats)
        f1, f2 = s["fields"] / t1 * 60, s["fields"] / t2 * 60
        print(f"| {name} | {s['fields']} | {s['crops']} | {f1:.1f} ({t1:.1f} s) | {f2:.1f} ({t2:.1f} s) | {f2 / f1:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
