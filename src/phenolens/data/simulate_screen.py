"""A simulated high-content screen: whole fields, one file per channel, plates, wells and sites.

Why: a real screen does not come as one small image per cell in one folder per condition. It comes
as fields of view of many cells, one TIFF per channel per site, described by an image table
(CellProfiler's LoadData CSV), with plate-to-plate intensity differences and uneven illumination.
The path ``screen -> crop -> train -> translate -> measure`` must be testable against known truth,
so this module writes exactly such a screen from the simulator of :mod:`phenolens.data.simulate`
(every field is :func:`~phenolens.data.simulate.render_image`, with the same planted phenotypes at
the same strengths) and records, per field and per cell, what was planted and where every cell is.

Layout written by :func:`simulate_screen` into OUT::

    OUT/images/{plate}_{well}_s{site}_w{n}.tif   one 2-D uint16 TIFF per channel, zlib
                                                 (w1 = DNA, w2 = tubulin, w3 = actin, w4 = Golgi)
    OUT/load_data.csv                            CellProfiler LoadData CSV, one row per field:
                                                 FileName_<ch>, PathName_<ch> (= "images", relative to
                                                 the CSV's folder) for each channel, then Metadata_Plate,
                                                 Metadata_Well, Metadata_Site, Metadata_Condition,
                                                 Metadata_Strength
    OUT/_groundtruth/fields.csv                  one row per field: plate, well, site, field, condition,
                                                 strength, n_cells, plate_gain, vignette, camera_offset and
                                                 the simulator's planted image-level parameters
    OUT/_groundtruth/cells.csv                   one row per cell: plate, well, site, field, condition,
                                                 strength, cell_id (its label in the masks), nucleus and
                                                 cell centroids (field pixels) and the simulator's per-cell
                                                 columns (nucleus_area, nucleus_area_planted, golgi_fragments, ...)
    OUT/_groundtruth/masks/{field}_nuclei.tif, {field}_cells.tif
                                                 uint16 labels, 0 = background, cell i is i in both
    OUT/.phenolens.json                          marker (kind "simulated screen"): every path above, so
                                                 that --overwrite removes those and nothing else

with ``field = f"{plate}_{well}_s{site}"``. Plates are ``P1, P2, ...``; every plate holds every
condition (``wells_per_condition`` wells each, interleaved over the plate in row-major well order,
so no plate or plate region masquerades as a phenotype); each well holds sites ``1..sites``. The wells
are the inner wells of a 96-well plate (rows B-G, columns 02-11), or of a 384-well plate (rows B-O,
columns 02-23) when more are needed.

Two screen effects are applied to every channel of a field, above its camera offset (the dark level
is a property of the camera, not of the illumination), and recorded in ``fields.csv``:

* a **plate gain** (log-normal, sd ``plate_gain_sd``, one per plate, drawn from the seed): staining
  and exposure differ from plate to plate, which is why screens are normalised per plate;
* a **vignette** (flat-field): a smooth multiplicative falloff ``1 - vignette * (r / r_corner)^2``,
  1 at the centre of the field and ``1 - vignette`` in its corners, which illumination correction
  must remove.

The ground-truth columns (``nucleus_area``, ``n_cells``, ...) are those of the simulator before
these effects; intensity levels (``dna_level``, ...) are before plate gain and vignette.

Determinism: field (plate p, condition c, replicate well r, site s) is drawn from
``numpy.random.SeedSequence(seed, spawn_key=(SCREEN_KEY, FIELD_STREAM, p, c, r, s))`` and the gain
of plate p from ``SeedSequence(seed, spawn_key=(SCREEN_KEY, PLATE_STREAM, p))``, so the same seed
gives byte-identical files whatever ``workers`` is, and a field does not depend on how many others
are drawn.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile

from phenolens.atomic import write_csv_atomic
from phenolens.data.simulate import (_CELL_FIELDS, _PLANTED_FIELDS, GROUNDTRUTH, _check_phenotypes, _validate,
                                     channel_names, claim_planned, map_in_order, render_image)
from phenolens.errors import PhenolensError
from phenolens.folders import MARKER, OutputFolder

__all__ = ["SCREEN_CONDITIONS", "SCREEN_KIND", "crops_truth", "flat_field", "plate_wells", "simulate_screen"]

SCREEN_CONDITIONS = ["control", "mid", "high"]
SCREEN_KIND = "simulated screen"   # the OutputFolder kind in OUT/.phenolens.json
IMAGES = "images"                  # the folder of per-channel TIFFs (PathName_* in load_data.csv)
MIN_FIELD_SIZE = 64
MAX_VIGNETTE = 0.9
MAX_PLATE_GAIN_SD = 1.0
SCREEN_KEY = 0x5C12EE             # first spawn-key word: the screen's streams never meet `simulate`'s
PLATE_STREAM, FIELD_STREAM = 0, 1

# inner wells (the outer ring is left empty, as in most screens): (rows, first column, last column)
_PLATE_FORMATS = ((96, "BCDEFG", 2, 11), (384, "BCDEFGHIJKLMNO", 2, 23))
_MAX_WELLS = len(_PLATE_FORMATS[-1][1]) * (_PLATE_FORMATS[-1][3] - _PLATE_FORMATS[-1][2] + 1)


def plate_wells(n: int) -> list[str]:
    """The first N inner wells of the smallest plate format that holds them, row-major ("B02", "B03", ...)."""
    for _, rows, c0, c1 in _PLATE_FORMATS:
        wells = [f"{r}{c:02d}" for r in rows for c in range(c0, c1 + 1)]
        if n <= len(wells):
            return wells[:n]
    raise ValueError(f"{n} wells do not fit a plate")


def flat_field(size: int, vignette: float) -> np.ndarray:
    """(size, size) multiplicative illumination: 1 at the centre, 1 - VIGNETTE in the corners (quadratic in r)."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r2 = ((yy - c) ** 2 + (xx - c) ** 2) / (2.0 * c * c)
    return 1.0 - float(vignette) * r2


