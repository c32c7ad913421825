"""The class means a DIFFusion run moves embeddings along (paper 004, eq. 7), computed once per run.

`--mean-images N` images per condition (default 50: the paper found the means stop improving near 50)
are taken spread evenly over each condition of `--mean-data` (default: the data the model was trained
on, as its phenolens.json records it, else the images being translated); their L2-normalised
embeddings are averaged and stored in the run folder (class_means.safetensors, and class_means.json
naming the images), so a re-run with the same settings reuses them and a reader can see what was used.
"""

from __future__ import annotations

import logging
from pathlib import Path

from phenolens.data.io import read_image
from phenolens.data.records import discover, pick_evenly
from phenolens.errors import PhenolensError
from phenolens.folders import OutputFolder
from phenolens.methods.diffusion_embedding import (DEFAULT_MEAN_IMAGES, DEFAULT_OMEGA, MEANS_INFO, MEANS_WEIGHTS,
                                                   ClassMeans, check_omega)

logger = logging.getLogger(__name__)


def mean_data_of(model, given: str | None, translated: str) -> str:
    """Where the class means come from: GIVEN, else the model's training data (if still there), else the
    images being TRANSLATED."""
    if given:
        return given
    trained_on = (model.info.training or {}).get("data", "")
    if trained_on and Path(trained_on).exists():
        return trained_on
    if trained_on:
        logger.warning(f"the model's training data {trained_on} is not there: the class means come from the images "
                       f"being translated ({translated}); pass --mean-data DIR for images of every condition")
    return translated


def check_embedding_edit(omega: float | None, n: int) -> None:
    """--omega and --mean-images, before anything is written."""
    if omega is not None:
        check_omega(omega)
    if n < 1:
        raise PhenolensError(f"--mean-images {n}: must be at least 1")


def prepare_class_means(model, data: str, n: int, omega: float | None, out: Path, folder: OutputFolder,
                        reuse: bool) -> ClassMeans:
    """Compute (or, when REUSE and the run holds them, load) the class means of DATA into the run OUT, and
    give them to MODEL with ω."""
    check_embedding_edit(omega, n)
    if reuse and (out / MEANS_WEIGHTS).is_file() and folder.owns(MEANS_WEIGHTS):
        means = ClassMeans.load(out)
    else:
        records = discover(data)
        by_condition: dict[str, list] = {}
        for rec in records:
            if rec.condition in model.info.conditions:
                by_condition.setdefault(rec.condition, []).append(rec)
        missing = [c for c in model.info.conditions if c not in by_condition]
        if missing:
            logger.warning(f"--mean-data {data}: no images of {', '.join(missing)}; edits towards or from "
                           "those conditions cannot be made")
        images = {}
        for condition, recs in by_condition.items():
            chosen = pick_evenly(recs, n)
            raws = [(r.path, read_image(r.path, channels=model.info.channels)[0]) for r in chosen]
            shapes = {raw.shape for _, raw in raws}
            if len(shapes) > 1:  # the means are per image: one shape at a time is enough
                raws = [item for item in raws if item[1].shape == raws[0][1].shape]
            images[condition] = raws
        means = model.mean_embeddings(images)
        folder.record(MEANS_WEIGHTS, MEANS_INFO)
        means.save(out)
        logger.info("class means of " + ", ".join(f"{c} ({len(v)} images)" for c, v in images.items())
                    + f" from {data}")
    model.use_class_means(means, DEFAULT_OMEGA if omega is None else omega)
    return means


def check_means_cover(means: ClassMeans, sources: set[str], edits, data: str) -> None:
    """Every edit's target and every source it moves from need a class mean (eq. 7): said before any image
    is translated (or any judge trained), naming the conditions --mean-data lacks."""
    needed = {c for e in edits for s in sources if not e.is_identity(s) for c in (s, e.target_condition)}
    missing = sorted(c for c in needed if c not in means.means)
    if missing:
        raise PhenolensError(f"--mean-data {data}: no images of {', '.join(missing)}, whose class means the edits "
                             f"({', '.join(e.label for e in edits)}) need; give a folder with images of every "
                             "condition")


__all__ = ["DEFAULT_MEAN_IMAGES", "check_embedding_edit", "check_means_cover", "mean_data_of", "prepare_class_means"]
