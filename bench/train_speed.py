"""Images/s of phenolens's training loop against a minimal hand-written diffusers loop.

    python bench/train_speed.py [--size 32] [--batch-size 16] [--steps 30] [--preset tiny] [--device cpu|cuda]
                                [--mixed-precision no|bf16] [--per-condition 16]

Both train the same network (UNet2DModel from the --preset config `phenolens train` builds, with a
class embedding per condition) with AdamW, an ε target and the MSE, on the same simulated images
(`phenolens.data.simulate.simulate`, four conditions of --per-condition images of --size px, read by
phenolens once), with the same batch size, image size and number of steps. The baseline is what one
writes by hand: all images on the device, a random batch and class labels, t and ε drawn on the device,
DDPMScheduler.add_noise, forward, MSE, backward, AdamW step. phenolens (`train_phendiff`, the code
behind `phenolens train`) does more per step: per-step seeded generators (exact resume), random
crops and flips/rotations on the CPU, condition dropout, gradient clipping, warm-up schedule and EMA
(also timed with --no-ema). "loop" rows time the steps only (the `seconds` of the last train_log.csv
row, read after the loss is read back); the "whole call" row adds reading the images, building the
model, the final checkpoint and saving the model. One process, one run per row, first step included
(a short untimed baseline run warms up first). --device cpu hides any GPU (CUDA_VISIBLE_DEVICES="");
--device cuda also prints each loop's peak memory (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

BASELINE = "baseline: hand-written diffusers loop"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32, help="image side in px (default 32)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    ap.add_argument("--steps", type=int, default=30, help="optimiser steps per loop (default 30)")
    ap.add_argument("--preset", default="tiny", help="network preset: tiny, small or paper (default tiny)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    ap.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                    help="both loops: bf16 autocast or none (default no)")
    ap.add_argument("--per-condition", type=int, default=16, help="simulated images per condition (default 16)")
    return ap.parse_args()


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def baseline_loop(images, labels, n_conditions: int, preset: str, steps: int, batch_size: int, device: str,
                  mixed_precision: str) -> float:
    """Seconds for STEPS steps of the plain diffusers loop (images: (N, C, S, S) in [-1, 1])."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel

    from phenolens.models.unet import preset_kwargs

    torch.manual_seed(0)
    c, s = images.shape[1], images.shape[-1]
    unet = UNet2DModel(sample_size=s, in_channels=c, out_channels=c, num_class_embeds=n_conditions + 1,
                       **preset_kwargs(preset, s)).to(device).train()
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-4, weight_decay=1e-2)
    images, labels = images.to(device), labels.to(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), device=device)
        x0, y = images[idx], labels[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), device=device)
        x_t = sched.add_noise(x0, noise, t)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            pred = unet(x_t, t, class_labels=y).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def phenolens_loop(data: Path, out: Path, args: argparse.Namespace, ema: bool) -> tuple[float, float]:
    """(loop seconds, whole-call seconds) of `train_phendiff` with the same network, data and steps."""
    from phenolens.methods.phendiff import PhenDiffTrainSettings, train_phendiff
    from phenolens.train.trainer import TrainConfig

    settings = PhenDiffTrainSettings(preset=args.preset, size=args.size, prediction_type="epsilon")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-4, log_every=args.steps,
                         checkpoint_every=args.steps, ema=ema, mixed_precision=args.mixed_precision, seed=0)
    t0 = time.perf_counter()
    train_phendiff(data, out, settings, config, progress=False)
    whole = time.perf_counter() - t0
    with (out / "train_log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["seconds"]), whole


def main() -> None:
    args = parse()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch starts: accelerate (phenolens) then picks the CPU
    import logging

    import torch

    from phenolens.data.dataset import ImageSet
    from phenolens.data.records import training_records
    from phenolens.data.simulate import simulate

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    logging.getLogger("phenolens").setLevel(logging.WARNING)
    results: dict[str, float] = {}
    peaks: dict[str, float] = {}

    def measure(name: str, run) -> float:
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        value = run()
        if args.device == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        return value

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        data = simulate(tmp / "data", per_condition=args.per_condition, size=args.size, seed=7, progress=False)
        records, conditions = training_records(data)
        images = ImageSet(records, args.size, conditions, augment=False, progress=False)
        x = torch.stack(images.images)[..., :args.size, :args.size].contiguous()
        y = images.labels
        common = dict(n_conditions=len(conditions), preset=args.preset, batch_size=args.batch_size,
                      device=args.device, mixed_precision=args.mixed_precision)
        baseline_loop(x, y, steps=2, **common)  # warm-up, untimed
        results[BASELINE] = measure(BASELINE, lambda: baseline_loop(x, y, steps=args.steps, **common))
        loop, whole = {}, {}
        for ema in (True, False):
            name = "phenolens train (loop)" if ema else "phenolens train --no-ema (loop)"
            loop[name], whole[name] = measure(name, lambda: phenolens_loop(data, tmp / f"model-{ema}", args, ema))
            results[name] = loop[name]
        results["phenolens train (whole call: read images, set up, final checkpoint, save)"] = \
            whole["phenolens train (loop)"]

    print(f"machine: {platform.platform()} ({platform.machine()} {platform.processor() or ''}), "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, python {sys.version.split()[0]}, "
          f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"data: {len(x)} simulated images ({len(conditions)} conditions, {x.shape[1]} channels) of {args.size} px; "
          f"preset {args.preset}, batch {args.batch_size}, {args.steps} steps, mixed precision {args.mixed_precision}")
    print()
    print("| loop | steps | seconds | images/s | ratio vs baseline |")
    print("|---|---|---|---|---|")
    base = args.steps * args.batch_size / results[BASELINE]
    for name, sec in results.items():
        speed = args.steps * args.batch_size / sec
        print(f"| {name} | {args.steps} | {sec:.2f} | {speed:.1f} | {speed / base:.2f}x |")
    if peaks:
        print()
        print("peak GPU memory (torch.cuda.max_memory_allocated): "
              + "; ".join(f"{name}: {mib:.0f} MiB" for name, mib in peaks.items()))


if __name__ == "__main__":
    main()
