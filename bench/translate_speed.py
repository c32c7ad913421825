"""How close `phenolens translate` runs to the speed of its network alone, against a plain per-batch
diffusers loop, and what bf16 target renders change. One model, N images, everything measured in one run.

    python bench/translate_speed.py [--model DIR] [--data FOLDER] [--n 32] [--steps 20] [--batch-size 16]
                                    [--targets 1] [--device cpu|cuda] [--no-bf16]
    python bench/translate_speed.py --gpu [--gpu-n 8]     # paper preset at 128 px and SD-2 768-v size, on CUDA
    python bench/translate_speed.py --gpu --tiny-check    # the same code path at tiny sizes (CPU smoke run)

Tables (markdown), after a line describing the machine:

1. phenolens translation (`run_translate` into a temporary folder; default fixed-point inversion, and
   `--inversion ddim`) beside a plain per-batch diffusers loop (DDIMInverseScheduler under the source label,
   then DDIMScheduler under the source label (the reconstruction) and under each target; same batches,
   same steps): images/s, UNet forwards per image (counted by wrapping the UNet class's `forward`; a batch
   of B images counts B), and the ratio to the UNet-forward bound, bound / actual time, where bound =
   forwards per image x the bare `unet(x, t, class_labels=...)` time per image at the run's batch sizes
   (called as phenolens calls it, `model.network()`; median of 5 calls after a warm-up one, measured just
   before and just after each run and averaged). 1 would be a run that does nothing but its network
   calls; the issue asks >= 0.9 on the CPU. On the CPU the same ratio is also given in this process's CPU
   time (`time.process_time`), which other processes on a shared machine disturb far less than the wall
   time (with one torch thread it counts our own work only; a busy sibling hyperthread still slows it
   a little): read the wall-clock ratio only on a quiet machine (the load average is printed).
   phenolens' time includes reading the TIFFs, writing its outputs and index.csv and loading the model;
   the loop's starts from images already in memory. Reconstruction
   PSNR: phenolens' is the mean of index.csv's `recon_psnr`; the loop's is computed the same way
   (`psnr_from_mse` of each image's MSE in model space, [-1, 1], then the mean).
2. `render_precision="bf16"` (`model.translate`, default inversion): the targets rendered under bfloat16
   autocast against fp32: mean and max |bf16 - fp32| of the translations, PSNR between the two, and the
   translation PSNR (translation vs source, the change) of each; the reconstruction, rendered in fp32
   either way, must not move.
3. With --gpu: for PhenDiff's `paper` preset at 128 px and a Phen-LDiff model at Stable Diffusion 2 768-v
   size (UNet at 96x96x4 latents, 768 px images), built from their configs with random weights (nothing
   downloaded), `model.translate` of random images: images/s, forwards per image, the bound ratio (for the
   latent model the VAE's encode and decode lie outside the bound) and peak GPU memory
   (`torch.cuda.max_memory_allocated`), for fixed-point inversion with fp32 and bf16 target renders and
   for plain DDIM inversion. --tiny-check runs that path on the CPU with the tiny preset shapes.
Guidance is off (scale 1) throughout, so every row does the same kind of network work.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from translate import demo_like_model, source_images  # noqa: E402  bench/translate.py: the demo model, inputs

from phenolens.measure.image_metrics import psnr_from_mse  # noqa: E402


# ------------------------------------------------------------------------------------------ counting
@dataclass
class Counter:
    """Network forwards: calls, and images (rows of x) per precision ("fp32", or "bf16" under autocast)."""

    calls: int = 0
    rows: dict = field(default_factory=lambda: {"fp32": 0, "bf16": 0})

    def per_image(self, n: int) -> dict:
        return {k: v / n for k, v in self.rows.items()}

    def total_per_image(self, n: int) -> float:
        return sum(self.rows.values()) / n


@contextlib.contextmanager
def counting(net: torch.nn.Module):
    """Count every forward of NET's class while the block runs (the class, not the instance: run_translate
    loads its own copy of the model)."""
    cls = type(net)
    original = cls.forward
    counter = Counter()

    def forward(self, sample, *args, **kwargs):
        counter.calls += 1
        bf16 = torch.is_autocast_enabled(sample.device.type) and \
            torch.get_autocast_dtype(sample.device.type) == torch.bfloat16
        counter.rows["bf16" if bf16 else "fp32"] += int(sample.shape[0])
        return original(self, sample, *args, **kwargs)

    cls.forward = forward
    try:
        yield counter
    finally:
        cls.forward = original


def network_module(model) -> torch.nn.Module:
    """The UNet phenolens calls: PhenDiff's `.unet`, Phen-LDiff's `.model.unet`."""
    return model.unet if hasattr(model, "unet") else model.model.unet


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall time and this process's CPU time of a block (`with Clock(device) as c: ...; c.wall, c.cpu`). Why
    both: on a shared CPU other processes stretch the wall time of whatever runs, while the CPU time with
    one torch thread counts only our own work, so the bound ratio stays meaningful under load. On CUDA only
    the wall time means anything."""

    def __init__(self, device: str):
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Clock":
        sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    """Peak GPU memory since `reset_peak` (GiB); None on the CPU."""
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.device(device).type == "cuda" else None


