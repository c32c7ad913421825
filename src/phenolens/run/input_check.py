"""The input check of a translate run: each source compared with the training set.

An input whose dtype differs from the training images', or with more than `WARN_CLIPPED` of its pixel
values outside the model's normalisation range (which the model sees clipped), gets a warning naming
the file; one with more than `max_clipped` clipped is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from phenolens.data.io import ImageLayout
from phenolens.errors import PhenolensError
from phenolens.methods.core import CounterfactualModel, clipped_fraction
from phenolens.run.notices import Notices

WARN_CLIPPED = 0.05  # a clipped fraction above this earns a warning (training images stay under ~2%)


class InputCheck:
    """Compares each source with the training set: dtype, size, and how much of it the normaliser clips."""

    def __init__(self, model: CounterfactualModel, max_clipped: float, notices: Notices) -> None:
        self.model = model
        self.normalizer = model.normalizer
        stats = model.info.input_stats if isinstance(model.info.input_stats, dict) else {}
        self.dtype = stats.get("dtype") if isinstance(stats.get("dtype"), str) else None
        self.max_clipped = max_clipped
        self.notices = notices

    def __call__(self, path: Path, raw: np.ndarray, layout: ImageLayout) -> float:
        """The clipped fraction of RAW; warns or raises (one line naming PATH)."""
        clipped = clipped_fraction(raw, self.normalizer)
        span = self._range()
        if clipped > self.max_clipped:
            raise PhenolensError(
                f"{path}: {clipped:.0%} of its pixel values ({layout.dtype}, {float(np.nanmin(raw)):g}.."
                f"{float(np.nanmax(raw)):g}) lie outside the model's training range ({span}) and would be clipped; "
                f"it is unlike the training images (other bit depth or scaling?). Convert it like the training "
                f"set, or raise --max-clipped (now {self.max_clipped:g}) to translate it anyway")
        self._check_scale(path, raw.shape[-2:])
        problem = self._dtype_problem(layout.dtype)
        if problem:
            self.notices.add("dtype", f"{path}: {problem}; results may be meaningless",
                             f"{{n}} images in all with that problem ({problem})")
        if clipped > WARN_CLIPPED:
            self.notices.add("clipped", f"{path}: {clipped:.1%} of its pixel values lie outside the model's "
                             f"training range ({span}) and are clipped (column clipped_fraction in index.csv)",
                             f"{{n}} images in all have more than {WARN_CLIPPED:.0%} of their values clipped")
        return clipped

    def _check_scale(self, path: Path, hw) -> None:
        """Say when an image is resized to the scale the model learnt cells at, or when an older model
        (which did not record that scale) was trained on crops larger than the image."""
        h, w = (int(v) for v in hw)
        info = self.model.info
        rule, size = getattr(info, "size_rule", None), int(info.image_size)
        scaled = self.model.model_scale(h, w)
        if scaled != (h, w):
            self.notices.add("resized", f"{path}: {h}x{w} px is resized up to {scaled[0]}x{scaled[1]} px, the scale the "
                             f"model learnt cells at (trained with --size {size} on smaller images), and its outputs "
                             f"back to {h}x{w} px", "{n} images in all resized up to the model's scale and back",
                             prefix="")
        elif rule is None and min(h, w) < size:
            self.notices.add("scale", f"{path}: {h}x{w} px, smaller than the {size} px crops this model was trained on; "
                             "an older phenolens resized smaller training images up to that size, so the model may "
                             "have learnt cells at another scale than this image's: retrain it (phenolens train now "
                             "trains at the data's own size)",
                             "{n} images in all smaller than the model's training crops")

    def _range(self) -> str:
        lo, hi = self.normalizer.low, self.normalizer.high
        return ", ".join(f"{a:g}..{b:g}" for a, b in zip(lo, hi))

    def _dtype_problem(self, dtype: str) -> str | None:
        if self.dtype is not None:
            if dtype != self.dtype:
                return f"{dtype} pixels, the model was trained on {self.dtype} images"
            return None
        # an older model: only its normalisation range is known
        try:
            kind = np.dtype(dtype)
        except TypeError:
            return None
        if kind.kind in "iu" and max(self.normalizer.high) > np.iinfo(kind).max:
            return (f"{dtype} pixels cannot reach the model's training range (up to "
                    f"{max(self.normalizer.high):g})")
        return None
