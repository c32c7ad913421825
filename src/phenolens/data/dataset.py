"""Training images in memory, normalised, served as random crops with flips and 90° rotations.

Cell-crop datasets are small (thousands of ~100 px images), so everything is read once. All
randomness comes from the `torch.Generator` passed to `batch`, never from a global RNG, so the
same generator state gives the same batch bit for bit and the trainer can resume exactly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from phenolens.data.io import read_image, stored_channel_names
from phenolens.data.normalize import Normalizer
from phenolens.data.records import ImageRecord
from phenolens.errors import PhenolensError


def pixel_kind(dtype: str) -> str:
    """'uint8', 'uint16', ... for integer pixels; 'float' for any floating-point type.

    Images of different kinds hold intensities on different scales (0-255, 0-65535, 0-1), so
    one normalisation fitted on a mixture fits none of them.
    """
    return "float" if np.issubdtype(np.dtype(dtype), np.floating) else str(np.dtype(dtype))


def _check_kind(kinds: dict[str, Path], kind: str, path: Path) -> None:
    if kind not in kinds:
        kinds[kind] = path
    if len(kinds) > 1:
        (k0, p0), (k1, p1) = list(kinds.items())[:2]
        raise PhenolensError(f"the training images mix pixel types: {p0} is {k0}, {p1} is {k1}; one normalisation "
                             "cannot fit both scales: convert them to one type (or train on one kind)")


def input_stats(raws: Sequence[np.ndarray], dtype: str) -> dict:
    """{"dtype", "min": [per channel], "max": [per channel], "short_side": [smallest, largest]} of the
    raw training images (phenolens.json), so that translate can tell an input on another intensity
    scale or of another size from the training set's."""
    lows = np.min(np.stack([r.reshape(r.shape[0], -1).min(axis=1) for r in raws]), axis=0)
    highs = np.max(np.stack([r.reshape(r.shape[0], -1).max(axis=1) for r in raws]), axis=0)
    sides = [min(r.shape[-2:]) for r in raws]
    return {"dtype": str(dtype), "min": [float(v) for v in lows], "max": [float(v) for v in highs],
            "short_side": [int(min(sides)), int(max(sides))]}


def upscaled_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """The (h, w) an image is resized to so that its short side reaches SIZE (bilinear, aspect kept);
    an image already that large keeps its shape. Training and translation share this one rule, so a
    model trained on images resized up sees translated images resized the same way."""
    if min(h, w) >= size:
        return h, w
    scale = size / min(h, w)
    return max(size, round(h * scale)), max(size, round(w * scale))


def own_size(raws: Sequence[np.ndarray], multiple: int = 1) -> int:
    """The data's own training crop side: the smallest image's short side, rounded down to a multiple
    of the network's downsampling, so that no image is ever resized."""
    side = min(min(r.shape[-2:]) for r in raws)
    size = side - side % max(1, multiple)
    if size < 1:
        raise PhenolensError(f"the smallest training image is {side} px, smaller than the network's "
                             f"downsampling ({multiple}); use images of at least {multiple} px")
    return size


def data_fingerprint(records: Sequence[ImageRecord], raws: Sequence[np.ndarray], labels: Sequence[int]) -> dict:
    """What identifies the training set for `--resume`: how many images, which files (in order,
    with their conditions) and what they hold (the raw pixels as read, after --channels)."""
    files = hashlib.sha256()
    content = hashlib.sha256()
    for rec, raw, label in zip(records, raws, labels):
        files.update(f"{Path(rec.path).resolve()}\0{rec.condition}\n".encode())
        content.update(f"{label}:{raw.shape}:".encode())
        content.update(np.ascontiguousarray(raw, dtype=np.float32).tobytes())
    return {"n_images": len(raws), "files": files.hexdigest()[:16], "content": content.hexdigest()[:16]}


