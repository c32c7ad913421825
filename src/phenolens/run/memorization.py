"""`phenolens memorization`: does a model reproduce its training images, or the distribution they come from?

Following Phen-LDiff §4.2 / Fig. 4 (after Kadkhodaie et al. 2024): split the data into two disjoint
halves of the same size, train one model on each with identical settings, and generate from both with
the *same* initial noises (deterministic DDIM, η = 0, same condition). The scores (generalisation:
the two models' images from one noise; memorisation: each image against its model's own training
half; the unseen-real reference) are `phenolens.measure.memorization`'s; this module runs the
experiment around them: split, train or take the models, generate, score, write.

Both models' images are compared in model A's scale (model B's generation is mapped to raw units with
B's normalisation and back with A's), so a model compared with itself scores exactly 1. A generation
is counted as *memorised* when its nearest similarity exceeds `threshold` (default 0.9).

`augment=False` (`--no-augment`) trains the two models without the trainer's flips/rotations, so that a
small half is learnt image by image rather than as 8 views of each (bench/memorization.py: it raises a
tiny model's memorisation of 10 images, but within a CPU budget not to copying). The nearest-image
search still runs over all 8 transforms then (see the scores' module). (In the bench, 30 of 64
generations of the 10-image models matched upright, against 3 of 64 for the 500-image models, 8 by
chance.)

Writes into OUT: half_a.csv, half_b.csv, model_a/ and model_b/ (when trained here), memorization.csv,
memorization.json, histograms.png and pairs.png.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from phenolens.atomic import write_bytes_atomic, write_csv_atomic, write_json_atomic
from phenolens.data.records import ImageRecord, conditions_in_order, discover, natural_key
from phenolens.errors import PhenolensError
from phenolens.measure.memorization import (TRANSFORMS, describe, nearest_training, paired_cosine,
                                            real_unseen_baseline, undo_dihedral)
from phenolens.train.trainer import step_seed

logger = logging.getLogger(__name__)

CSV_FIELDS = ["model", "condition", "seed", "generalization_cosine", "memorization_cosine",
              "nearest_training_image", "nearest_training_condition", "nearest_transform"]


@dataclass
class MemorizationSettings:
    """What the check was run with; saved in memorization.json so a result can be traced."""

    preset: str = "tiny"
    size: int = 32
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-4
    warmup_steps: int = 100
    n_per_condition: int = 16
    sample_steps: int = 50
    seed: int = 0
    threshold: float = 0.9
    gen_batch_size: int = 16
    augment: bool = True  # the trainer's flips/rotations (models trained here)
    # fine-tune a pretrained latent model per half (Phen-LDiff) instead of training PhenDiff from scratch
    base: str | None = None
    mode: str = "lora"
    rank: int = 4
    channels: list[int] | None = None


# ------------------------------------------------------------------------------------ splitting
def split_halves(records: Sequence[ImageRecord], seed: int = 0) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Two disjoint halves of equal size per condition, drawn at random but reproducibly from SEED.

    Equal sizes (an odd image out is left unused), as in the paper: two samples of the same size from
    one distribution. The draw depends on the set of files and the seed, not on their listing order.
    """
    unique: dict[Path, ImageRecord] = {}
    for rec in records:
        key = Path(rec.path).resolve()
        if key in unique and unique[key].condition != rec.condition:
            raise PhenolensError(f"{rec.path}: listed under two conditions ({unique[key].condition}, {rec.condition})")
        unique.setdefault(key, rec)
    by_cond: dict[str, list[ImageRecord]] = {}
    for rec in unique.values():
        by_cond.setdefault(rec.condition, []).append(rec)
    half_a: list[ImageRecord] = []
    half_b: list[ImageRecord] = []
    for cond in conditions_in_order(unique.values()):
        recs = sorted(by_cond[cond], key=lambda r: natural_key(str(Path(r.path).resolve())))
        if len(recs) < 2:
            raise PhenolensError(f"condition '{cond}' has {len(recs)} image(s); the memorisation check needs at "
                                 "least 2 per condition, so that each half gets one")
        order = np.random.default_rng(step_seed("memorization-split", int(seed), cond)).permutation(len(recs))
        k = len(recs) // 2
        half_a += [recs[i] for i in order[:k]]
        half_b += [recs[i] for i in order[k:2 * k]]
    return half_a, half_b


