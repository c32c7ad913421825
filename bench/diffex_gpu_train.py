"""Train several DiffEx models side by side on one GPU for a fixed wall-clock budget, then pack them.

    python bench/diffex_gpu_train.py WORK --run NAME:DATA:CLASSIFIER:VIEWS [--run ...] --budget SECONDS
        [--per-condition 300] [--size 48] [--lambda-cls 0.1] [--calibrate-steps 150] [--max-steps N] [--pack DIR]

Why: a 2-core CPU trains the tiny DiffEx UNet at about 2 s a step, so the simulator models of
`bench/diffex_simulator.py` stopped at 1500-2000 steps. On a GPU lent for a few minutes the same
`phenolens train --method diffex` runs many times longer; the models come back as tar files and the
rest of the bench (reconstruction, directions, explain, measure) runs on the CPU over them:
`bench/diffex_simulator.py WORK` skips training when WORK/diffex-<tag> is already a finished model.

Stages, each a `phenolens` command as a user would run it:
1. DATA `together` or `separate`: `phenolens simulate` WORK/train-<DATA> (seed 0, the data
   diffex_simulator.py makes) when missing; any other DATA is a folder or CSV `phenolens train` reads;
2. a calibration: every --run trains --calibrate-steps steps at once, side by side, into a scratch
   folder; the slowest run's seconds per step (from its train_log.csv) sets how many steps fit the
   budget;
3. the real runs, side by side, `--steps N` each (the cosine schedule then ends where training ends);
4. --pack: each model as DIR/<NAME>.tar, and DIR/gpu_train.json with the machine, the steps and the
   seconds per step measured. The checkpoints and the model's copy of the classifier are left out (a
   device returns files of 16 MiB at most); after `tar xf NAME.tar`, `cp -r CLASSIFIER NAME/classifier`.

--run NAME:DATA:CLASSIFIER:VIEWS trains WORK/NAME on DATA with the classifier directory CLASSIFIER
(`phenolens classifier train`'s output) and --classifier-views VIEWS (whole or per-stain), at --size.

Measured on an H200 (2026-12-04): three 48 px simulator models side by side at 0.049 s a step each
(7250 steps in 6 min), against about 2 s a step for one on a 2-core CPU thread; two 68 px BBBC021
models side by side at 0.071 s a step (3000 steps in 3.5 min).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROUND = 250


def phenolens_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "phenolens", *map(str, args)]


def training_data(work: Path, mode: str, per_condition: int, size: int) -> Path:
    """The simulator's training data for MODE together / separate (made once), or MODE itself as a path."""
    if mode not in ("together", "separate"):
        return Path(mode)
    data = work / f"train-{mode}"
    if not (data / "manifest.csv").is_file():
        extra = ["--conditions", "control,high"] if mode == "together" else []
        subprocess.run(phenolens_cmd("simulate", data, "--per-condition", per_condition, "--seed", 0,
                                     "--size", size, "--mode", mode, *extra), check=True)
    return data


def train_all(runs: list[dict], work: Path, steps: int, out_of: str, lambda_cls: float,
              size: int) -> dict[str, float]:
    """Start every run's `phenolens train` at once and wait; seconds per step of each (its log)."""
    procs = {}
    for r in runs:
        model = work / out_of.format(name=r["name"])
        cmd = phenolens_cmd("train", r["data"], model, "--method", "diffex", "--classifier", r["classifier"],
                            "--lambda-cls", lambda_cls, "--classifier-views", r["views"], "--size", size, "--steps", steps,
                            "--checkpoint-every", max(ROUND, steps // 4))
        print("$ " + " ".join(cmd[2:]), flush=True)
        log = open(work / f"log-{model.name}.txt", "w")
        procs[r["name"]] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), model, log)
    rates = {}
    for name, (p, model, log) in procs.items():
        rc = p.wait()
        log.close()
        if rc:
            sys.exit(f"{name}: phenolens train failed (exit {rc}); see {log.name}:\n"
                     + Path(log.name).read_text()[-3000:])
        rates[name] = seconds_per_step(model / "train_log.csv")
    return rates


def seconds_per_step(train_log: Path) -> float:
    """From the trainer's log (step, ..., seconds): the pace after the first logged step (start-up left out)."""
    with open(train_log, newline="") as fh:
        rows = [(int(r["step"]), float(r["seconds"])) for r in csv.DictReader(fh)]
    (s0, t0), (s1, t1) = rows[0], rows[-1]
    return (t1 - t0) / max(s1 - s0, 1)


def pack(runs: list[dict], work: Path, dest: Path, report: dict) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for r in runs:
        model = work / r["name"]
        with tarfile.open(dest / f"{r['name']}.tar", "w") as tar:
            tar.add(model, arcname=r["name"], filter=lambda ti: None if ti.name.split("/")[1:2] in (["checkpoints"], ["classifier"]) else ti)
    (dest / "gpu_train.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--run", action="append", required=True, help="NAME:MODE:CLASSIFIER:VIEWS (repeatable)")
    ap.add_argument("--budget", type=float, required=True, help="seconds of training wall time for the real runs")
    ap.add_argument("--per-condition", type=int, default=300)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--lambda-cls", type=float, default=0.1)
    ap.add_argument("--calibrate-steps", type=int, default=150)
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--pack", type=Path, default=None)
    args = ap.parse_args()

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for spec in args.run:
        name, data, clf, views = spec.split(":")
        runs.append(dict(name=name, classifier=clf, views=views,
                         data=training_data(work, data, args.per_condition, args.size)))
    t = time.perf_counter()
    calib = train_all(runs, work, args.calibrate_steps, "calibrate-{name}", args.lambda_cls, args.size)
    calib_wall = time.perf_counter() - t
    pace = max(calib.values())
    steps = min(args.max_steps, max(ROUND, int(args.budget / pace * 0.92) // ROUND * ROUND))
    print(f"calibration: {calib} s/step side by side ({calib_wall:.0f} s wall); training {steps} steps", flush=True)
    t = time.perf_counter()
    rates = train_all(runs, work, steps, "{name}", args.lambda_cls, args.size)
    wall = time.perf_counter() - t
    report = dict(machine=machine(), runs=args.run, steps=steps, seconds_per_step=rates,
                  calibration_seconds_per_step=calib, wall_seconds=round(wall, 1), lambda_cls=args.lambda_cls)
    print(json.dumps(report, indent=2), flush=True)
    if args.pack:
        pack(runs, work, args.pack, report)


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}"


if __name__ == "__main__":
    main()