class ImageSet:
    """All training images in memory, normalised to [-1, 1]."""

    def __init__(self, records: Sequence[ImageRecord], size: int | None, conditions: list[str],
                 normalizer: Normalizer | None = None, channels: Sequence[int] | None = None,
                 skip_bad: bool = False, augment: bool = True, progress: bool = True,
                 size_multiple: int = 1) -> None:
        """SIZE is the training crop side; None = the data's own size (`own_size`, a multiple of
        SIZE_MULTIPLE). Images whose short side is below SIZE are resized up (`upscaled_shape`);
        `resized_up` counts them, so the caller can say so."""
        if size is not None and int(size) < 1:
            raise PhenolensError(f"--size {size}: must be a positive number of pixels")
        self.size = int(size) if size is not None else 0
        self.conditions = list(conditions)
        self.augment = augment
        self.bad: list[tuple[Path, str]] = []
        self.records: list[ImageRecord] = []
        raws: list[np.ndarray] = []
        labels: list[int] = []
        first: Path | None = None
        kinds: dict[str, Path] = {}  # pixel kind ('uint8', 'uint16', 'float') -> its first file
        dtypes: list[str] = []
        # disable=None: no bar when stderr is not a terminal (logs, captured output)
        for rec in tqdm(records, desc="read images", unit="img", disable=None if progress else True):
            if rec.condition not in self.conditions:
                raise PhenolensError(f"{rec.path}: condition '{rec.condition}' is not one of the model's "
                                     f"conditions ({', '.join(self.conditions)})")
            try:
                raw, layout = read_image(rec.path, channels=channels)  # refuses NaN/inf pixels, naming the file
            except PhenolensError as err:
                if not skip_bad:
                    raise
                self.bad.append((Path(rec.path), str(err)))
                continue
            if raws and raw.shape[0] != raws[0].shape[0]:
                # a dataset inconsistency, not a damaged file: always an error
                raise PhenolensError(f"{rec.path}: has {raw.shape[0]} channel(s), but {first} has "
                                     f"{raws[0].shape[0]}; all training images need the same channels "
                                     f"(pick them with --channels)")
            _check_kind(kinds, pixel_kind(layout.dtype), Path(rec.path))
            first = first or Path(rec.path)
            raws.append(raw)
            dtypes.append(str(layout.dtype))
            labels.append(self.conditions.index(rec.condition))
            self.records.append(rec)
        if not raws:
            raise PhenolensError("no readable training images"
                                 + (f" ({len(self.bad)} unreadable, first: {self.bad[0][0]})" if self.bad else ""))
        self.n_channels = int(raws[0].shape[0])
        if normalizer is not None and normalizer.n_channels != self.n_channels:
            raise PhenolensError(f"{first}: image has {self.n_channels} channel(s), the model expects "
                                 f"{normalizer.n_channels}")
        self.normalizer = normalizer if normalizer is not None else Normalizer.fit(raws)
        self.input_stats = input_stats(raws, dtypes[0])
        names = stored_channel_names(first, channels)  # named by `phenolens crop`: the names travel with the model
        if names and len(names) == self.n_channels:
            self.input_stats["channel_names"] = names
        if size is None:
            self.size = own_size(raws, size_multiple)
        self.resized_up = sum(min(r.shape[-2:]) < self.size for r in raws)
        self.data_fingerprint = data_fingerprint(self.records, raws, labels)
        self.images: list[torch.Tensor] = [self._prepare(self.normalizer.to_model(r)) for r in raws]
        self.labels = torch.tensor(labels, dtype=torch.long)

    def _prepare(self, x: np.ndarray) -> torch.Tensor:
        """Resize up (bilinear) so the short side is at least `size`; larger images are cropped later."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        new = upscaled_shape(*t.shape[-2:], self.size)
        if new != tuple(t.shape[-2:]):
            t = F.interpolate(t[None], size=new, mode="bilinear", align_corners=False)[0].clamp_(-1, 1)
        return t.contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: Sequence[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, size, size) float32 crops in [-1, 1] and (B,) long labels, random only via GENERATOR.

        The same number of random draws is made whatever the images' shapes, so the generator's
        state after a batch depends only on the batch size.
        """
        indices = [int(i) for i in indices]
        n = len(indices)
        dev = generator.device
        pos = torch.rand((n, 2), generator=generator, device=dev, dtype=torch.float64).cpu().tolist()
        aug = torch.randint(0, 4, (n, 3), generator=generator, device=dev).cpu().tolist()
        s = self.size
        out = torch.empty((n, self.n_channels, s, s), dtype=torch.float32)
        for b, i in enumerate(indices):
            img = self.images[i]
            h, w = img.shape[-2:]
            top = min(int(pos[b][0] * (h - s + 1)), h - s)
            left = min(int(pos[b][1] * (w - s + 1)), w - s)
            crop = img[:, top:top + s, left:left + s]
            if self.augment:
                flip_h, flip_v, k = aug[b][0] % 2, aug[b][1] % 2, aug[b][2]
                if flip_h:
                    crop = crop.flip(-1)
                if flip_v:
                    crop = crop.flip(-2)
                if k:
                    crop = torch.rot90(crop, k, dims=(-2, -1))
            out[b] = crop
        return out, self.labels[indices].clone()