def write_manifest(path: Path, records: Sequence[ImageRecord]) -> None:
    """path,condition with absolute paths, which `discover` / `phenolens train` read from anywhere."""
    write_csv_atomic(path, [dict(path=str(Path(r.path).resolve()), condition=r.condition) for r in records],
                     ["path", "condition"])


# ----------------------------------------------------------------------------------- generation
def noise_seed(seed: int, cond_index: int, i: int, n_per_condition: int) -> int:
    """The seed of generation i of condition cond_index: unique per generation, shared by both models."""
    return int(seed) * 1_000_003 + cond_index * int(n_per_condition) + i


@torch.no_grad()
def generate(model, conditions: Sequence[str], seeds: Sequence[int], steps: int = 50, batch_size: int = 16,
             progress: bool = False, desc: str = "generate") -> torch.Tensor:
    """Deterministic DDIM (η = 0) images in [-1, 1], one per (condition, seed), noise from the seed alone.

    Works for any method: the noise has the shape of the model's diffusion space (pixels, or VAE
    latents for a latent model), and `model.generate` decodes it to images.
    """
    info = model.info
    shape = model.code_shape(info.n_channels, info.image_size, info.image_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(sd))) for sd in seeds])
    out = []
    starts = range(0, len(seeds), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    for j in starts:
        x = model.generate(noise[j:j + batch_size].to(model.device), list(conditions[j:j + batch_size]), steps=steps)
        out.append(x.float().cpu())
    return torch.cat(out)


# -------------------------------------------------------------------------------------- training
def _train_or_reuse(manifest: Path, model_dir: Path, settings: MemorizationSettings, progress: bool) -> str:
    """Train a model on MANIFEST into MODEL_DIR, reuse a finished one, or resume an interrupted one.

    With `settings.base`, the model is fine-tuned from that pretrained latent pipeline (`phenolens
    finetune`, `settings.mode`), so full / attention / LoRA / SVDiff can be compared as in Phen-LDiff Fig. 4.
    """
    from phenolens.methods.phendiff import PhenDiffTrainSettings, train_phendiff
    from phenolens.methods.phenldiff import FinetuneSettings, finetune
    from phenolens.models.store import INFO_FILE, load_info
    from phenolens.train.trainer import TrainConfig, list_checkpoints

    wanted = dict(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                  augment=settings.augment)
    if (model_dir / INFO_FILE).is_file():
        info = load_info(model_dir)
        got = {"augment": True, **info.training.get("config", {})}  # older models: always augmented
        diffs = [f"{k} {got.get(k)!r} (asked {v!r})" for k, v in wanted.items() if got.get(k) != v]
        trained = info.training.get("settings", {})
        same = ((("base", settings.base), ("mode", settings.mode), ("rank", settings.rank), ("size", settings.size),
                 ("channels", settings.channels)) if settings.base else
                (("preset", settings.preset), ("size", settings.size)))
        diffs += [f"{k} {trained.get(k)!r} (asked {v!r})" for k, v in same if trained.get(k) != v]
        if info.training.get("data") != str(manifest.resolve()):
            diffs.append(f"data {info.training.get('data')!r} (asked {str(manifest.resolve())!r})")
        if diffs:
            raise PhenolensError(f"{model_dir} was trained with other settings ({'; '.join(diffs)}); use another "
                                 "OUT or the same settings")
        return "reused"
    mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    config = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                         warmup_steps=settings.warmup_steps, seed=settings.seed, mixed_precision=mixed,
                         checkpoint_every=max(1, min(500, settings.steps)), augment=settings.augment)
    resume = bool(list_checkpoints(model_dir))
    command = f"phenolens memorization (half {manifest.name})"
    if settings.base:
        finetune(manifest, model_dir, FinetuneSettings(base=settings.base, mode=settings.mode, rank=settings.rank,
                                                       size=settings.size, channels=settings.channels),
                 config, resume=resume, command=command, progress=progress)
    else:
        train_phendiff(manifest, model_dir, PhenDiffTrainSettings(preset=settings.preset, size=settings.size,
                                                                  channels=settings.channels),
                       config, resume=resume, command=command, progress=progress)
    return "resumed" if resume else "trained"


def _training_records(model, fallback: list[ImageRecord], label: str) -> tuple[list[ImageRecord], str]:
    """A given model's own training data (as its phenolens.json records), else DATA's half."""
    recorded = model.info.training.get("data") if isinstance(model.info.training, dict) else None
    if recorded and Path(recorded).exists():
        return discover(recorded), str(recorded)
    return fallback, f"half_{label}.csv (the model records no training data)"


