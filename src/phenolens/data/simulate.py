"""Simulated fluorescence images of cells with planted phenotypes of known, graded strength.

Why: a generated counterfactual is easy to admire and hard to trust. On these images the truth is
known per image and per cell, so a method can be scored on whether it reproduces the planted change
(direction and size) and keeps everything else (positions, count, shape).

Layout written by :func:`simulate` into OUT::

    OUT/<condition>/<condition>_00000.tif      uint16, channel-first (4, size, size), zlib
    OUT/manifest.csv                           path,condition,strength (paths relative to OUT)
    OUT/_groundtruth/planted.csv               one row per image: planted parameters
    OUT/_groundtruth/cells.csv                 one row per cell: geometry, levels, measured mask areas
    OUT/_groundtruth/masks/<condition>/<name>_nuclei.tif, <name>_cells.tif
                                               uint16 labels, 0 = background, cell i is i in both

    OUT/.phenolens.json                        marker: every path above, so that --overwrite
                                               removes those and nothing a user put beside them

Folders whose name starts with ``_`` are not conditions, so a loader reading OUT as
"one sub-folder per condition" never trains on the ground truth. The manifest keeps the condition
order (weakest first), which `discover` honours for the folders beside it.

Channels (``CHANNEL_NAMES``), as in a Cell Painting-like 4-colour stain:

* **DNA** (Hoechst/DAPI): bright textured nuclei, dome-shaped (thicker in the middle).
* **tubulin** (microtubules): fills the cell body, radial streaks from the Golgi/MTOC side,
  tapering at the cell edge; weak over the nucleus.
* **actin** (phalloidin): a bright cortex along the cell edge (also where two cells touch) plus a
  diffuse pool with faint stress-fibre striation. The diffuse pool carries the translocation.
* **Golgi** (GM130/giantin): a compact perinuclear ribbon next to the nucleus, on the side with
  more cytoplasm.

Each image: a dark background (camera offset 100-200 counts, weak autofluorescence with a shallow
illumination gradient), cells that may touch but whose nuclei never overlap, a Gaussian PSF blur
(sigma 1 px), Poisson shot noise and Gaussian read noise (sd 4 counts). Cell size, ellipticity,
outline wobble, orientation and per-channel brightness vary from cell to cell (brightness
log-normal, 20-25 % CV; cell and nucleus radius 12 % CV), so within-condition variability is large
and the phenotypes must be learnt from many cells, as with real data.

Planted phenotypes. Condition i gets strength ``s = strengths[i]`` (default: linear from 0 for the
first condition, the untreated control, to 1 for the last). At strength s:

1. **Golgi fragmentation** (analogue: Golgi dispersal by nocodazole, brefeldin A, or apoptosis /
   stress): the compact ribbon (one anisotropic blob, sigma ~2 x 1 px) breaks into
   ``1 + Poisson(11 s)`` puncta (12 on average at s = 1) scattered around the Golgi centre with an
   RMS radius of ``0.5 + 6 s`` px (confined to the cell's own cytoplasm). The total Golgi intensity
   per cell is conserved (same distribution at every strength; split among puncta by a Dirichlet).
2. **Nuclear enlargement** (analogue: nuclear swelling, e.g. polyploidy or DNA damage): nucleus
   radii scale with ``sqrt(1 + 0.4 s)``, so the expected nucleus area grows by 40 % at s = 1
   (95 px^2 -> 133 px^2 in the mean). DNA intensity per pixel is unchanged (density kept).
3. **Cell loss** (analogue: toxicity / reduced proliferation): the number of cells per image is
   ``max(1, Poisson(lambda))`` with ``lambda = 4.5 * (size/64)^2 * (1 - 0.4 s)``, i.e. 40 % fewer
   cells at s = 1 (fewer if the field is too crowded to place them; the true count is recorded).
4. **Nuclear translocation** in the **actin** channel (analogue: stimulus-induced nuclear import,
   as of NF-kB p65, YAP or MRTF, here read out in one channel; nuclear actin accumulation is itself a
   known stress phenotype): the diffuse actin pool (not the cortex) is split between nucleus and
   cytoplasm with a nuclear/cytoplasmic density ratio ``0.3 * (2 / 0.3) ** s`` (0.3 at s = 0, 2.0
   at s = 1, log-linear in between). The pool's total per cell is conserved: signal moves, it is
   not created.
5. **A subtle shift** (analogue: a small expression change below what the eye catches): tubulin
   in the cytoplasm is multiplied by ``1 + 0.1 s`` (10 % brighter at s = 1); tubulin over the
   nucleus is unchanged.
6. **LC3 puncta** (only with ``puncta=True`` / ``phenolens simulate --puncta``, a fifth channel
   ``LC3``; analogue: autophagy induction, LC3 gathering into autophagosomes, or stress granules):
   a diffuse cytoplasmic pool plus ``1 + Poisson(2 + 13 s)`` spots of 1-2 px radius that hold a share
   ``0.1 + 0.4 s`` of the cell's LC3 (3 spots and 10 % in the control, 16 spots and 50 % at s = 1; the
   total per cell is conserved). Small spots are what a translation loses first. The LC3 channel is
   drawn from its own random stream: the other four channels are the files written without it.

Measured from pixels + masks (tests/test_simulate.py, control vs s = 1, 64 px): nucleus area
x1.35-1.41; cells per image x0.55-0.73; Golgi puncta per cell 1.0 -> ~4.6 (nearby puncta merge in
the PSF) and intensity-weighted Golgi radius 2.4 -> 5 px; actin nuclear/cytoplasmic ratio
0.25 -> 1.5 (the PSF and the cortex tail pull the measured ratio below the planted one); cytoplasmic
tubulin x1.08-1.11.

Planting one phenotype per condition (``mode="separate"``, ``phenolens simulate --mode separate``):
the conditions are ``control`` and one condition per phenotype, named after it
(``golgi-fragmentation``, ...), each planting that phenotype alone at strength 1 (``strengths`` may
set others) and leaving the rest at the control's value. Cell loss is left out unless named in
``phenotypes``, so the cell count stays the control's and a translation's identity (source nuclei
found again) can be scored for each phenotype on its own. This is what a disentanglement test needs
(do the directions a method finds separate the phenotypes?).

Strengths from 0 to 2 are accepted (above 1 every parameter is extrapolated linearly as above).

Determinism: image j of condition i is drawn from ``numpy.random.SeedSequence(seed,
spawn_key=(i, j))``, so images do not depend on each other, on ``workers`` or on how many images
are drawn; the same seed gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import tifffile
from scipy import ndimage

from phenolens.errors import PhenolensError
from phenolens.folders import MARKER, OutputFolder

__all__ = [
    "CHANNEL_NAMES",
    "DEFAULT_CONDITIONS",
    "PhenotypeParams",
    "phenotype_params",
    "channel_names",
    "claim_planned",
    "map_in_order",
    "render_image",
    "simulate",
]

DEFAULT_CONDITIONS = ["control", "low", "mid", "high"]
MODES = ("together", "separate")  # every condition plants all phenotypes / one condition per phenotype
SEPARATE_CONTROL = "control"     # the first condition of mode="separate"
CHANNEL_NAMES = ["DNA", "tubulin", "actin", "Golgi"]
PUNCTA_CHANNEL = "LC3"      # the fifth channel of `simulate(..., puncta=True)`
# the planted phenotypes by name (`simulate(..., phenotypes=...)`, `phenolens simulate --phenotypes`)
PHENOTYPES = ("golgi-fragmentation", "nuclear-enlargement", "cell-loss", "actin-translocation", "tubulin-shift",
              "lc3-puncta")
MIN_SIZE = 32
T = TypeVar("T")
R = TypeVar("R")
GROUNDTRUTH = "_groundtruth"

# --- phenotype parameters (see the module docstring) -------------------------------------------
CELLS_PER_64 = 4.5          # expected cells in a 64 x 64 field at strength 0
CELL_LOSS = 0.4             # fraction of cells lost at strength 1
NUCLEUS_RADIUS = 5.5        # px, geometric-mean radius at strength 0 (area 95 px^2)
NUCLEUS_GROWTH = 0.4        # relative nucleus-area increase at strength 1
CELL_RADIUS = 12.0          # px, geometric-mean radius of the cell body
GOLGI_FRAGMENTS = 11.0      # extra fragments (Poisson mean) at strength 1
GOLGI_SCATTER0 = 0.5        # px, RMS scatter of fragments at strength 0 (only one blob there)
GOLGI_SCATTER = 6.0         # px, extra RMS scatter at strength 1
TRANSLOCATION_RATIO0 = 0.3  # actin pool nuclear/cytoplasmic density ratio at strength 0
TRANSLOCATION_RATIO1 = 2.0  # ... and at strength 1
TUBULIN_GAIN = 0.1          # cytoplasmic tubulin gain at strength 1
PUNCTA0 = 2.0               # LC3 puncta per cell beyond the first (Poisson mean) at strength 0 (basal)
PUNCTA = 13.0               # ... extra at strength 1 (16 per cell on average)
PUNCTA_SHARE0 = 0.1         # share of the cell's LC3 held in puncta at strength 0
PUNCTA_SHARE = 0.4          # ... extra share at strength 1 (half of it in puncta)
MAX_STRENGTH = 2.0

# --- appearance ---------------------------------------------------------------------------------
PSF_SIGMA = 1.0
READ_NOISE = 4.0
DNA_LEVEL = 3500.0
TUBULIN_LEVEL = 1200.0
TUBULIN_IN_NUCLEUS = 0.15
ACTIN_CORTEX = 1600.0
ACTIN_POOL = 350.0
GOLGI_TOTAL = 60000.0       # integrated counts per cell (conserved across strengths)
LC3_LEVEL = 450.0           # counts per cytoplasm pixel of the LC3 pool (conserved across strengths)


@dataclass(frozen=True)
class PhenotypeParams:
    """The planted parameters at one strength (expected values; per-cell draws vary around them)."""

    strength: float
    expected_cells: float       # per 64 x 64 field; scaled with area in render_image
    nucleus_area_scale: float   # multiplies the expected nucleus area
    golgi_fragments: float      # expected number of Golgi fragments per cell
    golgi_scatter: float        # px, RMS distance of fragments from the Golgi centre
    translocation_ratio: float  # actin pool nuclear/cytoplasmic density ratio
    tubulin_gain: float         # multiplies cytoplasmic tubulin
    puncta: float = 1.0         # expected LC3 puncta per cell (the optional fifth channel)
    puncta_share: float = 0.1   # share of the cell's LC3 in puncta
    golgi_strength: float = 0.0  # the strength the Golgi fragment count is drawn at (0 when not planted)


def phenotype_params(strength: float, planted: Sequence[str] | None = None) -> PhenotypeParams:
    """Map a strength to the planted parameters; one place so docs, renderer and CSVs agree. A phenotype
    not in PLANTED (default: all) stays at the control's value whatever the strength."""
    s = float(strength)
    chosen = set(PHENOTYPES if planted is None else planted)

    def at(name: str) -> float:
        return s if name in chosen else 0.0

    return PhenotypeParams(
        strength=s,
        expected_cells=CELLS_PER_64 * max(1.0 - CELL_LOSS * at("cell-loss"), 0.05),
        nucleus_area_scale=1.0 + NUCLEUS_GROWTH * at("nuclear-enlargement"),
        golgi_fragments=1.0 + GOLGI_FRAGMENTS * at("golgi-fragmentation"),
        golgi_scatter=GOLGI_SCATTER0 + GOLGI_SCATTER * at("golgi-fragmentation"),
        translocation_ratio=TRANSLOCATION_RATIO0 * (TRANSLOCATION_RATIO1 / TRANSLOCATION_RATIO0)
        ** at("actin-translocation"),
        tubulin_gain=1.0 + TUBULIN_GAIN * at("tubulin-shift"),
        puncta=1.0 + PUNCTA0 + PUNCTA * at("lc3-puncta"),
        puncta_share=min(PUNCTA_SHARE0 + PUNCTA_SHARE * at("lc3-puncta"), 0.9),
        golgi_strength=at("golgi-fragmentation"),
    )