@dataclass(frozen=True)
class _FieldJob:
    out: str
    plate: str
    plate_index: int
    well: str
    site: int
    condition: str
    cond_index: int
    replicate: int
    strength: float
    size: int
    seed: int
    plate_gain: float
    vignette: float
    planted: tuple[str, ...] | None = None

    @property
    def field(self) -> str:
        return f"{self.plate}_{self.well}_s{self.site}"


def _field_seed(job: _FieldJob) -> np.random.SeedSequence:
    return np.random.SeedSequence(job.seed, spawn_key=(SCREEN_KEY, FIELD_STREAM, job.plate_index, job.cond_index,
                                                       job.replicate, job.site))


def _plate_gain(seed: int, plate_index: int, sd: float) -> float:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SCREEN_KEY, PLATE_STREAM, plate_index)))
    return round(float(math.exp(rng.normal(0.0, sd))), 6) if sd > 0 else 1.0


def _channel_file(field: str, n: int) -> str:
    return f"{field}_w{n}.tif"


def _field_files(field: str) -> list[str]:
    """The paths one field writes into OUT (relative)."""
    return ([f"{IMAGES}/{_channel_file(field, n)}" for n in range(1, len(channel_names()) + 1)]
            + [f"{GROUNDTRUTH}/masks/{field}_nuclei.tif", f"{GROUNDTRUTH}/masks/{field}_cells.tif"])


def _render_field(job: _FieldJob) -> tuple[dict, list[dict]]:
    """Render one field, apply plate gain and vignette above the camera offset, write its channels and masks."""
    rng = np.random.default_rng(_field_seed(job))
    img, nuc, cell, rows, image_row = render_image(job.size, job.strength, rng, None, job.planted)
    offset = float(image_row["camera_offset"])  # the recorded value is the one applied
    scale = job.plate_gain * flat_field(job.size, job.vignette)
    img = np.clip(np.rint(offset + (img.astype(np.float64) - offset) * scale[None]), 0, 65535).astype(np.uint16)
    out = Path(job.out)
    for n in range(img.shape[0]):
        tifffile.imwrite(out / IMAGES / _channel_file(job.field, n + 1), img[n], photometric="minisblack",
                         compression="zlib")
    mdir = out / GROUNDTRUTH / "masks"
    tifffile.imwrite(mdir / f"{job.field}_nuclei.tif", nuc, photometric="minisblack", compression="zlib")
    tifffile.imwrite(mdir / f"{job.field}_cells.tif", cell, photometric="minisblack", compression="zlib")
    where = dict(plate=job.plate, well=job.well, site=job.site, field=job.field, condition=job.condition)
    field_row = dict(where, condition_index=job.cond_index, strength=round(job.strength, 6), seed=job.seed,
                     plate_gain=job.plate_gain, vignette=job.vignette, **image_row)
    if job.planted is not None:
        field_row["phenotypes"] = "+".join(job.planted)
    for r in rows:
        r.update(where, strength=round(job.strength, 6))
    return field_row, rows


