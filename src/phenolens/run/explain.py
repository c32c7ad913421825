"""`phenolens explain MODEL DIRECTIONS DATA OUT`: which learnt directions move the classifier, shown on cells.

For a target class (default: the classifier's last, e.g. the highest dose), a sample of DATA's images
of the other classes is inverted once (x_T given z_sem) and rendered along every direction, both signs,
at α; the classifier scores each render. `rank_directions` (DiffEx Algorithm 1) keeps the directions
that raise the target class's probability and records the images each explains. For every kept
direction, a strip shows the same cells from −α to +α along it, the classifier's probability of the
target under each image.

OUT (a phenolens output folder, kind "explain"):

    ranking.csv        rank, direction, sign, edit, target, mean_change, explained (how many), explained_images
    changes.csv        one row per image x direction x sign: p(target) before and after, the change
    strips/rank-<r>-direction-<k>.png     the strip of each kept direction
    explain.json       settings, the model and directions used, the sample
    run/               the sample's reconstructions and its renders along each kept direction, in the
                       layout of a translate run (index.csv, `edit` = direction=k,alpha=a), so that
                       `phenolens measure OUT/run` and `phenolens report OUT/run` treat every direction
                       as one target compared with the target class's real images

A finished OUT (explain.json, written last) is replaced only with --overwrite (removing only what
phenolens wrote); an unfinished one is done again.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from phenolens.atomic import write_csv_atomic, write_json_atomic
from phenolens.data.records import discover, pick_evenly
from phenolens.diffusion.inversion import INVERSIONS, InversionSettings
from phenolens.errors import PhenolensError
from phenolens.folders import OutputFolder, check_apart
from phenolens.methods.diffex_directions import DEFAULT_THRESHOLD, rank_directions
from phenolens.run.directions import load_diffex

logger = logging.getLogger(__name__)
KIND = "explain"


@dataclass
class ExplainSettings:
    target: str | None = None  # the class the directions should move images towards (default: the last)
    alpha: float | None = None  # shift (default: the α the directions were learnt with)
    threshold: float = DEFAULT_THRESHOLD
    n_samples: int = 32
    max_directions: int | None = None
    remove_explained: bool = True  # Algorithm 1; False scores every direction on the whole sample
    steps: int = 50  # DDIM steps of inversion and rendering
    skip: int = 0  # T_skip: invert only to this step and render the rest (0 = DiffEx's whole x_T)
    inversion: str = "fixed-point"  # the core's inversion; ef-ddpm keeps each image's noise maps for its renders
    seed: int = 0  # EF-DDPM's noise draw (per image, as `translate` draws it)
    batch_size: int = 8
    strip_images: int = 4
    strip_points: int = 5  # α values from −α to +α, 0 (the reconstruction) included when odd

    def check(self) -> None:
        if self.alpha is not None and not (np.isfinite(self.alpha) and self.alpha > 0):
            raise PhenolensError(f"--alpha {self.alpha}: must be a number above 0 (α = 0 moves nothing)")
        if not 0 <= self.threshold < 1:
            raise PhenolensError(f"--threshold {self.threshold}: a probability change, from 0 to below 1")
        for name in ("n_samples", "steps", "batch_size", "strip_images"):
            if getattr(self, name) < 1:
                raise PhenolensError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.strip_points < 2:
            raise PhenolensError(f"--strip-points {self.strip_points}: must be at least 2")
        if self.inversion not in INVERSIONS:
            raise PhenolensError(f"--inversion {self.inversion}: choose one of {', '.join(INVERSIONS)}")
        if not 0 <= self.skip < self.steps:
            raise PhenolensError(f"--skip {self.skip}: must be from 0 to below --steps ({self.steps})")
        if self.max_directions is not None and self.max_directions < 1:
            raise PhenolensError(f"--max-directions {self.max_directions}: must be at least 1")


def _target_probability(model, raws, target_index: int) -> np.ndarray:
    clf = model.classifier
    return clf.predict_proba(clf.prepare(raws))[:, target_index]


def _render(model, records, raws, edits, settings: ExplainSettings, progress: bool):
    """Invert each batch once and render it under every edit; (reconstructions, {label: images})."""
    from phenolens.run.translate import noise_generator

    inversion = InversionSettings(method=settings.inversion, steps=settings.steps, skip=settings.skip)
    sources = [r.condition for r in records]
    recon, out = [], {e.label: [] for e in edits}
    mse: dict = {"reconstruction": [], **{e.label: [] for e in edits}}
    for start in range(0, len(raws), settings.batch_size):
        sl = slice(start, start + settings.batch_size)
        generators = [noise_generator(settings.seed, r, raw) for r, raw in zip(records[sl], raws[sl])] \
            if settings.inversion == "ef-ddpm" else None
        t = model.translate(raws[sl], sources[sl], edits, inversion=inversion, generator=generators, progress=False)
        recon += t.reconstructions
        mse["reconstruction"] += [float(v) for v in t.recon_mse]
        for e in edits:
            out[e.label] += t.translations[e.label]
            mse[e.label] += [float(v) for v in t.change_mse[e.label]]
        if progress:
            logger.info("rendered %d of %d images", min(start + settings.batch_size, len(raws)), len(raws))
    return recon, out, mse


def _write_run(out: Path, folder: OutputFolder, model_dir: Path, data: Path, sample, layouts, recon, rendered, mse,
               kept: list, target: str, settings: ExplainSettings) -> None:
    """OUT/run: a translate-run folder of the sample (reconstruction + one render per kept direction)."""
    from phenolens.data.io import write_image
    from phenolens.measure.image_metrics import psnr_from_mse
    from phenolens.methods.edits import ToCondition

    run = out / "run"
    rows = []
    for i, (rec, layout) in enumerate(zip(sample, layouts)):
        sub = Path(rec.condition) / f"{i:04d}-{Path(rec.path).stem}"
        recon_rel = sub / "reconstruction.tif"
        folder.record(Path("run") / recon_rel)
        (run / sub).mkdir(parents=True, exist_ok=True)
        write_image(run / recon_rel, recon[i], layout)
        r_mse = mse["reconstruction"][i]
        common = dict(source_path=str(Path(rec.path).resolve()), source_condition=rec.condition,
                      recon_mse=f"{r_mse:.6g}", recon_psnr=f"{float(psnr_from_mse(r_mse)):.3f}",
                      reconstruction_path=recon_rel.as_posix())
        rows.append(dict(common, target_condition=rec.condition, output_path=recon_rel.as_posix(),
                         kind="reconstruction", change_mse=f"{r_mse:.6g}", edit=ToCondition(rec.condition).label))
        for edit in kept:
            rel = sub / f"direction-{edit.direction}-alpha-{edit.alpha:+.4g}.tif"
            folder.record(Path("run") / rel)
            write_image(run / rel, rendered[edit.label][i], layout)
            rows.append(dict(common, target_condition=target, output_path=rel.as_posix(), kind="translation",
                             change_mse=f"{mse[edit.label][i]:.6g}", edit=edit.label))
    folder.record("run/index.csv", "run/run.json")
    write_json_atomic(run / "run.json", dict(model_dir=str(model_dir.resolve()), input=str(data.resolve()),
                                             method="diffex", steps=settings.steps, skip=settings.skip,
                                             inversion=settings.inversion, target=target,
                                             edits=[e.label for e in kept]))
    write_csv_atomic(run / "index.csv", rows, ["source_path", "source_condition", "target_condition", "output_path",
                                               "recon_mse", "recon_psnr", "change_mse", "kind",
                                               "reconstruction_path", "edit"])


def run_explain(model_dir: str | Path, directions_dir: str | Path, data: str | Path, out: str | Path,
                settings: ExplainSettings, *, draw: Callable[..., object] | None = None, overwrite: bool = False,
                device: str | None = None, progress: bool = True) -> list[dict]:
    """Rank the directions for the target class and render their strips; returns ranking.csv's rows.

    DRAW(rows=, path=, columns=, diff_target=, caption_note=) draws a strip (the command passes
    `phenolens.report.grids.translation_grid`: drawing is the report's job, and `run` stays below
    `report`); None draws nothing. explain.json, written last, marks a finished explanation: a run
    killed before it is done again from the start."""
    from phenolens.data.io import read_image
    from phenolens.methods.diffex import DirectionEdit

    settings.check()
    model_dir, directions_dir, data, out = Path(model_dir), Path(directions_dir), Path(data), Path(out)
    model = load_diffex(model_dir, device)
    model.use_directions(directions_dir)
    classes = model.classifier.classes
    target = settings.target or classes[-1]
    target_index = model.classifier.class_index(target, "--target")
    alpha = float(settings.alpha if settings.alpha is not None else model.directions_info.alpha)
    records = [r for r in discover(data) if r.condition != target]
    unknown = sorted({r.condition for r in records} - set(model.conditions))
    if unknown:
        raise PhenolensError(f"DATA {data}: condition(s) {', '.join(unknown)} are not the model's "
                             f"({', '.join(model.conditions)})")
    if not records:
        raise PhenolensError(f"DATA {data}: no image of a class other than the target {target!r} to move towards it")
    check_apart(out, inputs=[data, *(r.path for r in records)], models=[model_dir, directions_dir])
    folder = OutputFolder.open(out, KIND, overwrite=overwrite)
    if (out / "explain.json").is_file():
        raise PhenolensError(f"OUT {out}: holds an explanation already; pass --overwrite to redo it (only what "
                             "phenolens wrote there is removed) or choose another folder")
    sample = pick_evenly(records, settings.n_samples)
    read = [read_image(r.path, channels=model.info.channels) for r in sample]
    raws, layouts = [r[0] for r in read], [r[1] for r in read]
    k = model.directions.k
    edits = [DirectionEdit(d, s * alpha) for d in range(k) for s in (1, -1)]
    logger.info("explain: %d images x %d directions x 2 signs towards %r (α %.3g)", len(raws), k, target, alpha)
    recon_all, rendered, mse = _render(model, sample, raws, edits, settings, progress)
    before = _target_probability(model, raws, target_index)
    change = np.zeros((len(raws), k, 2))
    rows = []
    for e in edits:
        after = _target_probability(model, rendered[e.label], target_index)
        s = 0 if e.alpha > 0 else 1
        change[:, e.direction, s] = after - before
        rows += [dict(path=str(r.path), condition=r.condition, direction=e.direction, sign=1 if s == 0 else -1,
                      edit=e.label, p_before=f"{b:.4f}", p_after=f"{a:.4f}", change=f"{a - b:.4f}")
                 for r, b, a in zip(sample, before, after)]
    ranked = rank_directions(change, settings.threshold, settings.max_directions, settings.remove_explained)
    folder.record("changes.csv", "ranking.csv", "explain.json", "strips")
    write_csv_atomic(out / "changes.csv", rows, list(rows[0]))
    ranking_rows = [dict(rank=d.rank, direction=d.direction, sign=d.sign,
                         edit=DirectionEdit(d.direction, d.sign * alpha).label, target=target,
                         mean_change=f"{d.mean_change:.4f}", explained=len(d.explained),
                         explained_images=";".join(str(sample[i].path) for i in d.explained)) for d in ranked]
    # the strips: the same cells from −α to +α along each kept direction, p(target) under each image; the
    # strip cells are inverted once for every direction's points, their reconstructions are the sample's
    strip_sample = list(range(min(settings.strip_images, len(raws))))
    strip_edits = {d.rank: [DirectionEdit(d.direction, float(a) * d.sign)
                            for a in np.linspace(-alpha, alpha, settings.strip_points)] for d in ranked}
    every_point = list({e.label: e for edits_ in strip_edits.values() for e in edits_}.values())
    strip, strip_p = {}, {}
    if ranked:
        _, strip, _ = _render(model, [sample[i] for i in strip_sample], [raws[i] for i in strip_sample],
                              every_point, settings, progress=False)
        strip_p = {label: _target_probability(model, images, target_index) for label, images in strip.items()}
    to_model = model.normalizer.to_model
    for d in ranked:
        grid_rows = []
        for j, i in enumerate(strip_sample):
            row = {"source": to_model(raws[i]), "reconstruction": to_model(recon_all[i])}
            captions = [f"p={before[i]:.2f}", ""]
            for e in strip_edits[d.rank]:
                row[f"a={e.alpha:+.2g}"] = to_model(strip[e.label][j])
                captions.append(f"p={strip_p[e.label][j]:.2f}")
            row["captions"] = captions
            grid_rows.append(row)
        columns = [f"a={e.alpha:+.2g}" for e in strip_edits[d.rank]]
        if draw is not None:
            draw(rows=grid_rows, path=out / "strips" / f"rank-{d.rank}-direction-{d.direction}.png",
                 columns=columns, diff_target=columns[-1], caption_note=f"p = classifier's probability of {target}")
    kept = [DirectionEdit(d.direction, d.sign * alpha) for d in ranked]
    _write_run(out, folder, model_dir, data, sample, layouts, recon_all, rendered, mse, kept, target, settings)
    write_csv_atomic(out / "ranking.csv", ranking_rows,
                     ["rank", "direction", "sign", "edit", "target", "mean_change", "explained", "explained_images"])
    write_json_atomic(out / "explain.json", dict(model=str(model_dir.resolve()), directions=str(directions_dir.resolve()),
                                                 data=str(data.resolve()), target=target, alpha=alpha,
                                                 settings=asdict(settings), sample=[str(r.path) for r in sample]))
    return ranking_rows
