"""Memorisation scores: does a model reproduce its training images, or the distribution they come from?

The check (Phen-LDiff §4.2 / Fig. 4, after Kadkhodaie et al. 2024; run by `phenolens.run.memorization`)
trains two models on disjoint halves of the data and generates from both with the *same* noises.
This module only scores what that produced:

* **generalisation** (blue in the figure): `paired_cosine` between the two models' images from the
  same noise. Two models that learnt the *distribution* map a noise to nearly the same image (→ 1);
  two models that memorised their own, disjoint halves cannot (they land on different training images).
* **memorisation** (orange): `nearest_training`, the cosine similarity between a generated image and
  its nearest image in that model's own training half (→ 1 when the model copies training images).

Similarity used throughout ("cosine" below): the images in the model's [-1, 1] scale, flattened over
channels and pixels, **minus their own mean** (one mean per image over all channels and pixels), then
cosine — i.e. the Pearson correlation of the pixels. Without centring, two images of mostly dark
background (≈ -1 everywhere) would score ≈ 0.9 whatever their cells.

The nearest training image is searched over **all training images of the model's half, every condition**
(a copy of an image of another condition is memorisation too), over the 8 flips/90° rotations the
trainer augments with (`TRANSFORMS`), and over every crop position when training images are larger
than the model's size (the trainer trains on random crops). A model trained without those
flips/rotations is still searched over all 8: a copy matches its training image upright, while a new
cell matches a turned training cell about as well as an upright one, so the maximum over the 8 views
raises the generations' score and the unseen-real reference's alike.

What a "high" memorisation score is depends on the data (how alike its images are, how many there
are), so `real_unseen_baseline` scores **real images the model never saw** (the other half) the same
way: generations that score well above these unseen real images are copies, not samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from phenolens.train.trainer import step_seed

TRANSFORMS = [f"{'flip+' if f else ''}rot{90 * r}" for f in (0, 1) for r in range(4)]


def _centred(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).double()
    return flat - flat.mean(dim=1, keepdim=True)


def paired_cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Mean-subtracted cosine similarity of a[i] and b[i] (one value per pair; 0 for a flat image)."""
    ca, cb = _centred(torch.as_tensor(np.asarray(a))), _centred(torch.as_tensor(np.asarray(b)))
    if ca.shape != cb.shape:
        raise ValueError(f"paired images differ in shape: {tuple(ca.shape)} vs {tuple(cb.shape)}")
    norm = ca.norm(dim=1) * cb.norm(dim=1)
    cos = (ca * cb).sum(dim=1) / norm.clamp_min(1e-30)
    return torch.where(norm > 1e-30, cos, torch.zeros_like(cos)).clamp(-1, 1).numpy()


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Transform k of TRANSFORMS (optional horizontal flip, then k % 4 quarter turns) on (..., H, W)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def undo_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


@dataclass
class Nearest:
    """For each generation: its best similarity and where it was found."""

    cosine: np.ndarray  # (N,)
    index: np.ndarray  # (N,) index into the training list
    transform: np.ndarray  # (N,) index into TRANSFORMS applied to the generation
    offset: np.ndarray  # (N, 2) top, left of the matching crop in the training image