# =============================================================================== rendering
def _ellipse_rho(dy: np.ndarray, dx: np.ndarray, a: float, b: float, theta: float,
                 harm: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Normalised radius (<1 inside) of an ellipse whose outline wobbles with low harmonics."""
    c, s = math.cos(theta), math.sin(theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    if harm.size:
        psi = np.arctan2(v, u)
        k = np.arange(2, 2 + harm.size, dtype=np.float64)[:, None, None]
        wobble = 1.0 + np.sum(harm[:, None, None] * np.cos(k * psi[None] + phase[:, None, None]), axis=0)
        rho = rho / wobble
    return rho


def _ellipse_radius(angle: float, a: float, b: float, theta: float) -> float:
    """Distance from the centre to an (unwobbled) ellipse outline along `angle`."""
    d = angle - theta
    return 1.0 / math.sqrt((math.cos(d) / a) ** 2 + (math.sin(d) / b) ** 2)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-sd smooth texture field."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-12)


def _place_cells(rng: np.random.Generator, size: int, n_target: int, p: PhenotypeParams) -> list[dict]:
    """Draw cell geometries and positions; nuclei never overlap, cell bodies may touch."""
    cells: list[dict] = []
    nuc_scale = math.sqrt(p.nucleus_area_scale)
    for _ in range(n_target):
        for _try in range(40):
            rn = NUCLEUS_RADIUS * nuc_scale * math.exp(rng.normal(0.0, 0.12))
            qn = rng.uniform(0.7, 1.0)
            na, nb = rn / math.sqrt(qn), rn * math.sqrt(qn)
            ntheta = rng.uniform(0.0, math.pi)
            rc = CELL_RADIUS * math.exp(rng.normal(0.0, 0.12))
            qc = rng.uniform(0.6, 1.0)
            ca, cb = rc / math.sqrt(qc), rc * math.sqrt(qc)
            ctheta = ntheta + rng.normal(0.0, 0.4)
            charm = rng.normal(0.0, 0.05, 4)
            cphase = rng.uniform(0.0, 2 * math.pi, 4)
            nharm = rng.normal(0.0, 0.03, 2)
            nphase = rng.uniform(0.0, 2 * math.pi, 2)
            # the nucleus must sit well inside its own cell body
            inner = cb * (1.0 - np.abs(charm).sum())
            need = na * (1.0 + np.abs(nharm).sum()) + 2.0
            if inner < need:
                grow = need / inner
                ca, cb, inner = ca * grow, cb * grow, inner * grow
            off = rng.uniform(0.0, 0.35) * (inner - need)
            phi = rng.uniform(0.0, 2 * math.pi)
            margin = na * 1.1 + 1.0
            if size - 1 - 2 * margin <= 0:
                continue
            ny, nx = rng.uniform(margin, size - 1 - margin, 2)
            cy, cx = ny - off * math.sin(phi), nx - off * math.cos(phi)
            ok = True
            for o in cells:
                dn = math.hypot(ny - o["ny"], nx - o["nx"])
                dc = math.hypot(cy - o["cy"], cx - o["cx"])
                if dn < na * 1.1 + o["na"] * 1.1 + 1.5 or dc < 0.75 * (rc + o["rc"]):
                    ok = False
                    break
            if ok:
                cells.append(dict(ny=ny, nx=nx, na=na, nb=nb, ntheta=ntheta, nharm=nharm, nphase=nphase,
                                  cy=cy, cx=cx, ca=ca, cb=cb, ctheta=ctheta, charm=charm, cphase=cphase,
                                  rc=rc, rn=rn, off=off, phi=phi))
                break
    return cells


def _gauss_add(img: np.ndarray, y: float, x: float, total: float, sa: float, sb: float, theta: float) -> None:
    """Add a Gaussian spot of integrated intensity `total` in a small window (separable if round)."""
    h, w = img.shape
    r = int(math.ceil(3.5 * max(sa, sb)))
    y0, y1 = max(int(y) - r, 0), min(int(y) + r + 2, h)
    x0, x1 = max(int(x) - r, 0), min(int(x) + r + 2, w)
    if y0 >= y1 or x0 >= x1:
        return
    norm = total / (2 * math.pi * sa * sb)
    if sa == sb:
        ey = np.exp(-0.5 * ((np.arange(y0, y1) - y) / sa) ** 2)
        ex = np.exp(-0.5 * ((np.arange(x0, x1) - x) / sa) ** 2)
        img[y0:y1, x0:x1] += norm * np.outer(ey, ex)
        return
    dy = np.arange(y0, y1, dtype=np.float64)[:, None] - y
    dx = np.arange(x0, x1, dtype=np.float64)[None, :] - x
    c, s = math.cos(theta), math.sin(theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    img[y0:y1, x0:x1] += norm * np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2))


def render_image(size: int, strength: float, rng: np.random.Generator,
                 puncta_rng: np.random.Generator | None = None, planted: Sequence[str] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict], dict]:
    """Render one field: (image uint16 (4,H,W), nuclei labels, cell labels, per-cell rows, image row).

    With PUNCTA_RNG the image gets a fifth channel, LC3 with its punctate phenotype (`_lc3_channel`),
    drawn from that generator alone: the first four channels are byte-identical with or without it."""
    p = phenotype_params(strength, planted)
    lam = p.expected_cells * (size / 64.0) ** 2
    n_target = max(1, int(rng.poisson(lam)))
    cells = _place_cells(rng, size, n_target, p)

    # --- labels: each pixel goes to the cell whose wobbly outline is nearest (touching cells), then
    # every nucleus is stamped into its own cell so nuclei are always inside their cell.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    best = np.full((size, size), np.inf)
    cell_lab = np.zeros((size, size), np.uint16)
    nuc_lab = np.zeros((size, size), np.uint16)
    for i, c in enumerate(cells, start=1):
        r = int(math.ceil(max(c["ca"], c["cb"]) * 1.25)) + 1
        y0, y1 = max(int(c["cy"]) - r, 0), min(int(c["cy"]) + r + 2, size)
        x0, x1 = max(int(c["cx"]) - r, 0), min(int(c["cx"]) + r + 2, size)
        c["box"] = (y0, y1, x0, x1)
        sy, sx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
        rho = _ellipse_rho(sy - c["cy"], sx - c["cx"], c["ca"], c["cb"], c["ctheta"], c["charm"], c["cphase"])
        rho_n = _ellipse_rho(sy - c["ny"], sx - c["nx"], c["na"], c["nb"], c["ntheta"], c["nharm"], c["nphase"])
        c["rho_n"] = rho_n
        sub_best, sub_lab = best[y0:y1, x0:x1], cell_lab[y0:y1, x0:x1]
        take = (rho < 1.0) & (rho < sub_best)
        sub_best[take] = rho[take]
        sub_lab[take] = i
    for i, c in enumerate(cells, start=1):
        y0, y1, x0, x1 = c["box"]
        nuc = c["rho_n"] < 1.0
        nuc_lab[y0:y1, x0:x1][nuc] = i
        cell_lab[y0:y1, x0:x1][nuc] = i
        best[y0:y1, x0:x1][nuc] = -1.0

    # distance to the nearest cell outline (label change), for the actin cortex and edge taper;
    # the image border is not an outline (the cell continues outside the field).
    pad = np.pad(cell_lab, 1, mode="edge")
    boundary = np.zeros((size, size), bool)
    for sl in ((slice(0, -2), slice(1, -1)), (slice(2, None), slice(1, -1)),
               (slice(1, -1), slice(0, -2)), (slice(1, -1), slice(2, None))):
        boundary |= pad[sl] != cell_lab
    boundary &= cell_lab > 0
    d_edge = ndimage.distance_transform_edt(~boundary) if boundary.any() else np.full((size, size), 99.0)

    streak_field = _smooth_noise(rng, (size, size), 0.7)
    dna_tex = _smooth_noise(rng, (size, size), 0.8)
    sig = np.zeros((4, size, size))
    rows: list[dict] = []
    for i, c in enumerate(cells, start=1):
        y0, y1, x0, x1 = c["box"]
        cm = cell_lab[y0:y1, x0:x1] == i
        nm = nuc_lab[y0:y1, x0:x1] == i
        cyto = cm & ~nm
        de = d_edge[y0:y1, x0:x1]
        sy, sx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]

        # Golgi centre: next to the nucleus, on the side with more cytoplasm (towards the cell centre)
        gang = c["phi"] + math.pi + rng.normal(0.0, 0.6)
        gdist = _ellipse_radius(gang, c["na"], c["nb"], c["ntheta"]) + 2.0
        gy, gx = c["ny"] + gdist * math.sin(gang), c["nx"] + gdist * math.cos(gang)

        # DNA: dome profile with chromatin texture
        dna_level = DNA_LEVEL * math.exp(rng.normal(0.0, 0.25))
        dome = np.sqrt(np.clip(1.0 - c["rho_n"] ** 2, 0.0, 1.0))
        dna = dna_level * (0.55 + 0.45 * dome) * (1.0 + 0.2 * dna_tex[y0:y1, x0:x1])
        sig[0, y0:y1, x0:x1] += np.where(nm, dna, 0.0)

        # tubulin: cytoplasm with radial streaks from the MTOC (~Golgi), tapering at the edge
        tub_level = TUBULIN_LEVEL * math.exp(rng.normal(0.0, 0.2))
        ang = np.arctan2(sy - gy, sx - gx)
        k = np.arange(5, 15, dtype=np.float64)
        amp = rng.normal(0.0, 1.0, k.size) / math.sqrt(k.size)
        ph = rng.uniform(0.0, 2 * math.pi, k.size)
        streak = np.sum(amp[:, None, None] * np.cos(k[:, None, None] * ang[None] + ph[:, None, None]), axis=0)
        streak = 0.6 * streak + 0.4 * streak_field[y0:y1, x0:x1]
        taper = np.clip(0.45 + de / 4.0, 0.0, 1.0)
        tub = np.where(cyto, tub_level * p.tubulin_gain * taper * np.clip(1.0 + 0.2 * streak, 0.3, None), 0.0)
        tub = np.where(nm, tub_level * TUBULIN_IN_NUCLEUS, tub)
        sig[1, y0:y1, x0:x1] += tub

        # actin: cortex at the outline + a diffuse pool split nucleus/cytoplasm with the planted ratio
        cortex_level = ACTIN_CORTEX * math.exp(rng.normal(0.0, 0.25))
        pool_level = ACTIN_POOL * math.exp(rng.normal(0.0, 0.25))
        a_n, a_c = int(nm.sum()), int(cyto.sum())
        ratio = p.translocation_ratio
        d_cyto = pool_level * (a_n + a_c) / max(a_c + ratio * a_n, 1.0)
        fib_ang = c["ctheta"] + rng.normal(0.0, 0.2)
        proj = (sx - c["cx"]) * math.cos(fib_ang + math.pi / 2) + (sy - c["cy"]) * math.sin(fib_ang + math.pi / 2)
        fibres = 1.0 + 0.25 * np.cos(2 * math.pi * proj / rng.uniform(3.0, 5.0) + rng.uniform(0, 2 * math.pi))
        cortex = cortex_level * np.exp(-0.5 * (np.maximum(de - 0.5, 0.0) / 1.0) ** 2)
        act = np.where(cyto, d_cyto * fibres, 0.0) + np.where(nm, d_cyto * ratio, 0.0) + np.where(cm, cortex, 0.0)
        sig[2, y0:y1, x0:x1] += act

        # Golgi: one compact ribbon at s = 0, scattered puncta with strength; total conserved
        g_total = GOLGI_TOTAL * math.exp(rng.normal(0.0, 0.25))
        n_frag = 1 + int(rng.poisson(GOLGI_FRAGMENTS * p.golgi_strength))
        sa0, sb0 = 2.0 * rng.uniform(0.8, 1.2), 1.0
        tang = gang + math.pi / 2
        if n_frag == 1:
            frags = [(gy, gx, g_total, sa0, sb0, tang)]
        else:
            weights = rng.dirichlet(np.full(n_frag, 3.0)) * g_total
            sf = max(0.6, math.sqrt(sa0 * sb0 / n_frag))
            # fragments land on distinct cytoplasm pixels of this cell, Gaussian-weighted around the
            # Golgi centre (RMS radius = the planted scatter before confinement to the cytoplasm)
            sd = p.golgi_scatter / math.sqrt(2.0)
            py, px = np.nonzero(cyto)
            py, px = py + y0, px + x0
            if py.size == 0:  # cytoplasm entirely taken by neighbours: keep the fragments at the centre
                py, px = np.array([int(round(gy))]), np.array([int(round(gx))])
            w = np.exp(-0.5 * ((py - gy) ** 2 + (px - gx) ** 2) / sd ** 2) + 1e-12
            pick = rng.choice(py.size, size=n_frag, replace=n_frag > py.size, p=w / w.sum())
            jit = rng.uniform(-0.5, 0.5, (n_frag, 2))
            frags = [(float(py[k] + jit[f, 0]), float(px[k] + jit[f, 1]), float(weights[f]), sf, sf, 0.0)
                     for f, k in enumerate(pick)]
        fy = np.array([f[0] for f in frags])
        fx = np.array([f[1] for f in frags])
        fw = np.array([f[2] for f in frags])
        cyw, cxw = np.average(fy, weights=fw), np.average(fx, weights=fw)
        rms = float(np.sqrt(np.average((fy - cyw) ** 2 + (fx - cxw) ** 2, weights=fw)))
        for f in frags:
            _gauss_add(sig[3], *f)

        rows.append(dict(cell_id=i, nucleus_area_planted=round(math.pi * c["na"] * c["nb"], 3),
                         nucleus_major=round(c["na"], 3), nucleus_minor=round(c["nb"], 3),
                         nucleus_angle=round(c["ntheta"] % math.pi, 4),
                         cell_major=round(c["ca"], 3), cell_minor=round(c["cb"], 3),
                         cell_angle=round(c["ctheta"] % math.pi, 4),
                         dna_level=round(dna_level, 2), tubulin_level=round(tub_level, 2),
                         actin_cortex=round(cortex_level, 2), actin_pool=round(pool_level, 2),
                         golgi_total=round(g_total, 1), golgi_fragments=n_frag,
                         golgi_rms_radius=round(rms, 3), golgi_y=round(gy, 3), golgi_x=round(gx, 3)))

    # optics and camera: blur, autofluorescence with a shallow gradient, shot + read noise, offset
    sig = ndimage.gaussian_filter(sig, sigma=(0, PSF_SIGMA, PSF_SIGMA), mode="nearest")
    gain = np.exp(rng.normal(0.0, 0.05, 4))[:, None, None]
    auto = rng.uniform(20.0, 60.0, 4)[:, None, None]
    gy_, gx_ = rng.normal(0.0, 0.1, 2)
    grad = 1.0 + gy_ * (yy / size - 0.5) + gx_ * (xx / size - 0.5)
    expected = np.maximum(sig * gain + auto * grad[None], 0.0)
    offset = float(rng.uniform(100.0, 200.0))
    counts = rng.poisson(expected) + offset + rng.normal(0.0, READ_NOISE, expected.shape)
    img = np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
    if puncta_rng is not None:
        img = np.concatenate([img, _lc3_channel(puncta_rng, cells, cell_lab, nuc_lab, p, rows)[None]])

    # mask areas and centroids in one pass (bincount), not one full-image scan per cell
    n = len(cells) + 1
    cl, nl = cell_lab.ravel(), nuc_lab.ravel()
    c_area, n_area = np.bincount(cl, minlength=n), np.bincount(nl, minlength=n)
    c_y, c_x = np.bincount(cl, yy.ravel(), n), np.bincount(cl, xx.ravel(), n)
    n_y, n_x = np.bincount(nl, yy.ravel(), n), np.bincount(nl, xx.ravel(), n)
    for r in rows:
        i = r["cell_id"]
        r.update(centroid_y=round(float(c_y[i] / c_area[i]), 3), centroid_x=round(float(c_x[i] / c_area[i]), 3),
                 nucleus_centroid_y=round(float(n_y[i] / n_area[i]), 3),
                 nucleus_centroid_x=round(float(n_x[i] / n_area[i]), 3),
                 nucleus_area=int(n_area[i]), cell_area=int(c_area[i]))
    image_row = dict(
        n_cells=len(cells), expected_cells=round(lam, 4),
        nucleus_area_mean=round(float(np.mean([r["nucleus_area_planted"] for r in rows])), 3) if rows else "",
        nucleus_area_scale=round(p.nucleus_area_scale, 4),
        golgi_fragments=round(float(np.mean([r["golgi_fragments"] for r in rows])), 3) if rows else "",
        golgi_fragments_expected=round(p.golgi_fragments, 4),
        golgi_scatter=round(p.golgi_scatter, 4),
        translocation_ratio=round(p.translocation_ratio, 4),
        tubulin_gain=round(p.tubulin_gain, 4),
        camera_offset=round(offset, 2),
    )
    if puncta_rng is not None:
        image_row.update(
            lc3_puncta=round(float(np.mean([r["lc3_puncta"] for r in rows])), 3) if rows else "",
            lc3_puncta_expected=round(p.puncta, 4), lc3_puncta_share=round(p.puncta_share, 4))
    return img, nuc_lab, cell_lab, rows, image_row


def _lc3_channel(rng: np.random.Generator, cells: list[dict], cell_lab: np.ndarray, nuc_lab: np.ndarray,
                 p: PhenotypeParams, rows: list[dict]) -> np.ndarray:
    """The LC3 channel (analogue: autophagy induction, LC3 moving from the cytosol into
    autophagosomes; or stress granules): a diffuse cytoplasmic pool plus ``1 + Poisson(2 + 13 s)``
    puncta of 1-2 px radius (Gaussian sigma 0.7-1.2 px before the PSF) on the cell's own cytoplasm,
    holding a share ``0.1 + 0.4 s`` of the cell's LC3 (total per cell conserved: signal gathers, it is
    not created). Small spots are what translation loses first, so this phenotype tests just that."""
    size = cell_lab.shape[0]
    sig = np.zeros((size, size))
    for i, c in enumerate(cells, start=1):
        y0, y1, x0, x1 = c["box"]
        cyto = (cell_lab[y0:y1, x0:x1] == i) & (nuc_lab[y0:y1, x0:x1] != i)
        level = LC3_LEVEL * math.exp(rng.normal(0.0, 0.25))
        total = level * int(cyto.sum())
        n = 1 + int(rng.poisson(p.puncta - 1.0))
        share = p.puncta_share
        sig[y0:y1, x0:x1] += np.where(cyto, level * (1.0 - share), 0.0)
        py, px = np.nonzero(cyto)
        if py.size:
            pick = rng.choice(py.size, size=n, replace=n > py.size)
            weights = rng.dirichlet(np.full(n, 4.0)) * total * share
            sigmas = rng.uniform(0.7, 1.2, n)
            jit = rng.uniform(-0.5, 0.5, (n, 2))
            for k in range(n):
                _gauss_add(sig, py[pick[k]] + y0 + jit[k, 0], px[pick[k]] + x0 + jit[k, 1], float(weights[k]),
                           float(sigmas[k]), float(sigmas[k]), 0.0)
        rows[i - 1].update(lc3_level=round(level, 2), lc3_puncta=n if py.size else 0)
    sig = ndimage.gaussian_filter(sig, sigma=PSF_SIGMA, mode="nearest")
    expected = np.maximum(sig * math.exp(rng.normal(0.0, 0.05)) + rng.uniform(20.0, 60.0), 0.0)
    counts = rng.poisson(expected) + rng.uniform(100.0, 200.0) + rng.normal(0.0, READ_NOISE, expected.shape)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)


# =============================================================================== writing
@dataclass(frozen=True)
class _Job:
    out: str
    condition: str
    cond_index: int
    index: int
    strength: float
    size: int
    seed: int
    puncta: bool = False
    planted: tuple[str, ...] | None = None


def _image_seed(seed: int, cond_index: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=(cond_index, index))


def _run_job(job: _Job) -> tuple[dict, list[dict]]:
    """Render and write one image and its masks; returns its planted row and cell rows."""
    rng = np.random.default_rng(_image_seed(job.seed, job.cond_index, job.index))
    # the LC3 channel has its own stream, so the other four are the same files with or without it
    puncta_rng = np.random.default_rng(np.random.SeedSequence(job.seed, spawn_key=(job.cond_index, job.index, 1))) \
        if job.puncta else None
    img, nuc, cell, rows, image_row = render_image(job.size, job.strength, rng, puncta_rng, job.planted)
    name = f"{job.condition}_{job.index:05d}"
    rel = f"{job.condition}/{name}.tif"
    out = Path(job.out)
    tifffile.imwrite(out / rel, img, photometric="minisblack", compression="zlib",
                     metadata={"axes": "CYX", "Channel": {"Name": channel_names(job.puncta)}})
    mdir = out / GROUNDTRUTH / "masks" / job.condition
    tifffile.imwrite(mdir / f"{name}_nuclei.tif", nuc, photometric="minisblack", compression="zlib")
    tifffile.imwrite(mdir / f"{name}_cells.tif", cell, photometric="minisblack", compression="zlib")
    planted = dict(path=rel, condition=job.condition, condition_index=job.cond_index,
                   strength=round(job.strength, 6), seed=job.seed, image_index=job.index, **image_row)
    if job.planted is not None:
        planted["phenotypes"] = "+".join(job.planted)
    for r in rows:
        r.update(path=rel, condition=job.condition)
    return planted, rows


def _write_csv_atomic(path: Path, rows: list[dict], fields: Sequence[str]) -> None:
    """Write a CSV via a temporary file and os.replace, so readers never see half a table."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _condition_list(conditions: Sequence[str] | str) -> list[str]:
    """Condition names from a list or a comma-separated string."""
    if isinstance(conditions, str):
        return [c.strip() for c in conditions.split(",")]
    return [str(c) for c in conditions]


