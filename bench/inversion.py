"""Reconstruction benchmark: how exactly does sample(invert(x)) regenerate real images?

    python bench/inversion.py MODEL_DIR DATA_DIR [--n 16] [--steps 25,50,100]
                              [--methods ddim,fp1,fp2,fp3,fp5] [--out table.csv] [--threads N]

Takes the first `n` images of the model's first condition in DATA_DIR (a dataset root or manifest), inverts each
under its own condition and regenerates it under the same one. The reconstruction error is the floor
under which no counterfactual "change" can be believed, so it decides the default inversion method
and step count. Prints a markdown table: steps x method -> mean PSNR (dB, data range 2 for [-1, 1]
images), mean MSE, seconds per image. `fpK` = fixed-point inversion with K iterations.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from phenolens.atomic import write_csv_atomic

from phenolens.data.io import read_image
from phenolens.data.records import discover
from phenolens.diffusion.ddim import invert, sample, unet_fn
from phenolens.methods.phendiff import PhenDiff


def parse_method(name: str) -> tuple[str, int]:
    if name == "ddim":
        return "ddim", 0
    if name.startswith("fp") and name[2:].isdigit():
        return "fixed-point", int(name[2:])
    raise SystemExit(f"--methods: {name!r} is not 'ddim' or 'fpK' (fixed-point with K iterations)")


def load_images(data_dir: Path, model: PhenDiff, n: int) -> torch.Tensor:
    """The first n images of the model's first condition, in [-1, 1], as `phenolens translate` sees them."""
    cond = model.conditions[0]
    records = discover(data_dir, condition=cond)[:n]
    raws = [read_image(r.path, channels=model.info.channels)[0] for r in records]
    shape = raws[0].shape
    return model.to_model_space([r for r in raws if r.shape == shape])[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", default="25,50,100")
    ap.add_argument("--methods", default="ddim,fp1,fp2,fp3,fp5")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    phendiff = PhenDiff.from_pretrained(args.model_dir, device="cpu")
    unet, scheduler, info = phendiff.unet, phendiff.scheduler, phendiff.info
    model = unet_fn(unet)
    x0 = load_images(args.data_dir, phendiff, args.n)
    labels = torch.full((len(x0),), info.condition_index(info.conditions[0]), dtype=torch.long)
    steps_list = [int(s) for s in args.steps.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    print(
        f"{len(x0)} images of {info.conditions[0]!r}, {info.image_size}px, prediction={scheduler.config.prediction_type}, "
        f"spacing={scheduler.config.timestep_spacing}, zero-SNR={scheduler.config.rescale_betas_zero_snr}",
        file=sys.stderr,
    )

    rows = []
    for steps in steps_list:
        for name in methods:
            method, iters = parse_method(name)
            t0 = time.perf_counter()
            mses = []
            for i in range(0, len(x0), args.batch):
                xb, lb = x0[i : i + args.batch], labels[i : i + args.batch]
                xT = invert(model, xb, lb, scheduler, steps=steps, method=method, iters=iters)
                rec = sample(model, xT, lb, scheduler, steps=steps)
                mses += ((rec - xb) ** 2).flatten(1).mean(1).tolist()
            sec = (time.perf_counter() - t0) / len(x0)
            psnr = [10 * math.log10(4.0 / max(m, 1e-20)) for m in mses]  # data range 2: peak² = 4
            rows.append(dict(steps=steps, method=name, psnr_db=float(np.mean(psnr)), mse=float(np.mean(mses)),
                             sec_per_image=sec))
            print(f"  {steps:>4} {name:>5}: {rows[-1]['psnr_db']:.2f} dB", file=sys.stderr)

    print("| steps | method | PSNR (dB) | MSE | s/image |")
    print("|---:|:---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['steps']} | {r['method']} | {r['psnr_db']:.2f} | {r['mse']:.3g} | {r['sec_per_image']:.3f} |")
    if args.out:
        write_csv_atomic(args.out, rows, list(rows[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