# ------------------------------------------------------------------------------------ bare forward
Timings = dict  # (batch, precision) -> (wall, cpu) seconds per image of one bare call


class BareForward:
    """Seconds per image of one bare network call, as phenolens makes it (`model.network()`:
    `unet(x, t, **condition)` with t a (B,) long tensor and the model's own condition), at each batch size
    N images are split into (after warm-up, median of REPEATS calls)."""

    def __init__(self, model, code_shape: tuple[int, ...], source: str, n: int, batch_size: int,
                 repeats: int = 5, warmup: int = 1):
        self.model, self.shape, self.source = model, tuple(code_shape), source
        self.n, self.batch_size = n, batch_size
        self.sizes = sorted({min(batch_size, n - i) for i in range(0, n, batch_size)})
        self.repeats, self.warmup = repeats, warmup

    @torch.no_grad()
    def measure(self, precisions=("fp32",)) -> Timings:
        m, dev = self.model, self.model.device
        fn = m.network()
        out: Timings = {}
        for batch in self.sizes:
            x = torch.randn(batch, *self.shape, generator=torch.Generator().manual_seed(0)).to(dev)
            t = torch.full((batch,), 500, dtype=torch.long, device=dev)
            cond = m.condition(None, [self.source] * batch)
            for precision in precisions:
                ctx = (torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16)
                       if precision == "bf16" else contextlib.nullcontext())
                walls, cpus = [], []
                with ctx:
                    for i in range(self.warmup + self.repeats):
                        with Clock(dev) as c:
                            fn(x, t, cond)
                        if i >= self.warmup:
                            walls.append(c.wall)
                            cpus.append(c.cpu)
                out[(batch, precision)] = (statistics.median(walls) / batch, statistics.median(cpus) / batch)
        return out

    @contextlib.contextmanager
    def around(self, precisions=("fp32",)):
        """Measure just before and just after the block and yield the mean of the two (filled in on exit):
        on a machine whose load drifts, the bound of a run is then priced at that run's own time."""
        before = self.measure(precisions)
        timings: Timings = {}
        yield timings
        after = self.measure(precisions)
        timings.update({k: tuple((a + b) / 2 for a, b in zip(before[k], after[k])) for k in before})

    def bound(self, timings: Timings, counter: Counter, clock: str = "wall") -> float:
        """Seconds the counted forwards would take as bare calls: per precision, forwards per image x the
        per-image time at each batch the N images are split into."""
        sizes = [min(self.batch_size, self.n - i) for i in range(0, self.n, self.batch_size)]
        k = 0 if clock == "wall" else 1
        total = 0.0
        for precision, per_image in counter.per_image(self.n).items():
            if per_image:
                total += per_image * sum(b * timings[(b, precision)][k] for b in sizes)
        return total


