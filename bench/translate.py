"""Images/s of `phenolens translate` against a plain per-image loop with diffusers' schedulers.

    python bench/translate.py [--model DIR] [--data FOLDER] [--n 16] [--steps 50] [--targets 3] [--workers 2]

The baseline is what one writes by hand with diffusers: for each image, DDIMInverseScheduler.step
to invert under the source label, then DDIMScheduler.step to render under each target (one image
at a time). phenolens batches images and targets; its default inversion is fixed-point (warm start,
tolerance, Anderson: about 2 network evaluations per inversion step on the demo model), so it is also
timed with plain DDIM inversion, which does the baseline's exact amount of network work, and with the
fixed-point inversion of earlier versions (6 evaluations per step), and with `--workers N` (N CPU
processes, the torch threads shared out among them) against one process using every thread. Same
model, same images, one run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from phenolens.data.io import read_image
from phenolens.run.translate import TranslateSettings, run_translate


BASELINE = "baseline: per-image diffusers loop (plain DDIM inversion)"
ONE = "phenolens translate (default fixed-point)"


@torch.no_grad()
def baseline_loop(model_dir: Path, paths: list[Path], source: str, targets: list[str], steps: int) -> None:
    from phenolens.methods.phendiff import PhenDiff

    model = PhenDiff.from_pretrained(model_dir, device="cpu")
    unet = model.unet
    inverse = DDIMInverseScheduler.from_config(model.scheduler.config)
    forward = DDIMScheduler.from_config(model.scheduler.config)
    for path in paths:
        x = torch.from_numpy(model.normalizer.to_model(read_image(path, channels=model.info.channels)[0]))[None]
        label = model.labels([source])
        inverse.set_timesteps(steps)
        for t in inverse.timesteps:
            x = inverse.step(unet(x, t, class_labels=label).sample, t, x).prev_sample
        for target in targets:
            y = x.clone()
            label = model.labels([target])
            forward.set_timesteps(steps)
            for t in forward.timesteps:
                y = forward.step(unet(y, t, class_labels=label).sample, t, y).prev_sample


def demo_like_model(tmp: Path) -> Path:
    """The shipped demo model, or a random-weight tiny model of the same shape."""
    from phenolens.demo import DEMO_CONDITIONS, DEMO_MODEL, DEMO_SIZE
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.models.store import ModelInfo, save_model
    from phenolens.models.unet import build_unet

    if (DEMO_MODEL / "phenolens.json").is_file():
        return DEMO_MODEL
    torch.manual_seed(0)
    unet = build_unet("tiny", channels=4, size=DEMO_SIZE, num_conditions=len(DEMO_CONDITIONS))
    info = ModelInfo(conditions=DEMO_CONDITIONS, n_channels=4, image_size=DEMO_SIZE,
                     normalization={"low": [100.0] * 4, "high": [4000.0] * 4})
    save_model(tmp / "model", unet, make_scheduler(), info)
    return tmp / "model"


def source_images(data: Path | None, n: int, tmp: Path, source: str, size: int) -> tuple[list[Path], Path]:
    """N TIFFs of DATA (or N simulated cells of SOURCE at SIZE) and a manifest listing them under SOURCE."""
    from phenolens.data.simulate import simulate

    if data:
        paths = sorted(data.glob("*.tif*"))[:n]
        if len(paths) < n:
            raise SystemExit(f"--data {data}: {len(paths)} TIFF file(s), --n asks for {n}")
    else:
        simulated = simulate(tmp / "data", conditions=[source], per_condition=n, size=size, seed=7, progress=False)
        paths = sorted((simulated / source).glob("*.tif"))
    manifest = tmp / "sources.csv"
    manifest.write_text("path,condition\n" + "".join(f"{p.resolve()},{source}\n" for p in paths))
    return paths, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model dir (default: the demo model)")
    ap.add_argument("--n", type=int, default=16, help="source images (default 16)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    ap.add_argument("--targets", type=int, default=3, help="target conditions per image (default 3)")
    ap.add_argument("--data", type=Path, default=None,
                    help="a folder of source images of the model's first condition, e.g. "
                         "../shared/data/bbbc021-cycloheximide/DMSO with --model models/bbbc021-cycloheximide "
                         "(default: simulated cells of the demo's shape)")
    ap.add_argument("--workers", type=int, default=2, help="processes of the --workers row (default 2)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per batch (default: --n, one batch)")
    ap.add_argument("--workers-only", action="store_true",
                    help="time only the default translation in one process and with --workers (no baseline)")
    args = ap.parse_args()

    from phenolens.methods.phendiff import PhenDiff

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model_dir = args.model or demo_like_model(tmp)
        info = PhenDiff.from_pretrained(model_dir).info
        source, targets = info.conditions[0], info.conditions[1:1 + args.targets]
        paths, manifest = source_images(args.data, args.n, tmp, source, info.image_size)
        results = {}
        if not args.workers_only:
            t0 = time.perf_counter()
            baseline_loop(model_dir, paths, source, targets, args.steps)
            results[BASELINE] = time.perf_counter() - t0
        variants = {
            "phenolens translate --inversion ddim": dict(inversion="ddim"),
            ONE: {},
            "phenolens translate --inversion-tol 0 --inversion-iters 5 --solver picard --no-warm-start (earlier default)":
                dict(inversion_tol=0.0, inversion_iters=5, solver="picard", warm_start=False),
            f"phenolens translate --workers {args.workers} (default fixed-point)": dict(workers=args.workers),
        }
        if args.workers_only:
            variants = {k: v for k, v in variants.items() if k == ONE or "--workers" in k}
        for i, (name, options) in enumerate(variants.items()):
            workers = options.pop("workers", 1)
            settings = TranslateSettings(model_dir=str(model_dir), input=str(manifest), targets=targets,
                                         steps=args.steps, batch_size=args.batch_size or args.n, **options)
            t0 = time.perf_counter()
            run_translate(settings, tmp / f"run-{i}", progress=False, workers=workers)
            results[name] = time.perf_counter() - t0

    base = results.get(BASELINE)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
          f"python {sys.version.split()[0]}, torch {torch.__version__}")
    print(f"model: {model_dir}; {args.n} images of {info.image_size} px, {len(targets)} targets, {args.steps} steps")
    one = results[ONE]
    print("| method | seconds | images/s | speed vs baseline | speed vs one process |")
    print("|---|---|---|---|---|")
    for name, sec in results.items():
        vs_base = f"{base / sec:.2f}x" if base else "not run"
        print(f"| {name} | {sec:.1f} | {args.n / sec:.2f} | {vs_base} | {one / sec:.2f}x |")


if __name__ == "__main__":
    main()
