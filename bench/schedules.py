"""Which noise-schedule setup inverts most exactly? ε vs v prediction, leading vs trailing, zero-SNR.

    python bench/schedules.py [--steps 600] [--size 16] [--out table.csv] [--threads 1] [--lr 5e-4]

Backs the library's defaults (`phenolens train --prediction-type v_prediction --timestep-spacing
leading`, zero terminal SNR off) with numbers. For each configuration

    epsilon / leading,  v_prediction / leading,  v_prediction / trailing,  v_prediction / trailing + zero-SNR

it trains a `tiny` class-conditional UNet for `--steps` steps on the same small simulated data set
(`simulate(conditions=['a', 'b'], per_condition=40, size=32)`, 4 channels, random `--size` crops),
from the same seed (same initial weights, same batches, timesteps and noise: the trainer draws them
from generators seeded by (seed, step)). Timestep spacing only changes which timesteps sampling and
inversion visit, not the training loss, so "v / leading" and "v / trailing" share one trained model
(trained once; its "train s" is shown on both rows). It then measures how exactly `sample(invert(x))`
regenerates 8 held-out images (the last 4 of each condition, never trained on; centre `--size` crop), each under its
own condition: plain DDIM inversion (PhenDiff eq. 6) and fixed-point inversion with 1 and 3 iterations
(`fpK`), at 25 and 50 DDIM steps. PSNR is per image with data range 2 ([-1, 1] images: peak² = 4),
averaged over the 8. Evaluated weights are the EMA weights, which is what `phenolens train` saves.

The "loss" column is the training loss averaged over the last 50 steps. It is NOT comparable across
prediction types (ε- and v-targets differ) nor with zero-SNR (a different noise schedule); it is there
to show each run trained, not to rank them.

Keep CPU use low on a shared machine: `nice -n 19 python bench/schedules.py --threads 1`.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from phenolens.atomic import write_csv_atomic

from phenolens.data.dataset import ImageSet
from phenolens.data.records import discover
from phenolens.data.simulate import simulate
from phenolens.diffusion.conditions import network_fn
from phenolens.diffusion.ddim import invert, make_scheduler, sample
from phenolens.models.unet import build_unet
from phenolens.train.trainer import LOG_NAME, TrainConfig, train

CONDITIONS = ["a", "b"]
PER_CONDITION = 40
HELD_OUT_PER_CONDITION = 4  # 8 held-out images in all
SIM_SIZE = 32
# (name, prediction_type, timestep_spacing, zero_terminal_snr)
CONFIGS = [
    ("eps / leading", "epsilon", "leading", False),
    ("v / leading", "v_prediction", "leading", False),
    ("v / trailing", "v_prediction", "trailing", False),
    ("v / trailing + zero-SNR", "v_prediction", "trailing", True),
]
INVERSION_STEPS = (25, 50)
METHODS = (("ddim", "ddim", 0), ("fp1", "fixed-point", 1), ("fp3", "fixed-point", 3))
LOSS_WINDOW = 50


def make_data(root: Path, size: int, seed: int) -> tuple[ImageSet, torch.Tensor, torch.Tensor]:
    """(training set, held-out images (N, C, size, size) in [-1, 1], their labels)."""
    simulate(root, conditions=CONDITIONS, per_condition=PER_CONDITION, size=SIM_SIZE, seed=seed, progress=False,
             workers=1)
    records = discover(root)
    train_recs, held_recs = [], []
    for c in CONDITIONS:
        recs = [r for r in records if r.condition == c]
        train_recs += recs[:-HELD_OUT_PER_CONDITION]
        held_recs += recs[-HELD_OUT_PER_CONDITION:]
    train_set = ImageSet(train_recs, size=size, conditions=CONDITIONS, progress=False)
    held = ImageSet(held_recs, size=size, conditions=CONDITIONS, normalizer=train_set.normalizer, augment=False,
                    progress=False)
    crops = []
    for img in held.images:  # deterministic centre crop
        h, w = img.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2
        crops.append(img[:, top:top + size, left:left + size])
    return train_set, torch.stack(crops), held.labels.clone()


def final_loss(out_dir: Path) -> float:
    with (out_dir / LOG_NAME).open(newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    tail = losses[-LOSS_WINDOW:]
    return sum(tail) / len(tail)


def psnr(rec: torch.Tensor, x0: torch.Tensor) -> tuple[float, float]:
    """(mean per-image PSNR in dB with data range 2, mean MSE)."""
    mses = ((rec.double() - x0.double()) ** 2).flatten(1).mean(1).tolist()
    db = [10 * math.log10(4.0 / max(m, 1e-20)) for m in mses]
    return sum(db) / len(db), sum(mses) / len(mses)


def train_model(prediction_type, zero_snr, train_set, args, work: Path):
    """(EMA model, final loss, training seconds) for one training setup, always from the same seed."""
    torch.manual_seed(args.seed)  # identical initial weights for every configuration
    unet = build_unet("tiny", channels=train_set.n_channels, size=args.size, num_conditions=len(CONDITIONS))
    # spacing only affects sampling/inversion (set_timesteps), never the training loss
    scheduler = make_scheduler(prediction_type=prediction_type, timestep_spacing="trailing" if zero_snr else "leading",
                               zero_terminal_snr=zero_snr)
    out_dir = work / f"{prediction_type}-zsnr{int(zero_snr)}"
    ema_model: dict[str, torch.nn.Module] = {}

    def keep(model, step):  # the EMA copy, which `phenolens train` would save
        ema_model["m"] = model

    config = TrainConfig(steps=args.steps, batch_size=16, lr=args.lr, checkpoint_every=10**9, ema=True, log_every=1,
                         seed=args.seed)
    t0 = time.perf_counter()
    train(unet, scheduler, train_set, out_dir, config, null_label=len(CONDITIONS), progress=False, on_save=keep)
    return ema_model["m"].eval(), final_loss(out_dir), time.perf_counter() - t0


def run_config(name, prediction_type, spacing, zero_snr, train_set, x0, labels, args, work: Path,
               trained: dict) -> list[dict]:
    key = (prediction_type, zero_snr)
    if key not in trained:
        trained[key] = train_model(prediction_type, zero_snr, train_set, args, work)
    ema, loss, train_s = trained[key]
    scheduler = make_scheduler(prediction_type=prediction_type, timestep_spacing=spacing, zero_terminal_snr=zero_snr)
    model = network_fn(ema)
    condition = {"class_labels": labels}

    rows = []
    t1 = time.perf_counter()
    for steps in INVERSION_STEPS:
        for method_name, method, iters in METHODS:
            xT = invert(model, x0, condition, scheduler, steps=steps, method=method, iters=iters).x
            rec = sample(model, xT, condition, scheduler, steps=steps)
            db, mse = psnr(rec, x0)
            rows.append(dict(config=name, prediction_type=prediction_type, timestep_spacing=spacing,
                             zero_terminal_snr=zero_snr, train_steps=args.steps, final_loss=loss,
                             inversion_steps=steps, method=method_name, psnr_db=db, mse=mse,
                             train_s=train_s))
    eval_s = time.perf_counter() - t1
    for r in rows:
        r["eval_s"] = eval_s
    print(f"  {name}: loss {loss:.4f}, train {train_s:.0f} s, eval {eval_s:.0f} s, "
          + ", ".join(f"{r['inversion_steps']}/{r['method']} {r['psnr_db']:.2f} dB" for r in rows),
          file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps per configuration (default 600)")
    ap.add_argument("--size", type=int, default=16, choices=(16, 24), help="image/crop size in pixels (default 16)")
    ap.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4, as the demo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as CSV (one row per cell)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t_start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="phenolens-schedules-") as tmp:
        work = Path(tmp)
        train_set, x0, labels = make_data(work / "data", args.size, args.seed)
        print(f"{len(train_set)} training images, {len(x0)} held-out, {train_set.n_channels} channels, "
              f"{args.size}px crops", file=sys.stderr, flush=True)
        trained: dict = {}
        for name, pt, spacing, zsnr in CONFIGS:
            rows += run_config(name, pt, spacing, zsnr, train_set, x0, labels, args, work, trained)
    total = time.perf_counter() - t_start

    cols = [(s, m) for s in INVERSION_STEPS for m, _, _ in METHODS]
    print(f"Reconstruction PSNR (dB, data range 2, mean of {len(x0)} held-out images) of sample(invert(x)); "
          f"tiny UNet, {args.steps} training steps, batch 16, lr {args.lr:g}, seed {args.seed}, {args.size}px, "
          f"EMA weights. fpK = fixed-point inversion with K iterations.\n")
    print("| configuration | loss* | " + " | ".join(f"{s} {m}" for s, m in cols) + " | train s |")
    print("|:---|---:|" + "---:|" * len(cols) + "---:|")
    for name, *_ in CONFIGS:
        sub = {(r["inversion_steps"], r["method"]): r for r in rows if r["config"] == name}
        first = next(iter(sub.values()))
        print(f"| {name} | {first['final_loss']:.4f} | "
              + " | ".join(f"{sub[c]['psnr_db']:.2f}" for c in cols) + f" | {first['train_s']:.0f} |")
    print(f"\n*loss: mean training loss over the last {LOSS_WINDOW} steps; not comparable across prediction types "
          "or noise schedules.")
    print(f"\nmachine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} thread(s); "
          f"total {total:.0f} s ({total / 60:.1f} min)")
    if args.out:
        write_csv_atomic(args.out, rows, list(rows[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