# ------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    name: str
    clock: Clock
    n: int
    counter: Counter
    bare: BareForward
    timings: Timings
    recon_psnr: float | None = None
    peak_gib: float | None = None

    @property
    def seconds(self) -> float:
        return self.clock.wall

    @property
    def images_per_s(self) -> float:
        return self.n / self.clock.wall

    def bound(self, clock: str = "wall") -> float:
        return self.bare.bound(self.timings, self.counter, clock)

    def ratio(self, clock: str = "wall") -> float:
        return self.bound(clock) / (self.clock.wall if clock == "wall" else self.clock.cpu)


def fmt_forwards(c: Counter, n: int) -> str:
    per = c.per_image(n)
    text = f"{c.total_per_image(n):.1f}"
    return text + (f" ({per['bf16']:.0f} bf16)" if per["bf16"] else "")


def print_table(rows: list[Row], psnr: bool = True, memory: bool = False, cpu: bool = False) -> None:
    """One row per run; CPU adds the CPU-time columns (bound and actual both in this process's CPU time)."""
    head = ["run", "seconds", "images/s", "UNet forwards / image", "bound s", "bound / actual"]
    head += ["CPU s", "bound CPU s", "bound / actual (CPU time)"] if cpu else []
    head += ["recon PSNR dB"] if psnr else []
    head += ["peak GiB"] if memory else []
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r.name, f"{r.seconds:.2f}", f"{r.images_per_s:.3f}", fmt_forwards(r.counter, r.n),
                 f"{r.bound():.2f}", f"{r.ratio():.3f}"]
        if cpu:
            cells += [f"{r.clock.cpu:.2f}", f"{r.bound('cpu'):.2f}", f"{r.ratio('cpu'):.3f}"]
        if psnr:
            cells.append("" if r.recon_psnr is None else f"{r.recon_psnr:.2f}")
        if memory:
            cells.append("n/a (CPU)" if r.peak_gib is None else f"{r.peak_gib:.2f}")
        print("| " + " | ".join(cells) + " |")


