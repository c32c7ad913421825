"""A run on several processes, and memory as a run grows: `translate` and `measure` as whole commands.

    python bench/scale.py WORK [--n 256] [--steps 10] [--reference 512] [--memory 1000,10000]
                               [--only translate|measure|memory]

Scaling: the same images translated (then measured) three ways, each a whole command timed from
start to exit, on this machine:

  - 1 process of 1 thread (OMP_NUM_THREADS=1), the baseline;
  - 1 process of 2 threads (OMP_NUM_THREADS=2);
  - 2 processes of 1 thread: `accelerate launch --multi_gpu --num_processes 2 -m phenolens ...`
    (on a machine without GPUs `--multi_gpu` starts CPU processes joined over gloo).

The outputs are checked: every index.csv row and every pixel of the 2-process run equal the
1-process run's (the same batches), and the 2-thread run's pixels are within float rounding;
measure's features.csv must agree the same way.

Memory: --memory N1,N2 simulated 32 px images translated (plain DDIM inversion, few steps: the
images and rows are what grow, not the per-image work) and the peak RSS of each command (from the
kernel, `wait4`) printed with their ratio. WORK keeps the data and runs (delete it afterwards).
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

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
LAUNCH2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "phenolens"]
ALONE = [sys.executable, "-m", "phenolens"]


def run(argv: list, threads: int) -> tuple[float, float]:
    """(seconds, peak RSS in MiB of the largest process) of a whole command."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(SRC), TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, argv))}\n{log.decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024  # kB on Linux; RUSAGE of the largest descendant waited for


def make_model(work: Path, data: Path, size: int) -> Path:
    """A tiny random-weight PhenDiff model of the data's normalisation (the timing does not need training)."""
    import torch

    from phenolens.data.io import read_image
    from phenolens.data.normalize import Normalizer
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.models.store import ModelInfo, save_model
    from phenolens.models.unet import build_unet

    model = work / "model"
    if (model / "phenolens.json").is_file():
        return model
    conditions = sorted(p.name for p in data.iterdir() if p.is_dir())
    images = [read_image(p)[0] for p in sorted(data.glob("*/*.tif"))[:64]]
    torch.manual_seed(0)
    unet = build_unet("tiny", channels=images[0].shape[0], size=size, num_conditions=len(conditions))
    info = ModelInfo(conditions=conditions, n_channels=images[0].shape[0], image_size=size,
                     normalization=Normalizer.fit(images).to_dict())
    save_model(model, unet, make_scheduler(), info)
    return model


def simulated(work: Path, name: str, per_condition: int, size: int) -> Path:
    from phenolens.data.simulate import simulate

    out = work / name
    if not (out / ".done").is_file():
        simulate(out, conditions=["control", "high"], per_condition=per_condition, size=size, seed=3, progress=False,
                 overwrite=True)
        (out / ".done").write_text("")
    return out


def rows(path: Path, sort_by: tuple[str, ...]) -> list[dict]:
    with open(path, newline="") as fh:
        return sorted(csv.DictReader(fh), key=lambda r: tuple(r[k] for k in sort_by))


def pixel_gap(a: Path, b: Path) -> float:
    """The largest difference between the outputs of two translate runs (0: bit-identical)."""
    from phenolens.data.io import read_image

    worst = 0.0
    for row in rows(a / "index.csv", ("source_path", "target_condition")):
        x = read_image(a / row["output_path"])[0].astype(np.float64)
        y = read_image(b / row["output_path"])[0].astype(np.float64)
        worst = max(worst, float(np.abs(x - y).max()))
    return worst


def feature_gap(a: Path, b: Path) -> str:
    """How far two features.csv are apart: the largest relative difference of every feature but
    granularity (0: identical), and how many granularity values differ. cp_measure's granularity on
    32 px crops is not repeatable: two identical one-process runs of the same phenolens differ there
    too (an earlier version as well), so it says nothing about the sharding."""
    key = ("image", "kind", "role", "target_condition")

    def rows_of(run: Path) -> list[dict]:  # each run is a copy in its own folder: image paths relative to it
        found = rows(run / "measure" / "features.csv", key)
        for r in found:
            r["image"] = r["image"].replace(str(run), "RUN")
        return sorted(found, key=lambda r: tuple(r[k] for k in key))

    ra, rb = rows_of(a), rows_of(b)
    assert [tuple(r[k] for k in key) for r in ra] == [tuple(r[k] for k in key) for r in rb], "different rows"
    worst, granular, values = 0.0, 0, 0
    for x, y in zip(ra, rb):
        for k, v in x.items():
            try:
                fx, fy = float(v), float(y[k])
            except (TypeError, ValueError):
                assert v == y[k], (k, v, y[k])
                continue
            if "Granularity" in k:
                values += 1
                granular += fx != fy and not (np.isnan(fx) and np.isnan(fy))
            elif np.isfinite(fx) or np.isfinite(fy):
                worst = max(worst, abs(fx - fy) / max(abs(fx), abs(fy), 1e-12))
    return f"other features: max relative difference {worst:g}; granularity: {granular} of {values} values differ"


VARIANTS = {"1 process, 1 thread": (ALONE, 1), "1 process, 2 threads": (ALONE, 2),
            "2 processes, 1 thread each (accelerate launch)": (LAUNCH2, 1)}


