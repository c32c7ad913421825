"""Reconstruction benchmark: how exactly does sample(invert(x)) regenerate real images?

    python bench/inversion.py MODEL_DIR DATA_DIR [--n 16] [--steps 25,50,100]
                              [--methods ddim,fp1,fp2,fp3,fp5] [--out table.csv] [--threads N]

Takes the first `n` images of the model's first condition (DATA_DIR/<condition>/*.tif), inverts each
under its own condition and regenerates it under the same one. The reconstruction error is the floor
under which no counterfactual "change" can be believed, so it decides the default inversion method
and step count. Prints a markdown table: steps x method -> mean PSNR (dB, data range 2 for [-1, 1]
images), mean MSE, seconds per image. `fpK` = fixed-point inversion with K iterations.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from phenolens.diffusion.ddim import invert, sample, unet_fn
from phenolens.models.store import load_model


def parse_method(name: str) -> tuple[str, int]:
    if name == "ddim":
        return "ddim", 0
    if name.startswith("fp") and name[2:].isdigit():
        return "fixed-point", int(name[2:])
    raise SystemExit(f"--methods: {name!r} is not 'ddim' or 'fpK' (fixed-point with K iterations)")


def to_model_space(raw: np.ndarray, normalization: dict) -> torch.Tensor:
    """raw CHW -> [-1, 1] with the model's saved normalisation (phenolens' Normalizer when available)."""
    try:
        from phenolens.data.normalize import Normalizer

        return torch.as_tensor(np.asarray(Normalizer.from_dict(normalization).to_model(raw)), dtype=torch.float32)
    except ImportError:
        low = np.asarray(normalization["low"], dtype=np.float32).reshape(-1, 1, 1)
        high = np.asarray(normalization["high"], dtype=np.float32).reshape(-1, 1, 1)
        x = (raw - low) / np.maximum(high - low, 1e-8) * 2 - 1
        return torch.from_numpy(np.clip(x, -1, 1).astype(np.float32))


def load_images(data_dir: Path, info, n: int) -> torch.Tensor:
    import tifffile

    cond = info.conditions[0]
    files = sorted((data_dir / cond).glob("*.tif")) + sorted((data_dir / cond).glob("*.tiff"))
    if not files:
        raise SystemExit(f"{data_dir / cond}: no .tif images of condition {cond!r}")
    out = []
    for path in files[:n]:
        raw = np.asarray(tifffile.imread(path), dtype=np.float32)
        if raw.ndim == 2:
            raw = raw[None]
        elif raw.ndim == 3 and raw.shape[-1] == info.n_channels and raw.shape[0] != info.n_channels:
            raw = np.moveaxis(raw, -1, 0)  # YXC -> CYX
        if info.channels:
            raw = raw[info.channels]
        x = to_model_space(raw, info.normalization)
        # centre crop to a square, then resize to the model's size
        h, w = x.shape[-2:]
        m = min(h, w)
        x = x[:, (h - m) // 2 : (h - m) // 2 + m, (w - m) // 2 : (w - m) // 2 + m]
        if m != info.image_size:
            x = F.interpolate(x[None], size=(info.image_size,) * 2, mode="bilinear", align_corners=False)[0]
        out.append(x)
    return torch.stack(out)


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

    unet, scheduler, info = load_model(args.model_dir)
    model = unet_fn(unet)
    x0 = load_images(args.data_dir, info, args.n)
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
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