def nearest_training(generations: np.ndarray | torch.Tensor, training: Sequence[np.ndarray | torch.Tensor],
                     chunk: int = 64, progress: bool = False) -> Nearest:
    """Max mean-subtracted cosine of each (C, s, s) generation over every training image, its 8
    flips/rotations and every s x s crop position (training images must be at least s x s).

    Computed as a normalised cross-correlation (conv2d) so large training images cost no crops copies.
    """
    g = torch.as_tensor(np.asarray(generations)).double()
    if g.ndim != 4 or g.shape[-1] != g.shape[-2]:
        raise ValueError(f"generations must be (N, C, s, s), got {tuple(g.shape)}")
    n, c, s = g.shape[0], g.shape[1], g.shape[-1]
    views = torch.stack([dihedral(g, k) for k in range(len(TRANSFORMS))])  # (8, N, C, s, s)
    views = views - views.mean(dim=(2, 3, 4), keepdim=True)
    vnorm = views.flatten(2).norm(dim=2)  # (8, N)
    weight = (views / vnorm.clamp_min(1e-30)[..., None, None, None]).reshape(-1, c, s, s)
    ones = torch.ones(1, c, s, s, dtype=torch.float64)
    count = c * s * s
    best = Nearest(np.full(n, -np.inf), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros((n, 2), np.int64))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(training):
        groups.setdefault(tuple(t.shape), []).append(i)
    jobs = [(shape, idx[j:j + chunk]) for shape, idx in groups.items() for j in range(0, len(idx), chunk)]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="nearest training image", leave=False)
    for shape, idx in jobs:
        if len(shape) != 3 or shape[0] != c or shape[1] < s or shape[2] < s:
            raise ValueError(f"training image of shape {shape} cannot hold a ({c}, {s}, {s}) generation")
        t = torch.stack([torch.as_tensor(np.asarray(training[i])) for i in idx]).double()
        num = F.conv2d(t, weight)  # (m, 8N, H', W'): <centred unit view, window>
        wsum = F.conv2d(t, ones)
        wsq = F.conv2d(t * t, ones)
        tnorm = (wsq - wsum * wsum / count).clamp_min(0).sqrt()  # centred window norms
        cos = torch.where(tnorm > 1e-12, num / tnorm.clamp_min(1e-12), torch.zeros_like(num))
        m, _, hh, ww = cos.shape
        cos = cos.reshape(m, len(TRANSFORMS), n, hh * ww).permute(2, 0, 1, 3).reshape(n, -1)
        val, arg = cos.max(dim=1)
        for j in np.flatnonzero(val.numpy() > best.cosine).tolist():
            a = int(arg[j])
            mi, rest = divmod(a, len(TRANSFORMS) * hh * ww)
            k, pos = divmod(rest, hh * ww)
            best.cosine[j] = float(val[j])
            best.index[j] = idx[mi]
            best.transform[j] = k
            best.offset[j] = divmod(pos, ww)
    best.cosine = np.clip(np.where(np.isfinite(best.cosine), best.cosine, 0.0), -1.0, 1.0)
    return best


def real_unseen_baseline(models: dict, training: dict, seed: int, max_images: int = 64,
                         progress: bool = False) -> np.ndarray:
    """Nearest-training cosine of real images the model never saw: each half's images against the other
    model's training half (at most MAX_IMAGES per half, centre crops, in the scoring model's scale).
    MODELS and TRAINING are keyed "a" and "b"; of a model only its image size and normalisation are used.

    Why: what "nearest-training similarity" a sample of the true distribution gets depends on the data
    (how alike its images are, how many there are); generations are only copies when they score above it.
    """
    scores = []
    for own, other in (("a", "b"), ("b", "a")):
        imgs = training[other]
        if not imgs or not training[own]:
            continue
        pick = np.random.default_rng(step_seed("memorization-unseen", int(seed), other)).permutation(len(imgs))
        s = int(models[own].info.image_size)
        crops = []
        for i in sorted(pick[:max_images].tolist()):
            t = torch.as_tensor(imgs[i])
            top, left = (t.shape[-2] - s) // 2, (t.shape[-1] - s) // 2
            crops.append(t[:, top:top + s, left:left + s])
        x = models[own].normalizer.to_model(models[other].normalizer.from_model(torch.stack(crops)))
        scores.append(nearest_training(x, training[own], progress=progress).cosine)
    return np.concatenate(scores) if scores else np.zeros(0)


def describe(values: np.ndarray) -> dict:
    """Mean, median, std, min and max of a score (NaN for none), as memorization.json reports them."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return dict(mean=math.nan, median=math.nan, std=math.nan, min=math.nan, max=math.nan)
    return dict(mean=float(v.mean()), median=float(np.median(v)), std=float(v.std()), min=float(v.min()),
                max=float(v.max()))