def _check_screen_options(plates, wells_per_condition, sites, field_size, vignette, plate_gain_sd) -> None:
    def whole(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not whole(plates) or plates < 1:
        raise PhenolensError(f"--plates must be a whole number of at least 1 (got {plates})")
    if not whole(wells_per_condition) or wells_per_condition < 1:
        raise PhenolensError(f"--wells-per-condition must be a whole number of at least 1 (got {wells_per_condition})")
    if not whole(sites) or sites < 1:
        raise PhenolensError(f"--sites must be a whole number of at least 1 (got {sites})")
    if not whole(field_size) or field_size < MIN_FIELD_SIZE:
        raise PhenolensError(f"--field-size must be a whole number of at least {MIN_FIELD_SIZE} pixels (got {field_size})")
    if not isinstance(vignette, (int, float)) or isinstance(vignette, bool) or not (0.0 <= vignette <= MAX_VIGNETTE):
        raise PhenolensError(f"--vignette must be between 0 and {MAX_VIGNETTE} (the corners' loss of light; "
                             f"got {vignette})")
    if (not isinstance(plate_gain_sd, (int, float)) or isinstance(plate_gain_sd, bool)
            or not (0.0 <= plate_gain_sd <= MAX_PLATE_GAIN_SD)):
        raise PhenolensError(f"plate_gain_sd must be between 0 and {MAX_PLATE_GAIN_SD} (got {plate_gain_sd})")


def _planned_files(fields: Sequence[str]) -> list[str]:
    files = [f for field in fields for f in _field_files(field)]
    return files + [f"{GROUNDTRUTH}/fields.csv", f"{GROUNDTRUTH}/cells.csv", "load_data.csv"]


def _prepare_out(out: Path, planned: list[str], overwrite: bool) -> OutputFolder:
    """Open OUT as a screen folder: never write into a folder phenolens did not write; with overwrite,
    remove only what an earlier screen recorded there."""
    if out.exists() and not out.is_dir():
        raise PhenolensError(f"{out}: exists and is not a folder")
    if not (out / MARKER).is_file() and out.is_dir() and any(out.iterdir()):
        raise PhenolensError(f"{out}: folder already holds files and is not a simulated screen; phenolens never "
                             "writes into or clears such a folder: choose a new or empty one")
    exists = PhenolensError(f"{out}: a simulated screen exists already; pass --overwrite to replace it "
                            "(only the files the simulator wrote are removed) or choose another folder")
    return claim_planned(OutputFolder.open(out, SCREEN_KIND), planned, overwrite, exists)


def simulate_screen(out: Path | str, conditions: Sequence[str] | str | None = None, *, plates: int = 2,
                    wells_per_condition: int = 2, sites: int = 2, field_size: int = 256, seed: int = 0,
                    strengths: Sequence[float] | None = None, vignette: float = 0.2, plate_gain_sd: float = 0.1,
                    overwrite: bool = False, progress: bool = True, workers: int | None = None,
                    phenotypes: Sequence[str] | str | None = None) -> Path:
    """Write a simulated screen into OUT (layout: the module docstring); returns OUT.

    Condition i gets ``strengths[i]`` (default linear 0..1 over CONDITIONS, default `SCREEN_CONDITIONS`;
    the first condition is the control). PHENOTYPES (names from `simulate.PHENOTYPES` but lc3-puncta)
    picks the planted phenotypes, as in `simulate`. Every plate holds WELLS_PER_CONDITION wells of every
    condition and every well SITES fields of FIELD_SIZE x FIELD_SIZE pixels. VIGNETTE: the light lost in
    the corners of every field (0: flat); PLATE_GAIN_SD: the sd of the log of each plate's gain (0: none).
    The same seed gives byte-identical files whatever WORKERS is.
    """
    _check_screen_options(plates, wells_per_condition, sites, field_size, vignette, plate_gain_sd)
    names = [phenotypes] if isinstance(phenotypes, str) else list(phenotypes or [])
    if any(n.strip() == "lc3-puncta" for item in names for n in str(item).split(",")):
        raise PhenolensError("--phenotypes lc3-puncta: a simulated screen has no LC3 channel (--puncta is for "
                             "--layout images only)")
    planted = _check_phenotypes(phenotypes, False)
    conds, strs = _validate(SCREEN_CONDITIONS if conditions is None else conditions, 1, int(field_size), seed,
                            strengths, workers)
    per_plate = len(conds) * int(wells_per_condition)
    try:
        wells = plate_wells(per_plate)
    except ValueError:
        raise PhenolensError(f"--wells-per-condition {wells_per_condition}: {len(conds)} conditions x "
                             f"{wells_per_condition} wells = {per_plate} wells per plate, more than the "
                             f"{_MAX_WELLS} inner wells of a 384-well plate") from None

    jobs = []
    for p in range(int(plates)):
        plate = f"P{p + 1}"
        gain = _plate_gain(int(seed), p, float(plate_gain_sd))
        for k, well in enumerate(wells):
            ci, rep = k % len(conds), k // len(conds)
            for site in range(1, int(sites) + 1):
                jobs.append(_FieldJob(str(out), plate, p, well, site, conds[ci], ci, rep, strs[ci], int(field_size),
                                      int(seed), gain, float(vignette), planted))
    out = Path(out)
    _prepare_out(out, _planned_files([j.field for j in jobs]), overwrite)
    try:
        _write_screen(out, jobs, workers, progress, planted is not None)
    except OSError as err:  # unwritable or full disk: one line, not a traceback
        where = err.filename or out
        raise PhenolensError(f"{where}: cannot write the simulated screen ({err.strerror or err})") from None
    return out


def _write_screen(out: Path, jobs: list[_FieldJob], workers: int | None, progress: bool, with_phenotypes: bool) -> None:
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    (out / GROUNDTRUTH / "masks").mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    results = list(map_in_order(_render_field, jobs, int(workers), progress, desc="simulate screen", unit="field",
                                min_jobs=4))
    fields = [r[0] for r in results]
    cells = [c for r in results for c in r[1]]
    gt = out / GROUNDTRUTH
    write_csv_atomic(gt / "fields.csv", fields, _FIELD_COLUMNS + (["phenotypes"] if with_phenotypes else []))
    write_csv_atomic(gt / "cells.csv", cells, _CELL_COLUMNS)
    chans = channel_names()
    load_data = []
    for j in jobs:
        row = {}
        for n, ch in enumerate(chans, start=1):
            row[f"FileName_{ch}"] = _channel_file(j.field, n)
            row[f"PathName_{ch}"] = IMAGES
        row.update(Metadata_Plate=j.plate, Metadata_Well=j.well, Metadata_Site=j.site, Metadata_Condition=j.condition,
                   Metadata_Strength=round(j.strength, 6))
        load_data.append(row)
    columns = [c for ch in chans for c in (f"FileName_{ch}", f"PathName_{ch}")]
    write_csv_atomic(out / "load_data.csv", load_data, columns + ["Metadata_Plate", "Metadata_Well", "Metadata_Site",
                                                                  "Metadata_Condition", "Metadata_Strength"])


_WHERE = ["plate", "well", "site", "field", "condition"]
_FIELD_COLUMNS = (_WHERE + ["condition_index", "strength", "seed", "n_cells", "plate_gain", "vignette", "camera_offset"]
                  + [c for c in _PLANTED_FIELDS if c not in ("path", "condition", "condition_index", "strength", "seed",
                                                              "image_index", "n_cells", "camera_offset")])
_CELL_COLUMNS = (_WHERE + ["strength", "cell_id", "nucleus_centroid_y", "nucleus_centroid_x", "centroid_y", "centroid_x"]
                 + [c for c in _CELL_FIELDS if c not in ("path", "condition", "cell_id", "centroid_y", "centroid_x",
                                                          "nucleus_centroid_y", "nucleus_centroid_x")])


def crops_truth(screen: Path | str, manifest: Sequence[dict]) -> list[dict]:
    """For each crop of a `phenolens crop` manifest of this screen: the simulated cell it is centred on.

    The crop's field (from its Metadata_Plate, _Well, _Site) and centre are looked up in the true
    nucleus masks; a centre that falls just off
    its nucleus (a segmentation that split or trimmed it) takes the nearest true nucleus centroid
    within 3 px. Returns one row per crop: its path, the matched cell's truth row (None if no cell
    is there), so a test can check every crop's metadata and ground truth."""
    import csv

    import tifffile

    screen = Path(screen)
    with open(screen / GROUNDTRUTH / "cells.csv", newline="") as fh:
        cells = {(r["field"], int(r["cell_id"])): r for r in csv.DictReader(fh)}
    by_field: dict[str, list[dict]] = {}
    for c in cells.values():
        by_field.setdefault(c["field"], []).append(c)
    masks: dict[str, np.ndarray] = {}
    out = []
    for row in manifest:
        field = f"{row['Metadata_Plate']}_{row['Metadata_Well']}_s{row['Metadata_Site']}"  # the screen's field name
        if field not in masks:
            masks[field] = tifffile.imread(screen / GROUNDTRUTH / "masks" / f"{field}_nuclei.tif")
        y, x = float(row["center_y"]), float(row["center_x"])
        label = int(masks[field][int(round(y)), int(round(x))])
        if label == 0 and by_field.get(field):
            near = min(by_field[field], key=lambda c: math.hypot(float(c["nucleus_centroid_y"]) - y,
                                                                  float(c["nucleus_centroid_x"]) - x))
            if math.hypot(float(near["nucleus_centroid_y"]) - y, float(near["nucleus_centroid_x"]) - x) <= 3.0:
                label = int(near["cell_id"])
        out.append(dict(path=row["path"], truth=cells.get((field, label))))
    return out