def _validate(conditions: Sequence[str], per_condition: int, size: int, seed: int,
              strengths: Sequence[float] | None, workers: int | None) -> tuple[list[str], list[float]]:
    conds = _condition_list(conditions)
    if not conds:
        raise PhenolensError("--conditions: give at least one condition name")
    seen: set[str] = set()
    for c in conds:
        if not c.strip():
            raise PhenolensError("--conditions: empty condition name")
        if c.startswith(("_", ".")) or any(ch in c for ch in '/\\:*?"<>|') or c != c.strip():
            raise PhenolensError(f"--conditions: {c!r} cannot be a folder name for a condition "
                                 "(no leading '_' or '.', no path separators or surrounding spaces)")
        if c in seen:
            raise PhenolensError(f"--conditions: duplicate condition name {c!r}")
        seen.add(c)
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise PhenolensError(f"--size must be an integer of at least {MIN_SIZE} pixels (got {size})")
    if not isinstance(per_condition, (int, np.integer)) or per_condition < 1:
        raise PhenolensError(f"--per-condition must be at least 1 (got {per_condition})")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PhenolensError(f"--seed must be a non-negative integer (got {seed})")
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise PhenolensError(f"workers must be at least 1 (got {workers})")
    if strengths is None:
        n = len(conds)
        strs = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    else:
        strs = [float(s) for s in strengths]
        if len(strs) != len(conds):
            raise PhenolensError(f"strengths: got {len(strs)} values for {len(conds)} conditions")
        for s in strs:
            if not (0.0 <= s <= MAX_STRENGTH):
                raise PhenolensError(f"strengths: {s} is outside [0, {MAX_STRENGTH}]")
    return conds, strs


