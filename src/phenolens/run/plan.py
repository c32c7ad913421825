"""What a `phenolens translate` run will cost, before it runs (`translate --dry-run`).

`plan_translate` reads what the run would read (the model, the list of inputs, the image headers and
one batch of real images), writes nothing and takes no OUT: it counts the UNet forwards the run
makes and times the UNet on this machine.

Two units are counted, because a batched network call is what costs time and an image's passes are
what the run records (index.csv's `inversion_forwards`):

- **image-forwards**: one image through the UNet once. Classifier-free guidance puts the conditional
  and the unconditional pass of every image into *one* call of twice the rows
  (`diffusion.ddim.render`, `diffusion.conditions.guidance_aware`), so a guided step counts 2 per
  image, exactly as `Translation.inversion_forwards` / `render_forwards` count it.
- **UNet calls**: batched invocations of the network, each with its real number of rows (a batch's
  images, twice that when guided, fewer where a target equals some images' own condition and is not
  rendered for them, fewer again where fixed-point inversion has stopped iterating some images).

Per batch of n images (S = steps - skip, g = 2 for guided inversion, i.e. a DIFFusion / Kandinsky model
with guidance != 1, else 1; G = 2 when guidance != 1, else 1):

- inversion, ``--inversion ddim`` and ``ef-ddpm``: S calls of n·g rows; exact.
- inversion, ``fixed-point``: per step one plain DDIM call (the first step only with the warm start)
  plus at most ``inversion_iters`` solver calls, each over the images not yet converged. With
  ``inversion_tol 0`` every image runs every iteration and the count is exact. Otherwise, with
  ``calibrate=True``, the first real batch is inverted once here and its measured forwards per image
  (and its calls) stand for every batch: an *estimate* (other images may converge faster or slower).
  With ``calibrate=False`` the count is the *upper bound* (every image iterates ``inversion_iters``
  times at every step). `TranslatePlan.inversion_basis` says which.
- reconstruction: S calls of n·g rows.
- each target: S calls of c·G rows, c the images of the batch whose condition the target changes
  (none when c = 0: an image's own condition is its reconstruction, not rendered twice).

Time: the UNet is timed on this device at the run's real input shape (the first batch's images, padded
as the run pads them, encoded to latents for a latent model) with the batch's real condition tensors:
after warm-up, the median of `repeats` calls at the row count the plan uses most often and at its
fewest and most rows per call; a call of another row count is interpolated linearly between them, and a batch of another
image shape is scaled by the pixels the network sees (padded) relative to the timed batch. The estimate is
the sum over the planned calls. With ``world_size`` N the inputs are shared as a launched run shares them
(`phenolens.run.shards.Shard.share`: chunks of one batch, chunk k to process k mod N, each process
batching its share by shape on its own device like this one) and the estimate is the slowest
process's time.

Not counted (the plan says so): reading and writing images, the input check, model loading, a latent
model's VAE encode / decode (their number of calls is given), the semantic / image encoder of DiffEx,
DIFFusion and Kandinsky (one pass per batch and per edited target), DIFFusion's class means (``--mean-images`` per
condition through the encoder), and the time of the fixed-point calibration itself. Resuming is
ignored: the plan is for every input, as if OUT were empty. ``--minimal-edit`` is not planned.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from phenolens.data.io import read_image
from phenolens.data.records import ImageRecord, discover
from phenolens.errors import PhenolensError

DEFAULT_REPEATS = 3


@dataclass
class TranslatePlan:
    """What a translate run will do and about how long it takes (see the module docstring for what is
    counted). Forwards are image-forwards (one image through the UNet once; a guided pass counts 2),
    calls are batched UNet invocations."""

    images: int
    targets: list[str]
    batches: int
    batch_size: int
    steps_rendered: int  # steps - skip: network steps of each rendering
    inversion: str
    inversion_forwards_per_image: float  # mean over the images (guided inversion counts 2 per step)
    inversion_basis: str  # "exact", "calibrated" (measured on one batch) or "upper bound"
    render_forwards_per_image: float  # mean over the images: reconstruction plus every target it changes
    forwards_total: int  # image-forwards of the whole run (rounded where the inversion is estimated)
    unet_calls: int  # batched UNet invocations of the whole run (estimated like the forwards)
    guidance_scale: float
    guided_inversion: bool  # inversion and reconstruction run guided (DIFFusion, Kandinsky with guidance)
    seconds_per_forward: float  # median seconds of one UNet call of `forward_rows` rows on DEVICE
    forward_rows: int  # the row count the run uses most
    timings: dict[int, float]  # rows -> median seconds of one UNet call, as measured
    estimated_seconds: float  # the UNet's time of the slowest process
    world_size: int
    device: str
    shapes: dict[tuple[int, int], int] = field(default_factory=dict)  # (h, w) of the inputs -> images
    calibration: dict | None = None  # fixed-point: what one real batch's inversion measured
    vae_calls: int = 0  # a latent model's encode + decode calls (batched), not timed
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # left out (skip_bad)
    not_counted: list[str] = field(default_factory=list)

    @property
    def forwards_per_image(self) -> float:
        return self.inversion_forwards_per_image + self.render_forwards_per_image


# ------------------------------------------------------------------------------- the batches
def _squeezed(shape: tuple[int, ...], axes: str) -> tuple[tuple[int, ...], str]:
    if len(axes) != len(shape):
        axes = "?" * (len(shape) - 2) + "YX"
    keep = [i for i, (a, n) in enumerate(zip(axes, shape)) if n != 1 or a in "YX"]
    return tuple(shape[i] for i in keep), "".join(axes[i] for i in keep)


def image_size(path: Path, channels=None) -> tuple[int, int]:
    """(h, w) of an image from its header (as `read_image` lays it out); the whole file only when the
    header does not say. Why: the run batches images by shape, and reading every pixel of a large input
    to plan it would take as long as a good part of the run."""
    from phenolens.data.io import _tiff_axes

    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = list(tif.series)
                if len(series) > 1 and all(len(s.shape) == 2 for s in series) \
                        and len({(tuple(s.shape), s.dtype) for s in series}) == 1:
                    return tuple(int(n) for n in series[0].shape)
                shape, letters = _squeezed(tuple(int(n) for n in series[0].shape), str(series[0].axes or ""))
                axes = _tiff_axes(letters, shape)
                return shape[:2] if axes in ("YX", "YXC") else shape[1:]
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as img:
                return int(img.size[1]), int(img.size[0])
    except Exception:  # noqa: BLE001 - any doubt: read it the way the run will
        pass
    return tuple(read_image(path, channels=channels)[0].shape[1:])


def batches_of(sized: list[tuple[ImageRecord, tuple[int, int]]], batch_size: int) -> list[list[ImageRecord]]:
    """The batches `translate.batches_by_shape` makes of these records (same order, same grouping)."""
    pending: dict[tuple, list[ImageRecord]] = {}
    out = []
    for rec, shape in sized:
        group = pending.setdefault(shape, [])
        group.append(rec)
        if len(group) == batch_size:
            out.append(group)
            pending[shape] = []
    out.extend(g for g in pending.values() if g)
    return out


# ------------------------------------------------------------------------------- the counts
@dataclass
class _BatchCost:
    calls: Counter  # rows -> UNet calls
    forwards: np.ndarray  # image-forwards per image (float: fixed-point may be estimated)
    inversion: np.ndarray
    vae_calls: int = 0
    area: float = 1.0  # the network's pixels per image relative to the timed batch's


def _plain_calls(model, settings) -> int:
    """Fixed-point: the steps that start from a plain DDIM call (the first; every one without warm start;
    a step ending at ᾱ_t = 0)."""
    from phenolens.diffusion.ddim import inversion_schedule

    schedule = inversion_schedule(model.scheduler, settings.steps, settings.skip)
    return sum(1 for k, (_, a_t, _) in enumerate(schedule) if k == 0 or not settings.warm_start or a_t <= 0.0)


def _counting(fn: Callable, log: list[int]) -> Callable:
    def wrapped(x, t, condition):
        log.append(int(x.shape[0]))
        return fn(x, t, condition)

    return wrapped


@contextlib.contextmanager
def _counted_network(model, log: list[int]):
    """MODEL's network, every call's rows appended to LOG (an attribute of this instance only)."""
    original = model.network
    model.network = lambda: _counting(original(), log)
    try:
        yield
    finally:
        del model.network


def network_area(model, shape: tuple[int, int]) -> int:
    """Pixels per image the networks see for an input of SHAPE (h, w): resized as the model was trained
    (`model_scale`), padded to its `spatial_factor`, as `CounterfactualModel.to_model_space` does."""
    h, w = model.model_scale(*shape)
    f = model.spatial_factor()
    return (-(-h // f) * f) * (-(-w // f) * f)


def _read_batch(model, batch: list[ImageRecord], skip_bad: bool):
    raws, kept = [], []
    for rec in batch:
        try:
            raws.append(read_image(rec.path, channels=model.info.channels)[0])
            kept.append(rec)
        except PhenolensError:
            if not skip_bad:
                raise
    if not raws:
        raise PhenolensError(f"{batch[0].path}: the first batch of the run has no readable image to time the UNet on")
    batch = kept
    shapes = {r.shape for r in raws}
    if len(shapes) != 1:  # the header said otherwise: keep the first shape's images
        first = raws[0].shape
        keep = [i for i, r in enumerate(raws) if r.shape == first]
        raws, batch = [raws[i] for i in keep], [batch[i] for i in keep]
    if raws[0].shape[0] != model.info.n_channels:
        raise PhenolensError(f"{batch[0].path}: has {raws[0].shape[0]} channels, the model expects "
                             f"{model.info.n_channels}")
    return raws, [rec.condition for rec in batch]


def _calibrate(model, raws, sources, settings, guidance: float) -> dict:
    """Invert one real batch as the run does; what it spent (forwards per image, the calls' rows)."""
    log: list[int] = []
    start = time.perf_counter()
    with torch.no_grad(), model.inference(), _counted_network(model, log):
        x0, _ = model.to_model_space(raws)
        x0 = x0.to(model.device)
        z0 = model.encode(x0)
        cond = model.condition(x0, sources)
        own, _ = model.guided(cond, guidance)
        code = model.invert(z0, own, settings.inversion_settings())
    _sync(model.device)
    g = 2 if model.guide_inversion and guidance != 1.0 else 1
    per_image = code.forwards.cpu().numpy().astype(np.float64) * g
    return dict(images=len(raws), forwards_per_image=float(per_image.mean()), min=int(per_image.min()),
                max=int(per_image.max()), calls=list(log), seconds=time.perf_counter() - start)


def _batch_cost(model, sources: list[str], identity: Callable[[str, str], bool], targets: list[str],
                settings, guidance: float, calibration: dict | None, area: float = 1.0) -> _BatchCost:
    n = len(sources)
    S = settings.steps - settings.skip
    g = 2 if model.guide_inversion and guidance != 1.0 else 1
    G = 2 if guidance != 1.0 else 1
    calls: Counter = Counter()
    # inversion
    if settings.inversion in ("ddim", "ef-ddpm"):
        inv = np.full(n, S * g, dtype=np.float64)
        calls[n * g] += S
    elif calibration is not None:
        inv = np.full(n, calibration["forwards_per_image"])
        for rows in calibration["calls"]:
            calls[max(1, round(rows * n / calibration["images"]))] += 1
    else:  # exact when tol = 0, else the upper bound
        per = _plain_calls(model, settings) + S * settings.inversion_iters
        inv = np.full(n, per * g, dtype=np.float64)
        calls[n * g] += per
    # the reconstruction, then every target where it changes an image
    render = np.full(n, S * g, dtype=np.float64)
    calls[n * g] += S
    vae = (2 if model.latent else 0)  # encode, decode of the reconstruction (+ the VAE's own round trip below)
    for target in targets:
        changed = [i for i, s in enumerate(sources) if not identity(target, s)]
        if changed:
            calls[len(changed) * G] += S
            render[changed] += S * G
            vae += 1 if model.latent else 0
    if model.latent:
        vae += 1  # the autoencoder_mse decode of z0
    return _BatchCost(calls, inv + render, inv, vae, area)


def _identity_test(model, targets: list[str], settings) -> Callable[[str, str], bool]:
    """(target, source) -> True when the run leaves that image as it is for that target (its reconstruction)."""
    from phenolens.methods.diffusion_embedding import ClassMeans, EmbeddingArithmetic

    if isinstance(model, EmbeddingArithmetic):  # the edits need class means only to render; none are computed here
        model.use_class_means(ClassMeans({}, {}), settings.omega)
    edits = {t: model.as_edit(t) for t in targets}
    return lambda target, source: edits[target].is_identity(source)


# ----------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(torch.device(device))


def _time_unet(model, raws, sources, rows_list: list[int], repeats: int) -> dict[int, float]:
    """Median seconds of one UNet call at each row count, with the batch's real shape and condition."""
    from phenolens.diffusion.conditions import take
    from phenolens.diffusion.ddim import sampling_schedule

    schedule = sampling_schedule(model.scheduler, 50)
    t_mid = schedule[len(schedule) // 2][0]
    out: dict[int, float] = {}
    with torch.no_grad(), model.inference():
        x0, _ = model.to_model_space(raws)
        x0 = x0.to(model.device)
        z0 = model.encode(x0)
        cond = model.condition(x0, sources)
        net = model.network()
        n = z0.shape[0]
        gen = torch.Generator().manual_seed(0)
        for k, rows in enumerate(sorted(set(rows_list), reverse=True)):
            idx = [i % n for i in range(rows)]
            x = torch.randn((rows, *z0.shape[1:]), generator=gen).to(model.device, z0.dtype)
            t = torch.full((rows,), t_mid, dtype=torch.long, device=model.device)
            c = take(cond, idx)
            for _ in range(2 if k == 0 else 1):  # warm-up (the first shape also pays for allocation / autotuning)
                net(x, t, c)
            _sync(model.device)
            times = []
            for _ in range(max(1, repeats)):
                start = time.perf_counter()
                net(x, t, c)
                _sync(model.device)
                times.append(time.perf_counter() - start)
            out[rows] = statistics.median(times)
    return out


def _seconds(timings: dict[int, float], rows: int) -> float:
    xs = sorted(timings)
    if len(xs) == 1:
        return timings[xs[0]] * rows / xs[0]
    return float(np.interp(rows, xs, [timings[x] for x in xs]))


# -------------------------------------------------------------------------------------- plan
def plan_translate(settings, *, device: str | None = None, calibrate: bool = True, world_size: int = 1,
                   skip_bad: bool = False, repeats: int = DEFAULT_REPEATS,
                   timings: dict[int, float] | None = None) -> TranslatePlan:
    """The plan of `run_translate(settings, OUT)` over every input (OUT empty): counts, timing, estimate.

    SETTINGS is a `phenolens.run.translate.TranslateSettings`. DEVICE is where the UNet is timed (the run's
    device; default as the run picks it). CALIBRATE: fixed-point inversion with a tolerance is measured
    on the first real batch (an estimate); without it, its count is the upper bound. WORLD_SIZE: the
    number of processes (one device each) the run is launched on. SKIP_BAD: unreadable inputs are left
    out (listed in `unreadable`) instead of refused. REPEATS: timed calls per row count (their median).
    TIMINGS (rows -> seconds per UNet call, e.g. an earlier plan's `timings`): use these instead of
    timing the UNet again. Nothing is written anywhere.
    """
    from phenolens.methods.registry import load_model_for
    from phenolens.run.naming import unique_targets
    from phenolens.run.shards import Shard
    from phenolens.run.translate import _unique_records, check_guidance, check_settings, default_guidance

    if world_size < 1:
        raise PhenolensError(f"world size must be at least 1, got {world_size}")
    if settings.minimal_edit:
        raise PhenolensError("--dry-run does not plan --minimal-edit (its judges and T_skip sweep are not counted); "
                             "plan the run without it")
    if settings.batch_size < 1:
        raise PhenolensError(f"--batch-size must be at least 1, got {settings.batch_size}")
    check_settings(settings)
    model = load_model_for(settings.model_dir, device=device)
    records = discover(settings.input, condition=settings.source)
    for rec in records:
        model.info.condition_index(rec.condition, "--from" if settings.source else f"source condition of {rec.path}")
    if settings.targets:
        settings = replace(settings, targets=unique_targets(settings.targets))
    targets = list(settings.targets or model.conditions)
    for t in targets:
        model.info.condition_index(t, "--to")
    if settings.guidance_scale is None:
        settings = replace(settings, guidance_scale=default_guidance(settings.inversion, model.info))
    check_guidance(settings, model.info)
    guidance = float(settings.guidance_scale)
    records = _unique_records(records)
    identity = _identity_test(model, targets, settings)

    sized, unreadable = [], []
    for rec in records:
        try:
            sized.append((rec, image_size(Path(rec.path), model.info.channels)))
        except (PhenolensError, OSError) as err:
            if not skip_bad:
                raise
            unreadable.append((Path(rec.path), str(err)))
    if not sized:
        raise PhenolensError(f"{settings.input}: no images to translate")
    shape_of = {id(rec): shape for rec, shape in sized}
    shapes = Counter(shape for _, shape in sized)

    # the first batch of the run: its real images give the shape, the condition and the calibration
    first = batches_of(sized, settings.batch_size)[0]
    raws, sources = _read_batch(model, first, skip_bad)
    timed_area = network_area(model, tuple(raws[0].shape[1:]))
    tol_free = settings.inversion == "fixed-point" and settings.inversion_tol == 0
    calibration = None
    if settings.inversion == "fixed-point" and calibrate and not tol_free and settings.inversion_iters > 0:
        calibration = _calibrate(model, raws, sources, settings, guidance)
    basis = ("exact" if settings.inversion != "fixed-point" or tol_free or settings.inversion_iters == 0
             else "calibrated" if calibration else "upper bound")

    per_rank = []  # each process's batch costs
    for rank in range(world_size):
        mine = Shard(rank=rank, world=world_size).share([r for r, _ in sized], settings.batch_size)
        batches = batches_of([(r, shape_of[id(r)]) for r in mine], settings.batch_size)
        per_rank.append([_batch_cost(model, [r.condition for r in b], identity, targets, settings, guidance,
                                     calibration, network_area(model, shape_of[id(b[0])]) / timed_area)
                         for b in batches])
    costs = [c for rank in per_rank for c in rank]
    calls = sum((c.calls for c in costs), Counter())
    forwards = np.concatenate([c.forwards for c in costs])
    inversion = np.concatenate([c.inversion for c in costs])

    main_rows = max(calls, key=lambda r: (calls[r], r))
    measured = {main_rows, min(calls), max(calls)}
    if timings is None:
        timings = _time_unet(model, raws, sources, sorted(measured), repeats)
    else:
        timings = {int(r): float(t) for r, t in timings.items()}
        main_rows = min(timings, key=lambda r: (abs(r - main_rows), -r))
    rank_seconds = [sum(c.area * k * _seconds(timings, rows) for c in rank for rows, k in c.calls.items())
                    for rank in per_rank]

    not_counted = ["reading and writing images, the input check, loading the model"]
    if model.latent:
        not_counted.append("the VAE's encode / decode (counted as calls only, not timed)")
    if type(model).__name__ in ("DiffEx", "DIFFusion", "Kandinsky"):
        not_counted.append("the semantic / image encoder (one pass per batch and per edited target)")
    from phenolens.methods.diffusion_embedding import EmbeddingArithmetic

    if isinstance(model, EmbeddingArithmetic):
        not_counted.append("the class means (--mean-images images per condition through the encoder)")
    if settings.render_precision != "fp32":
        not_counted.append(f"the gain of {settings.render_precision} target renders (timed in fp32: the estimate "
                           "is high)")
    if calibration:
        not_counted.append(f"the calibration itself ({calibration['seconds']:.1f} s here)")
    return TranslatePlan(
        images=len(sized), targets=targets, batches=len(costs), batch_size=settings.batch_size,
        steps_rendered=settings.steps - settings.skip, inversion=settings.inversion,
        inversion_forwards_per_image=float(inversion.mean()), inversion_basis=basis,
        render_forwards_per_image=float((forwards - inversion).mean()), forwards_total=int(round(forwards.sum())),
        unet_calls=int(sum(calls.values())), guidance_scale=guidance,
        guided_inversion=bool(model.guide_inversion and guidance != 1.0),
        seconds_per_forward=_seconds(timings, main_rows), forward_rows=int(main_rows), timings=timings,
        estimated_seconds=max(rank_seconds), world_size=world_size, device=str(model.device),
        shapes=dict(shapes), calibration=calibration, vae_calls=sum(c.vae_calls for c in costs),
        unreadable=unreadable, not_counted=not_counted)


# ------------------------------------------------------------------------------------ format
def format_duration(seconds: float) -> str:
    """3 h 04 min, 12 min 05 s, 7.4 s."""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds >= 0.1 else f"{seconds:.2g} s"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s"


def _number(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def format_plan(plan: TranslatePlan) -> str:
    """A few plain lines for the user of `translate --dry-run`."""
    shapes = ", ".join(f"{h}×{w} ({n})" for (h, w), n in sorted(plan.shapes.items(), key=lambda kv: -kv[1]))
    lines = [f"{plan.images} image(s) [{shapes}] to {len(plan.targets)} target(s) ({', '.join(plan.targets)}), "
             f"{plan.batches} batch(es) of up to {plan.batch_size}"]
    if plan.unreadable:
        lines.append(f"{len(plan.unreadable)} unreadable file(s) left out (--skip-bad)")
    inv = f"inversion ({plan.inversion}): {_number(plan.inversion_forwards_per_image)} UNet forwards per image"
    if plan.inversion_basis == "calibrated":
        c = plan.calibration
        inv += (f", as measured on {c['images']} real image(s) (min {c['min']}, max {c['max']}; "
                f"{c['forwards_per_image'] / plan.steps_rendered:.2f} per step)")
    elif plan.inversion_basis == "upper bound":
        inv += " at most (upper bound; fewer when images converge early)"
    lines.append(inv)
    guided = ""
    if plan.guidance_scale != 1:
        guided = (f", guidance {plan.guidance_scale:g} (conditional + unconditional in one call of twice the rows"
                  + ("; inversion and reconstruction guided too)" if plan.guided_inversion else ")"))
    lines.append(f"rendering: {plan.steps_rendered} steps for the reconstruction and each target that changes an "
                 f"image{guided}: {_number(plan.render_forwards_per_image)} UNet forwards per image")
    approx = "" if plan.inversion_basis == "exact" else "about "
    lines.append(f"UNet forwards: {_number(plan.forwards_per_image)} per image, {approx}{plan.forwards_total:,} in all, "
                 f"in {approx}{plan.unet_calls:,} batched calls")
    others = ", ".join(f"{r} row(s) {t * 1e3:.3g} ms" for r, t in sorted(plan.timings.items()) if r != plan.forward_rows)
    lines.append(f"measured on {plan.device}: {plan.seconds_per_forward * 1e3:.3g} ms per UNet call of "
                 f"{plan.forward_rows} row(s)" + (f" ({others})" if others else ""))
    on = f" on {plan.world_size} processes" if plan.world_size > 1 else ""
    lines.append(f"estimated time: {format_duration(plan.estimated_seconds)} of UNet time{on}")
    if plan.vae_calls:
        lines.append(f"VAE: {plan.vae_calls:,} encode/decode calls, not in the estimate")
    if plan.not_counted:
        lines.append("not counted: " + "; ".join(plan.not_counted))
    return "\n".join(lines)


__all__ = ["TranslatePlan", "plan_translate", "format_plan", "format_duration"]
