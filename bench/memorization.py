"""Memorisation vs data size (Phen-LDiff Fig. 4 on simulated cells): the check on 10 and 500 images per condition.

    OMP_NUM_THREADS=1 python bench/memorization.py --out bench/memorization.md --steps 1000 --no-augment [--work DIR]

For each size: `phenolens simulate` (2 conditions, 32 px), split into two disjoint halves (5 vs 5 and
250 vs 250 per condition), train a tiny model on each half with identical settings, generate the same
noises from both, and score memorisation (nearest training image) and generalisation (the two models
agree). The paper's claim: with few images the models copy their halves (memorisation near 1, the two
models disagree), with many they do not.

Measured (1000 steps, batch 8, lr 2e-3, --no-augment, one busy CPU thread, 1151 s in all;
bench/memorization.md), and before --no-augment existed (600 steps, flips/rotations on, 957 s):

    images/cond  augment  memorisation mean  unseen-real mean  generalisation mean  memorised (>0.9)
    10           no       0.778              0.703             0.565                2 %
    500          no       0.794              0.845             0.879                0 %
    10           yes      0.718              0.703             0.787                0 %
    500          yes      0.755              0.845             0.944                0 %

Generalisation falls with less data as in the paper (the two 10-image models turn the same noise into
different cells), and more so without augmentation (0.79 -> 0.57). The raw memorisation score does NOT
fall with data, with or without augmentation: the tiny model does not copy its 10 images within this CPU
budget. Switching augmentation off (and 1000 steps instead of 600) raises it from 0.72 to 0.78, no more.
Probes of one 10-image model (half A, no augmentation, the bench's 32 noises): lr 2e-3 batch 8 gives
0.80 at 1000 steps and 0.825 at 2000 (16 % > 0.9), about +0.025 per doubling of the steps; lr 5e-3 0.78
and lr 1e-3 (cosine decay) 0.80 at 1000 steps; batch 2, lr 1e-3: 0.81 after 4000 steps (the same compute
as 1000 at batch 8); a cosine noise schedule with cosine lr decay: 0.83 at 1000 steps; EMA or raw
weights: the same; the small preset costs ~6x per step (0.67 after 400 steps at batch 4). Started from a
noised training image the 2000-step model does return it (from t = 380 of 1000: cosine 0.96, always the
same image), but from pure noise it draws new cells of the same kind. Partly copies, though: in the
bench the nearest training image is upright for 30 of the 64 generations of the 10-image models (8 by
chance), against 3 of 64 for the 500-image models (memorization.csv, nearest_transform). Meanwhile on
these 32 px fields of one or two cells a real image that the model never saw already scores 0.70 against
10 training images and 0.84 against 500, so a 500-image model drawing realistic cells scores as high as
a 10-image model that half copies. Only relative to that reference does memorisation fall with data
(+0.07 -> -0.05 without augmentation, +0.01 -> -0.09 with).

Prints a table and writes it to --out (markdown, or CSV when the name ends in .csv). With --work the
datasets and models are kept there, and a rerun reuses or resumes them (the check's own resume).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from phenolens.atomic import write_csv_atomic, write_text_atomic
from phenolens.data.simulate import simulate
from phenolens.run.memorization import memorization_check

COLUMNS = ["images_per_condition", "training_images_per_model", "memorization_mean", "memorization_median",
           "fraction_memorized", "real_unseen_mean", "memorization_minus_real_unseen", "generalization_mean", "generalization_median",
           "train_seconds", "wall_seconds"]


def run_size(work: Path, per_condition: int, args: argparse.Namespace) -> dict:
    """Simulate (or reuse) one dataset and run the check on it; one table row."""
    t0 = time.perf_counter()
    data = work / f"data_{per_condition}"
    if not (data / "manifest.csv").is_file():
        simulate(data, conditions=["control", "treated"], per_condition=per_condition, size=args.size,
                 seed=args.seed, progress=False, workers=1, overwrite=True)
    s = memorization_check(data, work / f"check_{per_condition}", preset=args.preset, size=args.size,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           n_per_condition=args.n_per_condition, sample_steps=args.sample_steps, seed=args.seed,
                           threshold=args.threshold, augment=not args.no_augment, progress=args.progress)
    m, g = s["memorization"], s["generalization"]
    return dict(images_per_condition=per_condition, training_images_per_model=s["per_model"]["a"]["training_images"],
                memorization_mean=round(m["mean"], 3), memorization_median=round(m["median"], 3),
                fraction_memorized=round(m["fraction_memorized"], 3), real_unseen_mean=round(s["real_unseen"]["mean"], 3),
                memorization_minus_real_unseen=round(m["mean"] - s["real_unseen"]["mean"], 3),
                generalization_mean=round(g["mean"], 3), generalization_median=round(g["median"], 3),
                train_seconds=round(s["seconds"]["train"], 1), wall_seconds=round(time.perf_counter() - t0, 1))


def markdown(rows: list[dict], args: argparse.Namespace, total: float) -> str:
    lines = ["# Memorisation vs data size (bench/memorization.py)", "",
             f"`{' '.join(['python', 'bench/memorization.py'] + sys.argv[1:])}`  ",
             f"python {sys.version.split()[0]}, torch {torch.__version__}, {platform.machine()}, "
             f"{torch.get_num_threads()} thread(s); total wall time {total:.0f} s", "",
             f"Settings (both sizes): {args.preset} preset, {args.size} px, {args.steps} steps, batch {args.batch_size}, "
             f"lr {args.lr:g}, {'no augmentation' if args.no_augment else 'flips/rotations augmentation'}, "
             f"{args.n_per_condition} generations per condition per model, "
             f"{args.sample_steps} DDIM steps, threshold {args.threshold:g}, seed {args.seed}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="table file: markdown, or CSV if it ends in .csv")
    ap.add_argument("--sizes", default="10,500", help="images per condition to simulate, comma-separated (default 10,500)")
    ap.add_argument("--steps", type=int, default=600, help="training steps of every model (default 600)")
    ap.add_argument("--batch-size", type=int, default=8, help="training batch size (default 8)")
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    ap.add_argument("--preset", choices=("tiny", "small", "paper"), default="tiny",
                    help="network size of every model (default tiny; small is ~6x slower per step on CPU)")
    ap.add_argument("--no-augment", action="store_true",
                    help="train without the trainer's flips/rotations (each model sees its images as they are)")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    ap.add_argument("--n-per-condition", type=int, default=16, help="generations per condition per model (default 16)")
    ap.add_argument("--sample-steps", type=int, default=50, help="DDIM steps per generation (default 50)")
    ap.add_argument("--threshold", type=float, default=0.9, help="memorised above this cosine (default 0.9)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data, split, training and noises (default 0)")
    ap.add_argument("--work", type=Path, default=None, help="keep datasets and models here (default: a temporary folder)")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for n in sizes:
            rows.append(run_size(work, n, args))
            print("  ".join(f"{c}={rows[-1][c]}" for c in COLUMNS), flush=True)
    total = time.perf_counter() - t0
    text = markdown(rows, args, total)
    print(text)
    if args.out.suffix.lower() == ".csv":
        write_csv_atomic(args.out, rows, COLUMNS)
    else:
        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