def _check_phenotypes(phenotypes: Sequence[str] | None, puncta: bool) -> tuple[str, ...] | None:
    if phenotypes is None:
        return None
    names = [phenotypes] if isinstance(phenotypes, str) else list(phenotypes)
    names = [n.strip() for item in names for n in str(item).split(",") if n.strip()]
    unknown = [n for n in names if n not in PHENOTYPES]
    if unknown:
        raise PhenolensError(f"--phenotypes: unknown {', '.join(unknown)}; choose among {', '.join(PHENOTYPES)}")
    if not names:
        raise PhenolensError(f"--phenotypes: name at least one of {', '.join(PHENOTYPES)}")
    if "lc3-puncta" in names and not puncta:
        raise PhenolensError("--phenotypes lc3-puncta needs --puncta (the LC3 channel it is planted in)")
    return tuple(dict.fromkeys(names))


def _separate_conditions(conditions: Sequence[str] | None, phenotypes: tuple[str, ...] | None,
                         puncta: bool) -> tuple[list[str], list[tuple[str, ...]]]:
    """mode="separate": the control, then one condition per phenotype named after it, each planting that
    phenotype alone. Without PHENOTYPES every phenotype but cell loss (the cell count stays the control's)."""
    if conditions is not None:
        raise PhenolensError("--conditions cannot be given with --mode separate: its conditions are "
                             f"'{SEPARATE_CONTROL}' and one per phenotype, named after it (choose them with --phenotypes)")
    if phenotypes is None:
        phenotypes = tuple(n for n in PHENOTYPES if n != "cell-loss" and (puncta or n != "lc3-puncta"))
    return [SEPARATE_CONTROL, *phenotypes], [(), *((n,) for n in phenotypes)]