def translate_scaling(work: Path, n: int, steps: int, size: int) -> Path:
    """Time translate three ways; returns the 1-process run (what measure is timed on)."""
    data = simulated(work, f"data-{n}", n // 2, size)
    model = make_model(work, data, size)
    runs, times = {}, {}
    for i, (name, (launch, threads)) in enumerate(VARIANTS.items()):
        out = work / f"translate-{i}"
        shutil.rmtree(out, ignore_errors=True)
        times[name], _ = run([*launch, "translate", model, data, out, "--steps", steps, "--to", "high",
                              "--batch-size", 16], threads)
        runs[name] = out
    names = list(VARIANTS)
    same_rows = rows(runs[names[0]] / "index.csv", ("source_path", "target_condition")) == \
        rows(runs[names[2]] / "index.csv", ("source_path", "target_condition"))
    print(f"\n### translate: {n} images of {size} px, 1 target, {steps} steps, default inversion, batch 16\n")
    table(times, n, {names[1]: f"max pixel difference {pixel_gap(runs[names[0]], runs[names[1]]):g}",
                     names[2]: f"index.csv rows {'equal' if same_rows else 'DIFFER'}, max pixel difference "
                               f"{pixel_gap(runs[names[0]], runs[names[2]]):g}"})
    return runs[names[0]]


def measure_scaling(work: Path, translated: Path, per_condition: int, size: int) -> None:
    """Time measure three ways (and with its own --workers 2 pool) on a translate run, against
    PER_CONDITION real images of each condition."""
    reference = simulated(work, f"reference-{per_condition}", per_condition, size)
    variants = dict(VARIANTS, **{"1 process, --workers 2 (a process pool)": (ALONE, 1)})
    runs, times = {}, {}
    for i, (name, (launch, threads)) in enumerate(variants.items()):
        out = work / f"measure-{i}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(translated, out)
        workers = 2 if "--workers 2" in name else 1
        times[name], _ = run([*launch, "measure", out, "--reference", reference, "--no-judges", "--workers", workers,
                              "--max-reference", per_condition], threads)
        runs[name] = out
    first = next(iter(runs.values()))
    images = sum(1 for _ in open(first / "measure" / "features.csv")) - 1
    print(f"\n### measure: the 1-process translate run above against {per_condition} real images per condition: "
          f"{images} images (sources, outputs, references)\n")
    table(times, images, {k: feature_gap(first, v) for k, v in runs.items() if v != first})


def table(times: dict[str, float], n: int, checks: dict[str, str]) -> None:
    base = next(iter(times.values()))
    print("| run | seconds | images/s | speed vs 1 process, 1 thread | outputs vs 1 process, 1 thread |")
    print("|---|---:|---:|---:|---|")
    for name, sec in times.items():
        print(f"| {name} | {sec:.1f} | {n / sec:.2f} | {base / sec:.2f}x | {checks.get(name, 'baseline')} |")


def memory(work: Path, sizes: list[int], steps: int, size: int) -> None:
    biggest = max(sizes)
    data = simulated(work, f"data-{biggest}", biggest // 2, size)
    model = make_model(work, data, size)
    every = sorted(data.glob("*/*.tif"))
    print(f"\n### memory: {size} px images, 1 target, --inversion ddim --steps {steps}, batch 16, 1 process, 1 thread\n")
    print("| images | seconds | images/s | peak RSS MiB | RSS vs smallest |")
    print("|---:|---:|---:|---:|---:|")
    first = None
    for n in sorted(sizes):
        manifest = work / f"sources-{n}.csv"
        chosen = every[:: max(1, len(every) // n)][:n]
        manifest.write_text("path,condition\n" + "".join(f"{p},{p.parent.name}\n" for p in chosen))
        out = work / f"memory-{n}"
        shutil.rmtree(out, ignore_errors=True)
        sec, rss = run([*ALONE, "translate", model, manifest, out, "--inversion", "ddim", "--steps", steps,
                        "--to", "high", "--batch-size", 16], 1)
        first = first or rss
        print(f"| {n} | {sec:.1f} | {n / sec:.1f} | {rss:.0f} | {rss / first:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="a scratch folder for the data and runs")
    ap.add_argument("--n", type=int, default=256,
                    help="images of the scaling runs (default 256: each whole command starts Python, torch and the "
                         "model, a few seconds that fewer images would not amortise)")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps of the scaling runs (default 10)")
    ap.add_argument("--size", type=int, default=32, help="image size in px (default 32)")
    ap.add_argument("--memory", default="1000,10000", help="image counts of the memory runs (default 1000,10000)")
    ap.add_argument("--memory-steps", type=int, default=2, help="DDIM steps of the memory runs (default 2)")
    ap.add_argument("--reference", type=int, default=512,
                    help="real images per condition that measure compares with (default 512)")
    ap.add_argument("--only", choices=("translate", "measure", "memory"), default=None,
                    help="run one part (measure reuses WORK/translate-0 when it is there)")
    args = ap.parse_args()
    sys.path.insert(0, str(SRC))
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, python "
          f"{sys.version.split()[0]}, torch {torch.__version__}")
    if args.only in (None, "translate"):
        translate_scaling(args.work, args.n, args.steps, args.size)
    if args.only in (None, "measure"):
        translated = args.work / "translate-0"
        if not (translated / "index.csv").is_file():
            translated = translate_scaling(args.work, args.n, args.steps, args.size)
        measure_scaling(args.work, translated, args.reference, args.size)
    if args.only in (None, "memory"):
        memory(args.work, [int(x) for x in args.memory.split(",")], args.memory_steps, args.size)


if __name__ == "__main__":
    main()