def machine_line(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        name = f"{torch.cuda.get_device_name(dev)} (TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, " \
               f"cudnn {torch.backends.cudnn.allow_tf32})"
    else:
        name = "CPU"
    load = ""
    if hasattr(os, "getloadavg"):  # other processes on a shared CPU stretch every wall time below
        load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    return (f"machine: {platform.machine()} {platform.processor() or ''}".rstrip() + load
            + f", {torch.get_num_threads()} torch threads, python {sys.version.split()[0]}, torch {torch.__version__}, "
              f"device {device}: {name}")


# ------------------------------------------------------------------------------------- the runs
def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def phenolens_run(name: str, model_dir: Path, manifest: Path, out: Path, bare: BareForward, targets: list[str], args,
                  device: str, inversion: str) -> Row:
    """`run_translate` into OUT, timed, its forwards counted, its bound priced just before and after it;
    recon PSNR: the mean of index.csv's `recon_psnr` (one per source)."""
    from phenolens.run.translate import TranslateSettings, run_translate

    settings = TranslateSettings(model_dir=str(model_dir), input=str(manifest), targets=targets, steps=args.steps,
                                 batch_size=args.batch_size, inversion=inversion, guidance_scale=1.0)
    with bare.around() as timings:
        reset_peak(device)
        with counting(network_module(bare.model)) as counter, Clock(device) as clock:
            index = run_translate(settings, out, device=device, progress=False)
        peak = peak_gib(device)
    with open(index, newline="") as fh:
        psnr = {r["source_path"]: float(r["recon_psnr"]) for r in csv.DictReader(fh)}
    return Row(name, clock, bare.n, counter, bare, timings, float(np.mean(list(psnr.values()))), peak)


@torch.no_grad()
def diffusers_loop(model, raws: list[np.ndarray], source: str, targets: list[str], steps: int,
                   batch_size: int) -> np.ndarray:
    """The loop one writes by hand with diffusers, per batch: DDIMInverseScheduler under the source label,
    then DDIMScheduler under the source label (the reconstruction) and under each target. Returns each
    image's reconstruction MSE in model space ([-1, 1], clamped as phenolens clamps)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    unet, dev = model.unet, model.device
    inverse = DDIMInverseScheduler.from_config(model.scheduler.config)
    forward = DDIMScheduler.from_config(model.scheduler.config)
    inverse.set_timesteps(steps)
    forward.set_timesteps(steps)
    mse = []
    for part in batches(raws, batch_size):
        x0, frame = model.to_model_space(part)
        x0 = x0.to(dev)
        x = x0
        label = model.labels([source] * len(part))
        for t in inverse.timesteps:
            x = inverse.step(unet(x, t, class_labels=label).sample, t, x).prev_sample
        recon = None
        for condition in [source, *targets]:
            y = x
            label = model.labels([condition] * len(part))
            for t in forward.timesteps:
                y = forward.step(unet(y, t, class_labels=label).sample, t, y).prev_sample
            if condition == source:
                recon = y
        diff = model.crop_back(recon.clamp(-1, 1), frame) - model.crop_back(x0, frame)
        mse.append(diff.pow(2).flatten(1).mean(1).cpu().numpy().astype(np.float64))
    return np.concatenate(mse)


@dataclass
class Direct:
    """What `direct_translate` returns: its row, and the images and errors of the translation."""

    row: Row
    reconstructions: list
    translations: dict
    recon_mse: np.ndarray
    change_mse: dict


def direct_translate(name: str, bare: BareForward, raws: list[np.ndarray], source: str, targets: list[str],
                     inversion, precision: str) -> Direct:
    """`model.translate` batch by batch (BARE's model and batch size), timed, its forwards counted and its
    bound priced just before and after it."""
    model = bare.model
    recons, outs, recon_mse, change = [], {t: [] for t in targets}, [], {t: [] for t in targets}
    with bare.around(("fp32", precision) if precision != "fp32" else ("fp32",)) as timings:
        reset_peak(model.device)
        with counting(network_module(model)) as counter, Clock(model.device) as clock:
            for part in batches(raws, bare.batch_size):
                r = model.translate(part, source, targets, inversion=inversion, guidance_scale=1.0,
                                    render_precision=precision)
                recons += r.reconstructions
                recon_mse.append(r.recon_mse)
                for t in targets:
                    outs[t] += r.translations[t]
                    change[t].append(r.change_mse[t])
        peak = peak_gib(model.device)
    recon_mse = np.concatenate(recon_mse)
    row = Row(name, clock, len(raws), counter, bare, timings, float(np.mean(psnr_from_mse(recon_mse))), peak)
    return Direct(row, recons, outs, recon_mse, {t: np.concatenate(v) for t, v in change.items()})


def model_space(model, images: list[np.ndarray]) -> np.ndarray:
    return np.stack([model.normalizer.to_model(img) for img in images]).astype(np.float64)


def code_shape_of(model, raw: np.ndarray) -> tuple[int, int, int]:
    x, _ = model.to_model_space([raw])
    return model.code_shape(x.shape[1], x.shape[2], x.shape[3])


@torch.no_grad()
def bf16_call_error(model, n: int = 16) -> str:
    """Max and mean |bf16 - fp32| of one UNet call on random codes at a few timesteps (model units)."""
    torch.manual_seed(0)
    x = torch.randn(n, model.info.n_channels, model.info.image_size, model.info.image_size, device=model.device)
    labels = model.labels([model.conditions[0]] * n)
    worst, mean = 0.0, []
    for t in (999, 500, 100, 10):
        steps = torch.full((n,), t, device=model.device)
        a = model.unet(x, steps, class_labels=labels).sample
        with torch.autocast(torch.device(model.device).type, dtype=torch.bfloat16):
            b = model.unet(x, steps, class_labels=labels).sample.float()
        worst, mean = max(worst, float((a - b).abs().max())), mean + [float((a - b).abs().mean())]
    return f"max {worst:.3g}, mean {np.mean(mean):.3g} (t = 999, 500, 100, 10)"


def bf16_table(model, raws, source, targets, args, bare: BareForward) -> None:
    from phenolens.diffusion.inversion import InversionSettings

    inversion = InversionSettings(steps=args.steps)
    runs = {p: direct_translate(f"model.translate, render {p}", bare, raws, source, targets, inversion, p)
            for p in ("fp32", "bf16")}
    n = len(raws)
    print(f"\n### bf16 target renders (`model.translate(..., render_precision=\"bf16\")`, default inversion, "
          f"{args.steps} steps; differences in model units, [-1, 1])\n")
    print("| target | mean abs(bf16 - fp32) | max abs(bf16 - fp32) | PSNR bf16 vs fp32 dB | translation PSNR fp32 dB | "
          "translation PSNR bf16 dB | change dB |")
    print("|---|---|---|---|---|---|---|")
    for t in targets:
        a, b = model_space(model, runs["fp32"].translations[t]), model_space(model, runs["bf16"].translations[t])
        d = np.abs(a - b)
        between = float(np.mean(psnr_from_mse(((a - b) ** 2).reshape(n, -1).mean(1))))
        p32 = float(np.mean(psnr_from_mse(runs["fp32"].change_mse[t])))
        p16 = float(np.mean(psnr_from_mse(runs["bf16"].change_mse[t])))
        print(f"| {t} | {d.mean():.5f} | {d.max():.4f} | {between:.2f} | {p32:.3f} | {p16:.3f} | {p16 - p32:+.3f} |")
    same = all(np.array_equal(x, y) for x, y in zip(runs["fp32"].reconstructions, runs["bf16"].reconstructions))
    r32, r16 = (runs[p].row.recon_psnr for p in ("fp32", "bf16"))
    print(f"\nreconstruction (fp32 in both): PSNR {r32:.2f} dB vs {r16:.2f} dB, bit-identical: {same}")
    if not model.latent:  # a class-label UNet (PhenDiff); a latent model's network takes prompt embeddings
        print(f"one network call under bf16 autocast against fp32 (why the inversion stays fp32): "
              f"{bf16_call_error(model)}")
    print()
    cuda = torch.device(model.device).type == "cuda"
    print_table([r.row for r in runs.values()], psnr=False, memory=cuda, cpu=not cuda)


# ------------------------------------------------------------------------------------ --gpu presets
def random_raws(n: int, channels: int, size: int, seed: int = 3) -> list[np.ndarray]:
    """Smooth random images in [0, 1] (low-resolution noise upsampled), raw units of a [0, 1] normaliser."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, max(size // 8, 2), max(size // 8, 2), generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return [img.numpy().astype(np.float32) for img in x]


def paper_model(device: str, tiny: bool):
    """PhenDiff with the `paper` preset at 128 px (16 px with --tiny-check), 3 channels, 2 conditions."""
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.methods.phendiff import PhenDiff
    from phenolens.models.store import ModelInfo
    from phenolens.models.unet import build_unet

    size = 16 if tiny else 128
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(0)
        unet = build_unet("paper", channels=3, size=size, num_conditions=2)
    info = ModelInfo(conditions=["a", "b"], n_channels=3, image_size=size,
                     normalization={"low": [0.0] * 3, "high": [1.0] * 3}, method="phendiff", preset="paper")
    return PhenDiff(unet, make_scheduler(), info, device=device), size


def sd2_model(device: str, tiny: bool, work: Path):
    """Phen-LDiff at Stable Diffusion 2 768-v size: SD-2's UNet (96x96x4 latents) and VAE from their configs
    with random weights, random 77 x 1024 condition embeddings; with --tiny-check the tiny SD-2-shaped
    pipeline (32 px)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from phenolens.methods.phenldiff import ConditionedUNet, PhenLDiff
    from phenolens.models.latent import build_tiny_base, load_base, sd2_unet_config, sd2_vae_config
    from phenolens.models.store import ModelInfo

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(0)
        if tiny:
            lb = load_base(build_tiny_base(work / "tiny-sd2", prediction_type="v_prediction"),
                           components=("vae", "unet", "scheduler"))
            unet, vae, scheduler, size = lb.unet, lb.vae, lb.scheduler, 32
        else:
            unet = UNet2DConditionModel(**sd2_unet_config("768-v"))
            vae = AutoencoderKL(**sd2_vae_config("768-v"))
            scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                      steps_offset=1, timestep_spacing="leading", prediction_type="v_prediction")
            size = 768
        emb = torch.randn(3, 77, unet.config.cross_attention_dim) * 0.5
    info = ModelInfo(conditions=["a", "b"], n_channels=3, image_size=size,
                     normalization={"low": [0.0] * 3, "high": [1.0] * 3}, method="phenldiff",
                     preset="sd2-768-v" if not tiny else "tiny-sd2", base="random weights",
                     prediction_type="v_prediction")
    return PhenLDiff(ConditionedUNet(unet, emb), vae, scheduler, info, device=device), size


def gpu_presets(args, device: str) -> None:
    from phenolens.diffusion.inversion import InversionSettings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # "Writing model shards" of the tiny pipeline's text encoder
    tiny = args.tiny_check
    # --tiny-check proves the path runs: 2 images, 4 steps at most (the paper preset is 65M parameters even at 16 px)
    n = min(args.gpu_n, 2) if tiny else args.gpu_n
    steps = min(args.steps, 4) if tiny else args.steps
    batch = min(args.batch_size, n)
    cuda = torch.device(device).type == "cuda"
    print(f"\n## presets on {device}{' (--tiny-check: tiny sizes)' if tiny else ''}: {n} random images, batch {batch}, "
          f"{steps} steps, 1 target, guidance off\n")
    with tempfile.TemporaryDirectory() as tmpdir:
        for label, build in (("PhenDiff", lambda: paper_model(device, tiny)),
                             ("Phen-LDiff", lambda: sd2_model(device, tiny, Path(tmpdir)))):
            if cuda:
                torch.cuda.empty_cache()
            model, size = build()
            raws = random_raws(n, model.info.n_channels, size)
            shape = code_shape_of(model, raws[0])
            bare = BareForward(model, shape, "a", n, batch)
            bare.measure(("fp32", "bf16"))  # warm-up: first calls at a shape pay one-time costs
            rows = []
            for name, inversion, precision in (("fixed-point, render fp32", InversionSettings(steps=steps), "fp32"),
                                               ("fixed-point, render bf16", InversionSettings(steps=steps), "bf16"),
                                               ("ddim, render fp32", InversionSettings(method="ddim", steps=steps),
                                                "fp32")):
                title = f"{label} ({model.info.preset}) {size} px ({'x'.join(map(str, shape))} code): {name}"
                rows.append(direct_translate(title, bare, raws, "a", ["b"], inversion, precision).row)
            print_table(rows, memory=True, cpu=not cuda)
            print()
            del model
    if not cuda:
        print("(--tiny-check on the CPU: the numbers prove the path runs, not the GPU's speed)")


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", type=Path, default=None,
                    help="a PhenDiff model dir (default: the shipped demo model, or a random tiny one of its shape)")
    ap.add_argument("--data", type=Path, default=None,
                    help="a folder of TIFFs of the model's first condition (default: simulated cells of the demo's "
                         "shape)")
    ap.add_argument("--n", type=int, default=32, help="source images (default 32)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    ap.add_argument("--targets", type=int, default=1, help="target conditions per image (default 1)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda with --gpu, else cpu")
    ap.add_argument("--gpu", action="store_true",
                    help="the paper preset at 128 px and Phen-LDiff at SD-2 768-v size on CUDA (instead of the "
                         "--model tables)")
    ap.add_argument("--gpu-n", type=int, default=8, help="images per --gpu preset (default 8)")
    ap.add_argument("--tiny-check", action="store_true",
                    help="with --gpu: the same code path at tiny sizes (16 and 32 px, at most 2 images and 4 steps), "
                         "runnable on the CPU")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 table")
    args = ap.parse_args(argv)
    for name in ("n", "steps", "batch_size", "targets", "gpu_n"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.tiny_check and not args.gpu:
        ap.error("--tiny-check goes with --gpu")

    device = args.device or ("cuda" if args.gpu and not args.tiny_check else "cpu")
    if args.gpu and not args.tiny_check and (device != "cuda" or not torch.cuda.is_available()):
        why = "torch sees no CUDA device" if not torch.cuda.is_available() else f"--device {device}"
        raise SystemExit(f"bench/translate_speed.py: --gpu times the paper preset at 128 px and an SD-2-size latent "
                         f"model, which needs a CUDA GPU ({why}); add --tiny-check to run the same code path at tiny "
                         "sizes on the CPU")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/translate_speed.py: --device cuda, but torch sees no CUDA device")

    print(machine_line(device))
    if args.gpu:
        gpu_presets(args, device)
        return 0

    from phenolens.data.io import read_image
    from phenolens.methods.phendiff import PhenDiff
    from phenolens.methods.registry import load_model_for

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model_dir = args.model or demo_like_model(tmp)
        model = load_model_for(model_dir, device=device)
        if not isinstance(model, PhenDiff):
            raise SystemExit(f"bench/translate_speed.py: {model_dir} is a {model.info.method} model; the diffusers "
                             "loop it is compared with is class-conditional: give a PhenDiff model")
        info = model.info
        if len(info.conditions) < 1 + args.targets:
            raise SystemExit(f"{model_dir}: {len(info.conditions)} conditions, --targets {args.targets} needs "
                             f"{1 + args.targets}")
        source, targets = info.conditions[0], info.conditions[1:1 + args.targets]
        paths, manifest = source_images(args.data, args.n, tmp, source, info.image_size)
        raws = [read_image(p, channels=info.channels)[0] for p in paths]
        n = len(raws)
        print(f"model: {model_dir} ({info.method}, {info.preset} preset, {info.prediction_type}); {n} images of "
              f"{raws[0].shape[1]}x{raws[0].shape[2]} px, {raws[0].shape[0]} channels; {source} -> "
              f"{', '.join(targets)}; {args.steps} steps; batch {args.batch_size}; guidance off")

        bare = BareForward(model, code_shape_of(model, raws[0]), source, n, args.batch_size)
        bare.measure(("fp32", "bf16"))  # warm-up: first calls at a shape pay one-time costs
        rows: list[Row] = []
        for i, (name, inversion) in enumerate((("phenolens translate (default fixed-point)", "fixed-point"),
                                               ("phenolens translate --inversion ddim", "ddim"))):
            rows.append(phenolens_run(name, model_dir, manifest, tmp / f"run-{i}", bare, targets, args, device,
                                      inversion))
        with bare.around() as timings:
            reset_peak(device)
            with counting(network_module(model)) as counter, Clock(device) as clock:
                mse = diffusers_loop(model, raws, source, targets, args.steps, args.batch_size)
            peak = peak_gib(device)
        rows.append(Row("plain per-batch diffusers loop (DDIMInverseScheduler + DDIMScheduler)", clock, n, counter,
                        bare, timings, float(np.mean(psnr_from_mse(mse))), peak))
        cuda = torch.device(device).type == "cuda"
        print("bare UNet forward per image (median, as measured around the last run): " + ", ".join(
            f"batch {b}: {timings[(b, 'fp32')][0] * 1e3:.2f} ms wall"
            + ("" if cuda else f", {timings[(b, 'fp32')][1] * 1e3:.2f} ms CPU") for b in bare.sizes) + "\n")
        print_table(rows, memory=cuda, cpu=not cuda)
        if not args.no_bf16:
            bf16_table(model, raws, source, targets, args, bare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