def _planned_files(conds: Sequence[str], per_condition: int) -> list[str]:
    """Every path the simulator writes into OUT (relative), in the order of the jobs."""
    files = []
    for c in conds:
        for j in range(int(per_condition)):
            name = f"{c}_{j:05d}"
            files += [f"{c}/{name}.tif", f"{GROUNDTRUTH}/masks/{c}/{name}_nuclei.tif",
                      f"{GROUNDTRUTH}/masks/{c}/{name}_cells.tif"]
    return files + [f"{GROUNDTRUTH}/planted.csv", f"{GROUNDTRUTH}/cells.csv", "manifest.csv"]


def _older_dataset_files(out: Path) -> list[str] | None:
    """What an older simulator (before the marker file) wrote into OUT, from its own manifest; None
    when OUT holds no simulated dataset (no ground truth folder).

    Only files the simulator names itself are listed: the images of its manifest, their masks and
    its tables. A user's file added beside them is not, so `--overwrite` never removes it.
    """
    if not (out / GROUNDTRUTH).is_dir():
        return None
    files = [f"{GROUNDTRUTH}/planted.csv", f"{GROUNDTRUTH}/cells.csv", "manifest.csv"]
    manifest = out / "manifest.csv"
    if manifest.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError, csv.Error):
            with open(manifest, newline="") as f:
                for row in csv.DictReader(f):
                    rel, cond = (row.get("path") or "").strip(), (row.get("condition") or "").strip()
                    stem = Path(rel).stem
                    # only the simulator's own naming (<cond>/<cond>_NNNNN.tif) inside OUT
                    if not cond or rel != f"{cond}/{stem}.tif" or not stem.startswith(f"{cond}_"):
                        continue
                    files += [rel, f"{GROUNDTRUTH}/masks/{cond}/{stem}_nuclei.tif",
                              f"{GROUNDTRUTH}/masks/{cond}/{stem}_cells.tif"]
    return files


