"""Per-channel percentile normalisation: raw intensities <-> [-1, 1].

Microscopy channels have very different ranges (a dim 16-bit stain next to a bright one), so each
channel is mapped on its own, with robust percentiles fitted once on the training images and saved
with the model (`to_dict`), so translations can be written back in the file's own units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, TypeVar

import numpy as np
import torch

from phenolens.errors import PhenolensError

ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor)


@dataclass
class Normalizer:
    """Maps raw value `low[c]` to -1 and `high[c]` to +1, per channel."""

    low: list[float]
    high: list[float]
    low_percentile: float = 0.1
    high_percentile: float = 99.9

    def __post_init__(self) -> None:
        self.low = [float(v) for v in self.low]
        self.high = [float(v) for v in self.high]
        if len(self.low) != len(self.high) or not self.low:
            raise PhenolensError(f"normalization: low has {len(self.low)} value(s) and high {len(self.high)}; "
                                 "expected one per channel")
        if any(not np.isfinite(v) for v in self.low + self.high):
            raise PhenolensError("normalization: low/high must be finite numbers")
        if any(h <= lo for lo, h in zip(self.low, self.high)):
            raise PhenolensError("normalization: high must be greater than low for every channel")

    @property
    def n_channels(self) -> int:
        return len(self.low)

    @classmethod
    def fit(cls, images: Iterable[np.ndarray], low_percentile: float = 0.1, high_percentile: float = 99.9,
            max_pixels_per_image: int = 4096, seed: int = 0) -> "Normalizer":
        """Fit on raw CHW images from a deterministic sample of at most MAX pixels per image.

        Sampling keeps fitting cheap on large images while every image still contributes.
        """
        if not 0 <= low_percentile < high_percentile <= 100:
            raise PhenolensError(f"normalization percentiles {low_percentile}, {high_percentile}: "
                                 "need 0 <= low < high <= 100")
        rng = np.random.default_rng(seed)
        samples: list[np.ndarray] = []
        n_channels = None
        for i, img in enumerate(images):
            img = np.asarray(img, dtype=np.float32)
            if img.ndim == 2:
                img = img[None]
            if img.ndim != 3:
                raise PhenolensError(f"normalization: image {i} has shape {img.shape}, expected (C, H, W)")
            if n_channels is None:
                n_channels = img.shape[0]
            elif img.shape[0] != n_channels:
                raise PhenolensError(f"normalization: image {i} has {img.shape[0]} channels, "
                                     f"the first image has {n_channels}")
            flat = img.reshape(img.shape[0], -1)
            if flat.shape[1] > max_pixels_per_image:
                idx = rng.choice(flat.shape[1], size=max_pixels_per_image, replace=False)
                flat = flat[:, np.sort(idx)]
            samples.append(flat)
        if not samples:
            raise PhenolensError("normalization: no images to fit on")
        pixels = np.concatenate(samples, axis=1).astype(np.float64)
        with np.errstate(all="ignore"):
            low = np.nanpercentile(pixels, low_percentile, axis=1)
            high = np.nanpercentile(pixels, high_percentile, axis=1)
        low = np.where(np.isfinite(low), low, 0.0)
        high = np.where(np.isfinite(high), high, low + 1.0)
        high = np.where(high > low, high, low + 1.0)  # constant channel: avoid dividing by zero
        return cls(low=low.tolist(), high=high.tolist(), low_percentile=float(low_percentile),
                   high_percentile=float(high_percentile))

    # ------------------------------------------------------------------------------ conversions

    def _params(self, x: Any) -> tuple[Any, Any]:
        """low and (high - low) shaped to broadcast over CHW / BCHW, in x's library and device."""
        if x.ndim not in (3, 4):
            raise PhenolensError(f"normalization: expected a CHW or BCHW image, got shape {tuple(x.shape)}")
        c = x.shape[-3]
        if c != self.n_channels:
            raise PhenolensError(f"image has {c} channel(s), the model expects {self.n_channels}")
        low = np.asarray(self.low, dtype=np.float32).reshape(-1, 1, 1)
        span = (np.asarray(self.high, dtype=np.float32) - low.ravel()).reshape(-1, 1, 1)
        if isinstance(x, torch.Tensor):
            return (torch.from_numpy(low).to(x.device), torch.from_numpy(span).to(x.device))
        return low, span

    def to_model(self, raw: ArrayLike, clip: bool = True) -> ArrayLike:
        """Raw CHW/BCHW -> float32 in [-1, 1] (clipped unless CLIP is False: then the plain affine map, for
        a user's classifier whose inputs are standardised); same type (numpy or torch) as given."""
        if isinstance(raw, torch.Tensor):
            x = raw.float()
            low, span = self._params(x)
            y = (x - low) / span * 2 - 1
            return y.clamp_(-1, 1) if clip else y
        x = np.asarray(raw, dtype=np.float32)
        low, span = self._params(x)
        y = (x - low) / span * 2 - 1
        return (np.clip(y, -1, 1) if clip else y).astype(np.float32, copy=False)

    def from_model(self, x: ArrayLike) -> ArrayLike:
        """[-1, 1] -> raw units (no clipping: the writer clips to the file's dtype)."""
        if isinstance(x, torch.Tensor):
            x = x.float()
            low, span = self._params(x)
            return (x + 1) / 2 * span + low
        x = np.asarray(x, dtype=np.float32)
        low, span = self._params(x)
        return ((x + 1) / 2 * span + low).astype(np.float32, copy=False)

    # ---------------------------------------------------------------------------- persistence

    def to_dict(self) -> dict:
        return dict(low=list(self.low), high=list(self.high), low_percentile=self.low_percentile,
                    high_percentile=self.high_percentile)

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        if not isinstance(d, dict) or "low" not in d or "high" not in d:
            raise PhenolensError("normalization in phenolens.json: expected an object with 'low' and 'high'")
        try:
            return cls(low=list(d["low"]), high=list(d["high"]),
                       low_percentile=float(d.get("low_percentile", 0.1)),
                       high_percentile=float(d.get("high_percentile", 99.9)))
        except (TypeError, ValueError) as exc:
            raise PhenolensError(f"normalization in phenolens.json: {exc}") from None


def load_normalized(paths: Iterable, normalizer: Normalizer, channels=None,
                    size: tuple[int, int] | None = None) -> torch.Tensor:
    """Image files -> BCHW float32 in [-1, 1] with one normalisation (bilinear resize to SIZE where
    an image differs), so classifiers and metrics see real and generated images on one scale."""
    from phenolens.data.io import read_image

    out = []
    for p in paths:
        x = np.asarray(normalizer.to_model(read_image(p, channels=channels)[0]), dtype=np.float32)
        if size is not None and x.shape[1:] != tuple(size):
            from skimage.transform import resize

            x = resize(x, (x.shape[0], *size), order=1, preserve_range=True, anti_aliasing=True).astype(np.float32)
        out.append(x)
    return torch.from_numpy(np.stack(out))
