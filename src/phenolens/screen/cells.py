"""Cut single-cell crops out of a whole field, one around each nucleus.

Every method phenolens implements trains on single-cell crops (PhenDiff and DiffEx: 128 px around
each BBBC021 nucleus), so this is the step between a screen and `phenolens train`. Nuclei are found
with the same segmentation `phenolens measure` uses (`measure/segment.py`), or read from the user's
label images. A crop is skipped when its window leaves the field (`border="skip"`) or when its
nucleus is pressed against a neighbour: the share of the nucleus's outline that touches another
nucleus is above `max_overlap` (a clump the segmentation had to split, whose crop would mix cells).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential
from skimage.transform import downscale_local_mean, resize

from phenolens.errors import PhenolensError
from phenolens.measure.segment import SegmentationSettings, segment_nuclei

BORDER_MODES = ("skip", "pad")
MIN_CONTRAST = 5.0  # background deviations a nucleus's mean must stand above the background (find_nuclei)


@dataclass(frozen=True)
class CropSettings:
    """How crops are cut: SIZE px output side, SCALE < 1 bins (0.5: a 2*SIZE window binned 2x2)."""

    size: int = 128
    scale: float = 1.0
    nuclei_channel: int = 0
    nucleus_diameter: float = 15.0  # px at full resolution: sets the segmentation's smoothing and minimum size
    border: str = "skip"
    max_overlap: float = 0.25

    @property
    def window(self) -> int:
        """The window's side in field pixels."""
        return int(round(self.size / self.scale))

    def check(self) -> None:
        if not 8 <= self.size <= 4096:
            raise PhenolensError(f"--size {self.size}: choose a crop side between 8 and 4096 px")
        if not 0 < self.scale <= 1:
            raise PhenolensError(f"--scale {self.scale}: choose a value in (0, 1]: 1 keeps full resolution, 0.5 bins 2x2")
        if self.border not in BORDER_MODES:
            raise PhenolensError(f"--border {self.border!r}: choose one of {', '.join(BORDER_MODES)}")
        if not 0 <= self.max_overlap <= 1:
            raise PhenolensError(f"--max-overlap {self.max_overlap}: choose a fraction between 0 and 1")
        if not 2 <= self.nucleus_diameter <= 1000:
            raise PhenolensError(f"--nucleus-diameter {self.nucleus_diameter}: choose a diameter in px between 2 and 1000")


@dataclass
class Nucleus:
    """One nucleus of a field, where its crop window lies, and whether the crop was kept (and why not)."""

    label: int
    center_y: float
    center_x: float
    area: int
    contact: float  # share of the outline touching another nucleus
    y0: int
    x0: int
    status: str = "kept"  # kept | border | overlap


def find_nuclei(dna: np.ndarray, settings: CropSettings) -> np.ndarray:
    """Label image of nuclei on the DNA channel, with `phenolens measure`'s segmentation, keeping only
    objects that stand out of the background.

    Why the contrast test: Otsu always splits an image in two, so a field with no cells (an empty
    well, a focus failure) would yield dozens of "nuclei" made of camera noise. An object is kept when
    its mean is at least `MIN_CONTRAST` robust standard deviations (1.4826 x MAD) of the background
    above the background's median; real nuclei stand tens of deviations above it."""
    seg = SegmentationSettings(nuclei_channel=0, cell_channel=0, nucleus_diameter=settings.nucleus_diameter)
    labels = segment_nuclei(dna, seg)
    n = int(labels.max())
    if n == 0:
        return labels
    background = dna[labels == 0]
    if background.size == 0:
        return labels
    median = float(np.median(background))
    spread = 1.4826 * float(np.median(np.abs(background - median)))
    means = np.asarray(ndi.mean(dna, labels, np.arange(1, n + 1)))
    keep = np.concatenate([[False], means > median + MIN_CONTRAST * spread])
    return relabel_sequential(np.where(keep[labels], labels, 0))[0].astype(np.int32)


def outline_contact(labels: np.ndarray) -> np.ndarray:
    """Per label, the share of its outline pixels that touch another (nonzero) label; index 0 unused."""
    n = int(labels.max())
    edge = np.zeros(labels.shape, bool)
    touch = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        for shift in (1, -1):
            other = np.roll(labels, shift, axis=axis)
            # np.roll wraps around: the wrapped row/column is not a neighbour
            idx = [slice(None), slice(None)]
            idx[axis] = slice(0, 1) if shift == 1 else slice(-1, None)
            other[tuple(idx)] = labels[tuple(idx)]
            differs = (labels > 0) & (other != labels)
            edge |= differs
            touch |= differs & (other > 0)
    outline = np.bincount(labels[edge], minlength=n + 1)[: n + 1]
    touching = np.bincount(labels[touch], minlength=n + 1)[: n + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(outline > 0, touching / np.maximum(outline, 1), 0.0)


def plan_crops(labels: np.ndarray, settings: CropSettings) -> list[Nucleus]:
    """Every nucleus with its window and status, in label order."""
    ids = np.unique(labels)
    ids = ids[ids > 0]  # a user's label image need not number its nuclei 1..n
    if ids.size == 0:
        return []
    centers = ndi.center_of_mass(np.ones(labels.shape), labels, ids)
    areas = np.bincount(labels.ravel())
    contact = outline_contact(labels)
    h, w = labels.shape
    win = settings.window
    touches_edge = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    out = []
    for i, (cy, cx) in zip(ids, centers):
        y0, x0 = int(round(cy)) - win // 2, int(round(cx)) - win // 2
        nuc = Nucleus(int(i), float(cy), float(cx), int(areas[i]), float(contact[i]), y0, x0)
        outside = y0 < 0 or x0 < 0 or y0 + win > h or x0 + win > w
        if int(i) in touches_edge or (outside and settings.border == "skip"):
            nuc.status = "border"
        elif nuc.contact > settings.max_overlap:
            nuc.status = "overlap"
        out.append(nuc)
    return out


def cut(image: np.ndarray, nuc: Nucleus, settings: CropSettings, fill: np.ndarray) -> np.ndarray:
    """The (C, size, size) crop of one nucleus; the part of a window outside the field gets FILL (per channel)."""
    c, h, w = image.shape
    win = settings.window
    crop = np.empty((c, win, win), np.float32)
    crop[:] = fill[:, None, None]
    ys, xs = max(nuc.y0, 0), max(nuc.x0, 0)
    ye, xe = min(nuc.y0 + win, h), min(nuc.x0 + win, w)
    crop[:, ys - nuc.y0: ye - nuc.y0, xs - nuc.x0: xe - nuc.x0] = image[:, ys:ye, xs:xe]
    if win == settings.size:
        return crop
    factor = win / settings.size
    if abs(factor - round(factor)) < 1e-9:  # whole-pixel binning: the mean of each block, as a camera bins
        return downscale_local_mean(crop, (1, int(round(factor)), int(round(factor)))).astype(np.float32)
    return resize(crop, (c, settings.size, settings.size), order=1, anti_aliasing=True,
                  preserve_range=True).astype(np.float32)


__all__ = ["BORDER_MODES", "CropSettings", "Nucleus", "cut", "find_nuclei", "outline_contact", "plan_crops"]