def _prepare_out(out: Path, conditions: Sequence[str], per_condition: int, overwrite: bool) -> OutputFolder:
    """Open OUT as a dataset folder: refuse to mix with an existing dataset or a user's files;
    with overwrite, remove only what the simulator wrote there (its inventory), nothing else."""
    marked = (out / MARKER).is_file()
    older = not marked and (out / GROUNDTRUTH).is_dir()  # simulated before phenolens marked its folders
    if not marked and not older and out.is_dir() and any(out.iterdir()):
        raise PhenolensError(f"{out}: folder already holds files and is not a simulated dataset; phenolens never "
                             "writes into or clears such a folder: choose a new or empty one")
    exists = PhenolensError(f"{out}: a simulated dataset exists already; pass --overwrite to replace it "
                            "(only the files the simulator wrote are removed) or choose another folder")
    if older and not overwrite:
        raise exists
    folder = OutputFolder.open(out, "dataset", older=_older_dataset_files)
    return claim_planned(folder, _planned_files(conditions, per_condition), overwrite, exists)


def claim_planned(folder: OutputFolder, planned: Sequence[str], overwrite: bool, exists: PhenolensError) -> OutputFolder:
    """Make FOLDER ready for the simulator's PLANNED files: an earlier simulation is cleared only with
    OVERWRITE (else EXISTS is raised), a planned path that a user's file holds is refused, and the plan
    is recorded before anything is written, so a run killed half-way can still be cleared exactly."""
    out = folder.path
    if any((out / f).exists() for f in folder.files):
        if not overwrite:
            raise exists
        folder.clear()
    foreign = [f for f in planned if (out / f).exists() and not folder.owns(f)]
    if foreign:
        raise PhenolensError(f"{out / foreign[0]}: exists and was not written by the simulator; phenolens does "
                             "not overwrite it: move it or choose another folder")
    folder.record(*planned)
    return folder