def _trained_augmented(model) -> bool | None:
    """Whether the model was trained with flips/rotations, as its phenolens.json records (None: unknown)."""
    config = model.info.training_config
    if not config:
        return None
    return bool(config.get("augment", True))  # recorded before the option existed: always augmented


def _load_training(model, records: Sequence[ImageRecord], progress: bool) -> list[torch.Tensor]:
    """Training images exactly as the trainer sees them before cropping (model's normalisation)."""
    from phenolens.data.dataset import ImageSet

    images = ImageSet(records, model.info.image_size, list(model.conditions), normalizer=model.normalizer,
                      channels=model.info.channels, augment=False, progress=progress)
    return list(images.images)


# ---------------------------------------------------------------------------------------- check
def memorization_check(data: str | Path, out: str | Path, *, preset: str = "tiny", size: int = 32,
                       steps: int = 2000, batch_size: int = 16, lr: float = 2e-4, warmup_steps: int | None = None,
                       n_per_condition: int = 16, sample_steps: int = 50, seed: int = 0, threshold: float = 0.9,
                       augment: bool = True, base: str | Path | None = None, mode: str = "lora", rank: int = 4,
                       channels: Sequence[int] | None = None,
                       model_a: str | Path | None = None, model_b: str | Path | None = None,
                       n_grid: int = 6, device: str | None = None, progress: bool = True) -> dict:
    """Split DATA in two halves, train (or take) a model per half, and score generalisation vs memorisation.

    Writes OUT/half_a.csv, half_b.csv, model_a/, model_b/ (when trained here), memorization.csv,
    memorization.json, histograms.png and pairs.png; returns the summary written to memorization.json.
    AUGMENT=False trains the models here without flips/rotations (given models keep their own training).
    BASE fine-tunes a pretrained latent pipeline per half with MODE (lora, svdiff, attention, full) instead
    of training PhenDiff models from scratch; CHANNELS picks file channels (at most 3 for a latent model).
    """
    from phenolens.methods.registry import load_model_for

    t_start = time.perf_counter()
    if (model_a is None) != (model_b is None):
        raise PhenolensError("give both --model-a and --model-b, or neither (then both are trained here)")
    for name, v in (("--n-per-condition", n_per_condition), ("--sample-steps", sample_steps), ("--steps", steps),
                    ("--batch-size", batch_size)):
        if int(v) < 1:
            raise PhenolensError(f"{name} must be at least 1")
    if not -1.0 <= threshold <= 1.0:
        raise PhenolensError(f"--threshold {threshold} must be between -1 and 1 (a cosine similarity)")
    settings = MemorizationSettings(preset=preset, size=int(size), steps=int(steps), batch_size=int(batch_size),
                                    lr=float(lr), n_per_condition=int(n_per_condition), sample_steps=int(sample_steps),
                                    seed=int(seed), threshold=float(threshold), augment=bool(augment),
                                    base=str(base) if base else None, mode=mode, rank=int(rank),
                                    channels=list(channels) if channels else None,
                                    warmup_steps=int(warmup_steps if warmup_steps is not None
                                                     else min(100, max(0, int(steps) // 10))))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PhenolensError(f"{out}: exists and is not a folder")
    records = discover(data)
    half_a, half_b = split_halves(records, seed)
    out.mkdir(parents=True, exist_ok=True)
    manifests = {"a": out / "half_a.csv", "b": out / "half_b.csv"}
    for label, half in (("a", half_a), ("b", half_b)):
        if model_a is None and (out / f"model_{label}").exists() and manifests[label].is_file():
            # a rerun reuses the models trained here: only valid if they were trained on this very split
            try:
                before = [(str(Path(r.path).resolve()), r.condition) for r in discover(manifests[label])]
            except PhenolensError:  # its files are gone: certainly not this split
                before = None
            if before != [(str(Path(r.path).resolve()), r.condition) for r in half]:
                raise PhenolensError(f"{out / f'model_{label}'} was trained on another split of the data "
                                     f"({manifests[label]} differs: other DATA or --seed); use a new OUT")
        write_manifest(manifests[label], half)

    # ---- the two models
    t0 = time.perf_counter()
    if model_a is None:
        dirs = {"a": out / "model_a", "b": out / "model_b"}
        how = {label: _train_or_reuse(manifests[label], dirs[label], settings, progress) for label in "ab"}
    else:
        dirs = {"a": Path(model_a), "b": Path(model_b)}
        how = {"a": "given", "b": "given"}
    train_seconds = time.perf_counter() - t0
    models = {label: load_model_for(dirs[label], device=device) for label in "ab"}
    ia, ib = models["a"].info, models["b"].info
    if (ia.n_channels, ia.image_size) != (ib.n_channels, ib.image_size) or set(ia.conditions) != set(ib.conditions):
        raise PhenolensError(f"{dirs['a']} and {dirs['b']} are not comparable: conditions {ia.conditions} vs "
                             f"{ib.conditions}, {ia.n_channels} vs {ib.n_channels} channels, size {ia.image_size} "
                             f"vs {ib.image_size}")
    refs = {}
    for label, half in (("a", half_a), ("b", half_b)):
        refs[label] = (half, manifests[label].name) if how[label] != "given" else \
            _training_records(models[label], half, label)
    overlap = len({Path(r.path).resolve() for r in refs["a"][0]} & {Path(r.path).resolve() for r in refs["b"][0]})
    if overlap:
        logger.warning(f"warning: the two models' training sets share {overlap} image(s); generalisation is "
                       "then overestimated")

    # ---- same noises, same conditions, both models
    t0 = time.perf_counter()
    conditions = list(ia.conditions)
    gen_conditions = [c for c in conditions for _ in range(settings.n_per_condition)]
    seeds = [noise_seed(seed, ci, i, settings.n_per_condition) for ci in range(len(conditions))
             for i in range(settings.n_per_condition)]
    gens = {label: generate(models[label], gen_conditions, seeds, settings.sample_steps, settings.gen_batch_size,
                            progress, desc=f"generate ({label})") for label in "ab"}
    gen_seconds = time.perf_counter() - t0

    # ---- scores
    t0 = time.perf_counter()
    b_in_a = models["a"].normalizer.to_model(models["b"].normalizer.from_model(gens["b"]))
    general = paired_cosine(gens["a"], b_in_a)
    nearest, training = {}, {}
    for label in "ab":
        training[label] = _load_training(models[label], refs[label][0], progress)
        nearest[label] = nearest_training(gens[label], training[label], progress=progress)
    unseen = real_unseen_baseline(models, training, settings.seed, progress=progress)
    score_seconds = time.perf_counter() - t0

    rows = []
    for label in "ab":
        recs = refs[label][0]
        for j, (cond, sd) in enumerate(zip(gen_conditions, seeds)):
            near = recs[int(nearest[label].index[j])]
            rows.append(dict(model=label, condition=cond, seed=sd, generalization_cosine=f"{general[j]:.6f}",
                             memorization_cosine=f"{nearest[label].cosine[j]:.6f}",
                             nearest_training_image=str(near.path), nearest_training_condition=near.condition,
                             nearest_transform=TRANSFORMS[int(nearest[label].transform[j])]))
    write_csv_atomic(out / "memorization.csv", rows, CSV_FIELDS)

    mem_all = np.concatenate([nearest["a"].cosine, nearest["b"].cosine])
    cond_arr = np.asarray(gen_conditions)
    summary = dict(
        generalization=describe(general),
        memorization=dict(describe(mem_all), threshold=settings.threshold,
                          fraction_memorized=float(np.mean(mem_all > settings.threshold))),
        per_model={label: dict(model=str(dirs[label]), how=how[label], training_images=len(refs[label][0]),
                               training_reference=refs[label][1],
                               augmented=_trained_augmented(models[label]),
                               memorization=dict(describe(nearest[label].cosine),
                                                 fraction_memorized=float(np.mean(nearest[label].cosine
                                                                                  > settings.threshold))))
                   for label in "ab"},
        per_condition={c: dict(generalization_mean=float(general[cond_arr == c].mean()),
                               memorization_mean=float(np.concatenate([nearest[label].cosine[cond_arr == c]
                                                                       for label in "ab"]).mean()))
                       for c in conditions},
        halves={label: {c: sum(r.condition == c for r in half) for c in conditions_in_order(half)}
                for label, half in (("a", half_a), ("b", half_b))},
        real_unseen=dict(describe(unseen), fraction_above_threshold=float(np.mean(unseen > settings.threshold)),
                         n=int(len(unseen)),
                         meaning=("nearest-training cosine of REAL images of the other half (never seen by the "
                                  "model): what samples of the true distribution would score; memorisation "
                                  "well above it means copying")),
        training_overlap=overlap,
        n_pairs=int(len(general)), n_generations=int(len(mem_all)),
        similarity=("cosine of the mean-subtracted images (Pearson correlation of all pixels and channels) in "
                    "the model's [-1, 1] scale; pairs compared in model A's scale; nearest training image over "
                    "all images of the model's own half (every condition), its 8 flips/rotations (also for "
                    "models trained without augmentation) and every crop"),
        settings=dict(asdict(settings), data=str(Path(data).resolve()),
                      image_size=int(ia.image_size), conditions=conditions),
        seconds=dict(train=round(train_seconds, 2), generate=round(gen_seconds, 2), score=round(score_seconds, 2),
                     total=round(time.perf_counter() - t_start, 2)),
    )
    write_histograms(out / "histograms.png", general, mem_all, summary, unseen)
    write_pairs_grid(out / "pairs.png", gens, general, nearest, training, n_grid, gen_conditions, seeds)
    summary["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    write_json_atomic(out / "memorization.json", summary)
    return summary


# --------------------------------------------------------------------------------------- figures
def write_histograms(path: Path, general: np.ndarray, memorization: np.ndarray, summary: dict,
                     unseen: np.ndarray | None = None) -> None:
    """The paper's Fig. 4 panel: generalisation (blue) and memorisation (orange) histograms overlaid."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    lo = min([0.0, float(np.min(general)), float(np.min(memorization))]
             + ([float(np.min(unseen))] if unseen is not None and len(unseen) else []))
    bins = np.linspace(math.floor(lo * 10) / 10, 1.0, 41)
    ax.hist(general, bins=bins, alpha=0.6, color="#1f77b4", density=True,
            label=f"generalisation: same noise, two models (mean {np.mean(general):.2f})")
    ax.hist(memorization, bins=bins, alpha=0.6, color="#ff7f0e", density=True,
            label=f"memorisation: nearest training image (mean {np.mean(memorization):.2f})")
    if unseen is not None and len(unseen):
        ax.hist(unseen, bins=bins, histtype="step", color="#555555", density=True,
                label=f"reference: unseen real image vs training (mean {np.mean(unseen):.2f})")
    ax.axvline(summary["memorization"]["threshold"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("cosine similarity (mean-subtracted)")
    ax.set_ylabel("density")
    n = summary["per_model"]["a"]["training_images"]
    ax.set_title(f"{n} training images per model; {100 * summary['memorization']['fraction_memorized']:.0f}% "
                 f"of generations > {summary['memorization']['threshold']:g}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())


def write_pairs_grid(path: Path, gens: dict, general: np.ndarray, nearest: dict,
                     training: dict, n_rows: int, conditions: Sequence[str], seeds: Sequence[int]) -> None:
    """Rows of: nearest training (A) | generation A | generation B | nearest training (B), same noise.

    Training crops are turned back to the generation's orientation so that copies are easy to see.
    """
    import io

    from PIL import Image, ImageDraw

    from phenolens.data.display import composite, upscale

    n = len(general)
    if n == 0 or n_rows <= 0:
        return
    picks = sorted(set(np.linspace(0, n - 1, min(n_rows, n)).round().astype(int).tolist()))
    s = gens["a"].shape[-1]
    factor = max(1, math.ceil(64 / s))
    tile = s * factor
    label_h, gap = 14, 4

    def crop(label: str, j: int) -> np.ndarray:
        near = nearest[label]
        t = torch.as_tensor(training[label][int(near.index[j])])
        top, left = (int(v) for v in near.offset[j])
        return undo_dihedral(t[:, top:top + s, left:left + s], int(near.transform[j])).numpy()

    header = ["train A", "model A", "model B", "train B"]
    width = 4 * tile + 3 * gap
    height = label_h + len(picks) * (tile + label_h + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(header):
        draw.text((k * (tile + gap) + 2, 1), text, fill="black")
    for r, j in enumerate(picks):
        y = label_h + r * (tile + label_h + gap)
        tiles = [crop("a", j), gens["a"][j].numpy(), gens["b"][j].numpy(), crop("b", j)]
        for k, img in enumerate(tiles):
            canvas.paste(Image.fromarray(upscale(composite(img), factor)), (k * (tile + gap), y))
        text = (f"{conditions[j][:10]} s{seeds[j]}: mem {nearest['a'].cosine[j]:.2f} | "
                f"gen {general[j]:.2f} | mem {nearest['b'].cosine[j]:.2f}")
        draw.text((2, y + tile + 1), text, fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