def channel_names(puncta: bool = False) -> list[str]:
    """The channels a dataset holds, in file order."""
    return CHANNEL_NAMES + [PUNCTA_CHANNEL] if puncta else list(CHANNEL_NAMES)


def simulate(out: Path | str, conditions: Sequence[str] | None = None, per_condition: int = 100,
             size: int = 64, seed: int = 0, strengths: Sequence[float] | None = None, progress: bool = True,
             workers: int | None = None, *, overwrite: bool = False, puncta: bool = False,
             phenotypes: Sequence[str] | None = None, mode: str = "together") -> Path:
    """Write a simulated dataset with planted phenotypes into OUT (see the module docstring); returns OUT.

    Condition i gets ``strengths[i]`` (default linear 0..1 over CONDITIONS, default `DEFAULT_CONDITIONS`;
    the first condition is the control). Output is byte-identical for a given seed whatever ``workers`` is.
    PUNCTA adds a fifth channel, LC3, with a punctate phenotype (`_lc3_channel`); the other four channels
    are unchanged by it. PHENOTYPES (names from `PHENOTYPES`, default all) picks which phenotypes are
    planted; the others stay at the control's value in every condition (e.g. leave out cell loss to score
    identity alone). MODE "separate" plants them one per condition instead (`_separate_conditions`; its
    conditions are named for you, strengths default to 0 for the control and 1 for the others).
    """
    if mode not in MODES:
        raise PhenolensError(f"--mode: {mode!r} is unknown; choose one of {', '.join(MODES)}")
    planted = _check_phenotypes(phenotypes, puncta)
    if mode == "separate":
        conditions, per_cond_planted = _separate_conditions(conditions, planted, puncta)
        if strengths is None:
            strengths = [0.0] + [1.0] * (len(conditions) - 1)
    else:
        conditions = DEFAULT_CONDITIONS if conditions is None else conditions
        per_cond_planted = None if planted is None else [planted] * len(_condition_list(conditions))
    conds, strs = _validate(conditions, per_condition, size, seed, strengths, workers)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PhenolensError(f"{out}: exists and is not a folder")
    _prepare_out(out, conds, per_condition, overwrite)
    try:
        _write_dataset(out, conds, strs, int(per_condition), int(size), int(seed), workers, progress, puncta,
                       per_cond_planted)
    except OSError as err:  # unwritable or full disk: one line, not a traceback
        where = err.filename or out
        raise PhenolensError(f"{where}: cannot write the simulated dataset ({err.strerror or err})") from None
    return out


def _write_dataset(out: Path, conds: list[str], strs: list[float], per_condition: int, size: int, seed: int,
                   workers: int | None, progress: bool, puncta: bool = False,
                   planted: Sequence[tuple[str, ...]] | None = None) -> None:
    """Render every image (in a process pool when it pays off) and write the tables. PLANTED: the
    phenotypes each condition plants (None: all of them everywhere)."""
    (out / GROUNDTRUTH).mkdir(parents=True, exist_ok=True)
    for c in conds:
        (out / c).mkdir(parents=True, exist_ok=True)
        (out / GROUNDTRUTH / "masks" / c).mkdir(parents=True, exist_ok=True)

    jobs = [_Job(str(out), c, ci, j, strs[ci], int(size), int(seed), bool(puncta),
                 None if planted is None else tuple(planted[ci]))
            for ci, c in enumerate(conds) for j in range(int(per_condition))]
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    results = list(_map(jobs, int(workers), progress))

    planted = [r[0] for r in results]
    cells = [c for r in results for c in r[1]]
    gt = out / GROUNDTRUTH
    _write_csv_atomic(gt / "planted.csv", planted, _PLANTED_FIELDS + (_PUNCTA_PLANTED if puncta else [])
                      + (["phenotypes"] if planted is not None else []))
    _write_csv_atomic(gt / "cells.csv", cells, _CELL_FIELDS + (_PUNCTA_CELL if puncta else []))
    _write_csv_atomic(out / "manifest.csv", planted, ["path", "condition", "strength"])


def _map(jobs: list[_Job], workers: int, progress: bool) -> Iterable[tuple[dict, list[dict]]]:
    """Run jobs in order, in a process pool when it pays off; order (and output) never changes."""
    return map_in_order(_run_job, jobs, workers, progress)


def map_in_order(func: Callable[[T], R], jobs: Sequence[T], workers: int, progress: bool, *,
                 desc: str = "simulate", unit: str = "img", min_jobs: int = 16) -> Iterator[R]:
    """FUNC over JOBS, results in the order of JOBS, in a process pool of WORKERS when there are at least
    MIN_JOBS jobs (fewer: in this process). FUNC must be a module-level function and each job draw its
    randomness from its own seed, so the results never depend on WORKERS. Shared by the simulators."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit=unit, disable=None if progress else True)
    try:
        if workers <= 1 or len(jobs) < min_jobs:
            for j in jobs:
                yield func(j)
                bar.update()
        else:
            method = "fork" if "fork" in get_all_start_methods() else "spawn"  # fork: no re-import, no main guard needed
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context(method)) as ex:
                chunk = max(1, min(32, len(jobs) // (workers * 8)))
                for r in ex.map(func, jobs, chunksize=chunk):
                    yield r
                    bar.update()
    finally:
        bar.close()


_PLANTED_FIELDS = ["path", "condition", "condition_index", "strength", "seed", "image_index", "n_cells",
                   "expected_cells", "nucleus_area_mean", "nucleus_area_scale", "golgi_fragments",
                   "golgi_fragments_expected", "golgi_scatter", "translocation_ratio", "tubulin_gain",
                   "camera_offset"]
_CELL_FIELDS = ["path", "condition", "cell_id", "centroid_y", "centroid_x", "nucleus_centroid_y",
                "nucleus_centroid_x", "nucleus_area", "nucleus_area_planted", "cell_area", "nucleus_major",
                "nucleus_minor", "nucleus_angle", "cell_major", "cell_minor", "cell_angle", "dna_level",
                "tubulin_level", "actin_cortex", "actin_pool", "golgi_total", "golgi_fragments",
                "golgi_rms_radius", "golgi_y", "golgi_x"]
_PUNCTA_PLANTED = ["lc3_puncta", "lc3_puncta_expected", "lc3_puncta_share"]
_PUNCTA_CELL = ["lc3_level", "lc3_puncta"]
