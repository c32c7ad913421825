"""The `phenolens translate` run: every source image inverted once, rendered under each target.

A run folder holds::

    .phenolens.json                the marker: this is a translate run, and every path phenolens wrote here
    run.json                       the settings (model, input, steps, seed, inversion ...) and the model's hash
    provenance.json                what the run was made from: the model's files (size, mtime, sha256)
    index.csv                      one row per (source, target); the target equal to the source
                                   is the reconstruction (kind = reconstruction)
    _journal/rows-<k>.csv          while a run goes: the rows process k finished (merged, then removed)
    <condition>/<image stem>-<hash>/reconstruction.tif      same dtype/layout as the source
    <condition>/<image stem>-<hash>/to-<target>[-<hash>].tif
    skipped.csv                    files that could not be used (--skip-bad)

Guarantees (issue 9):

- Nothing of the user's is ever removed: the folder is opened through
  :class:`phenolens.folders.OutputFolder`, every file is recorded in the marker *before* it is
  written, and `--overwrite` removes only recorded files. OUT may not be, contain or lie inside the
  input, any source image or the model folder (checked before anything is written). A run folder
  written by an older phenolens (run.json + index.csv, no marker) is adopted: the files its index
  lists and its run.json / index.csv / skipped.csv are recorded, nothing else.
- Output names are unique by construction and stable when a manifest is edited: an image's folder
  is its readable stem plus a hash of its resolved path and its condition (never its row), and a
  target's file is `to-<target>` (plus a hash of the target when its name is not already a plain,
  lower-case file name), so no two conditions and no condition named `reconstruction` can share a
  file. Unicode letters are kept. A row always points at its own files (:mod:`phenolens.run.naming`).
- Inputs are checked against the training set: `clipped_fraction` (pixel values outside the model's
  normalisation range, which the model sees clipped), `recon_mae_raw` / `recon_mse_raw` (the
  reconstruction error in the file's units, as written) are in index.csv; an input whose dtype
  differs from the training images', or with more than 5% clipped values, gets a warning naming the
  file, and one with more than `max_clipped` (default 50%) is refused (skipped with --skip-bad)
  (:mod:`phenolens.run.input_check`).
- Results are never stale: each row records the model's hash (`model_hash`) and its source's
  `source_size` / `source_mtime_ns`; a re-run redoes (and says so) the images whose model or source
  changed, and those whose rows are damaged or missing files, instead of keeping them as done
  (:mod:`phenolens.run.provenance`).

Outputs are written atomically and each batch's rows are appended to a journal (`_journal/rows-<k>.csv`,
one per process) once its files are written; when the run ends they are merged into `index.csv`, and
a re-run first takes in the journals a killed run left, so it resumes where it stopped and skips what
is done. Under `accelerate launch` each process translates its share of the batches
(:mod:`phenolens.run.shards`). Later stages (measure, report) consume `index.csv` whatever method made
the images.

This module holds the settings, the run folder and the run itself; output names are in
:mod:`phenolens.run.naming`, the input check in :mod:`phenolens.run.input_check`, the model and source
fingerprints and the reading of an earlier index.csv in :mod:`phenolens.run.provenance`, and the
stderr warnings in :mod:`phenolens.run.notices`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from phenolens.atomic import write_csv_atomic, write_json_atomic
from phenolens.data.io import ImageLayout, read_image, write_image
from phenolens.data.records import ImageRecord, discover
from phenolens.errors import PhenolensError
from phenolens.folders import MARKER, OutputFolder, check_apart
from phenolens.data.skipped import write_skipped
from phenolens.diffusion.inversion import DEFAULT_ITERS, DEFAULT_SOLVER, DEFAULT_TOL, InversionSettings
from phenolens.measure.image_metrics import psnr_from_mse
from phenolens.methods.core import RENDER_PRECISIONS, raw_errors
from phenolens.methods.edits import ToCondition
from phenolens.methods.registry import load_model_for
from phenolens.models.store import ModelInfo
from phenolens.run.index import INDEX_COLUMNS
from phenolens.run.input_check import InputCheck
from phenolens.run.naming import (meta_column_names, output_paths, plan_outputs, record_key, safe_name, target_file,
                                  unique_targets)
from phenolens.run.minimal_edit import MINIMAL_COLUMNS, SWEEP_COLUMNS, SWEEP_FILE, minimal_edit_batch, sweep_skips
from phenolens.run.notices import Notices, warn
from phenolens.run.provenance import Previous, inside, model_fingerprint, read_cache, read_previous_rows, source_stamp
from phenolens.run.shards import (Journal, Shard, current_shard, existing_journals, journal_names, merge_journals,
                                  read_journal, remove_journals)
from phenolens.run.workers import check_workers, map_in_order
from phenolens.train.recipe import RECIPE_LR_SCHEDULE, RECIPE_PREDICTION_TYPE

logger = logging.getLogger(__name__)

KIND = "translate"
# extra index.csv columns of a latent model (Phen-LDiff): the same errors in the diffusion space, and
# the VAE's own round-trip error, the floor under the pixel-space reconstruction error
LATENT_COLUMNS = ["latent_recon_mse", "latent_change_mse", "autoencoder_mse"]
# how far the input is from the training set, and the reconstruction error in the file's own units
STAT_COLUMNS = ["clipped_fraction", "recon_mae_raw", "recon_mse_raw", "source_dtype"]
# what each row was made from: a re-run redoes rows whose model or source changed
PROVENANCE_COLUMNS = ["model_hash", "source_size", "source_mtime_ns"]
# the edit as the command line writes it (`to=high`), and the network calls inversion spent on the source
EDIT_COLUMNS = ["edit", "inversion_forwards"]
RUN_FILES = ("run.json", "provenance.json", "index.csv", "skipped.csv")
NOT_COMPARED = ("max_clipped",)  # settings that decide which images run, not their numbers
# how a run folder of a phenolens before these settings was made: fixed-point inversion with a fixed
# number of iterations, each step started from plain DDIM inversion, over the whole schedule
BEFORE_SETTING = dict(inversion_tol=0.0, solver="picard", warm_start=False, skip=0)


@dataclass
class TranslateSettings:
    """What decides the numbers in a run; a re-run with other settings needs --overwrite."""

    model_dir: str
    input: str
    targets: list[str] | None = None
    source: str | None = None
    steps: int = 50
    seed: int = 0  # the EF-DDPM noise draw (per image); deterministic inversions draw nothing
    inversion: str = "fixed-point"
    inversion_iters: int = DEFAULT_ITERS  # fixed-point: at most this many network calls per step
    batch_size: int = 16
    # classifier-free guidance of the targets; 1 = none; None = default_guidance() for the model
    guidance_scale: float | None = None
    # refuse an input with more of its pixel values outside the model's training range (they are clipped)
    max_clipped: float = 0.5
    skip: int = 0  # T_skip: rendering starts at this step of `steps` (0 = the whole schedule)
    inversion_tol: float = DEFAULT_TOL  # fixed-point: an image's iteration stops below this residual
    solver: str = DEFAULT_SOLVER  # fixed-point: picard or anderson
    warm_start: bool = True  # fixed-point: first guess of a step from the previous step's ε
    # DIFFusion models only (`phenolens.run.class_means`): the edit ĉ = c + ω·Δc and where Δc comes from
    omega: float | None = None  # None = DEFAULT_OMEGA
    mean_images: int | None = None  # None = DEFAULT_MEAN_IMAGES
    mean_data: str | None = None  # None = the model's training data, else INPUT
    # --minimal-edit (`phenolens.run.minimal_edit`): the weakest of STRENGTHS T_skip the judges see as the target
    minimal_edit: bool = False
    strengths: int = 10
    judge_data: str | None = None  # None = the model's training data, else INPUT
    judge_steps: int = 300
    max_reference: int = 200
    omega_sweep: list[float] | None = None  # DIFFusion + --minimal-edit: also try each ω, weakest first
    # the target renders' precision (inversion and reconstruction stay fp32: bf16 would break exactness)
    render_precision: str = "fp32"

    def inversion_settings(self) -> InversionSettings:
        return InversionSettings(method=self.inversion, steps=self.steps, skip=self.skip, iters=self.inversion_iters,
                                 tol=self.inversion_tol, solver=self.solver, warm_start=self.warm_start)

    def compared(self) -> dict:
        """The settings a re-run must share with the run it continues (the seed only where it is used)."""
        values = {k: v for k, v in asdict(self).items() if k not in NOT_COMPARED}
        if self.inversion != "ef-ddpm":
            values.pop("seed")
        return values


# The edit strength used when none is asked for, chosen by the sweeps of README "Edit strength": on
# the simulator's five planted phenotypes, a PhenDiff model trained with `train`'s default recipe
# shows them at 0.61 of their real size unguided (96 % of the source nuclei kept) and at 0.85 with
# guidance 2 (90 % kept), closer to the truth than the plain training loop unguided (0.82, 79 % kept);
# 3 overshoots. Only there was it measured to help: EF-DDPM is left unguided (guiding it turned the
# small effects around), as are models trained otherwise (the BBBC021 model, v-prediction at a constant
# rate, shows the real effects at full size unguided), without a trained null condition, or Phen-LDiff.
DEFAULT_GUIDANCE = 2.0


def default_guidance(inversion: str, info: ModelInfo) -> float:
    """The guidance scale when --guidance-scale is not given: DEFAULT_GUIDANCE for a PhenDiff model trained
    with the default recipe (ε-prediction, cosine schedule, condition dropout) and a deterministic
    inversion, where it was measured to help; else 1 (none)."""
    dropout = info.trained_dropout
    recipe = (info.prediction_type == RECIPE_PREDICTION_TYPE
              and info.training_config.get("lr_schedule") == RECIPE_LR_SCHEDULE)
    if info.method == "phendiff" and recipe and inversion != "ef-ddpm" and dropout is not None and dropout > 0:
        return DEFAULT_GUIDANCE
    return 1.0


# ------------------------------------------------------------------------------------ checks
def check_guidance(settings: TranslateSettings, info: ModelInfo) -> None:
    """Guidance steers along (condition - null); a model never trained with condition dropout has an
    untrained null condition, so guided targets would follow noise."""
    if settings.guidance_scale == 1:
        return
    dropout = info.trained_dropout
    if dropout is not None and dropout <= 0:
        raise PhenolensError(f"--guidance-scale {settings.guidance_scale:g}: {settings.model_dir} was trained "
                             "without condition dropout, so its null condition was never trained and guidance "
                             "would be meaningless; use --guidance-scale 1, or train with --cond-dropout 0.1")
    if dropout is None:
        warn(f"--guidance-scale {settings.guidance_scale:g}: {settings.model_dir} does not record its condition "
             "dropout (an older model); if it was trained without --cond-dropout its null condition is untrained "
             "and guided translations are meaningless")


def check_settings(settings: TranslateSettings) -> None:
    if settings.steps < 1:
        raise PhenolensError(f"--steps must be at least 1, got {settings.steps}")
    if settings.render_precision not in RENDER_PRECISIONS:
        raise PhenolensError(f"--render-precision {settings.render_precision!r}: choose one of "
                             f"{', '.join(RENDER_PRECISIONS)}")
    if not 0 <= settings.max_clipped <= 1:
        raise PhenolensError(f"--max-clipped must be a fraction in [0, 1], got {settings.max_clipped}")
    try:
        settings.inversion_settings().check()
    except ValueError as err:
        option = {"skip": "--skip", "iters": "--inversion-iters", "tol": "--inversion-tol", "solver": "--solver",
                  "inversion": "--inversion"}
        name = next((o for k, o in option.items() if str(err).startswith(k)), "--inversion")
        raise PhenolensError(f"{name}: {err}") from None


# --------------------------------------------------------------------------------- the folder
def _is_legacy_run(out: Path) -> bool:
    """A run folder of a phenolens that wrote no marker: run.json naming a model and an index.csv."""
    run_json, index = out / "run.json", out / "index.csv"
    if (out / MARKER).exists() or not run_json.is_file() or not index.is_file():
        return False
    try:
        data = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_dir" in data and "input" in data


def _previous_settings(out: Path) -> dict | None:
    run_json = out / "run.json"
    if not run_json.is_file():
        return None
    try:
        data = json.loads(run_json.read_text())
    except (OSError, ValueError) as err:
        raise PhenolensError(f"{run_json}: unreadable ({err}); pass --overwrite to replace this run "
                             "or choose another OUT") from None
    if not isinstance(data, dict):
        raise PhenolensError(f"{run_json}: not a JSON object; pass --overwrite to replace this run or choose another OUT")
    return data


def open_run_folder(out: Path, settings: TranslateSettings, overwrite: bool) -> OutputFolder:
    """Reopen (resume), replace (--overwrite: recorded files only) or create the run folder.

    Refuses to mix results of different settings, and never writes into a folder phenolens did not
    make (an older phenolens run folder is adopted: only what its index lists becomes ours).
    """
    marked = (out / MARKER).is_file()
    legacy = not marked and _is_legacy_run(out)
    if out.is_dir() and not marked and not legacy and any(out.iterdir()):
        raise PhenolensError(f"OUT {out}: folder is not empty and holds no phenolens run; phenolens never writes "
                             "into or clears such a folder (not even with --overwrite): choose a new or empty one")
    if (marked or legacy) and not overwrite:
        previous = _previous_settings(out)
        if previous is not None:
            wanted = settings.compared()
            # a run from before a setting existed ran as that setting's value then (not today's default)
            defaults = dict(asdict(TranslateSettings(model_dir="", input="")), **BEFORE_SETTING)
            diff = [k for k in wanted if previous.get(k, defaults.get(k)) != wanted[k]]
            if diff:
                raise PhenolensError(f"{out}: holds a run with other settings ({', '.join(diff)}); pass --overwrite "
                                     "to replace it or choose another OUT")
    return OutputFolder.open(out, KIND, overwrite=overwrite, older=legacy_run_files)


def legacy_run_files(out: Path) -> list[str] | None:
    """What an older phenolens wrote into OUT (its run files and the outputs its index lists), or
    None when OUT is not such a run folder."""
    if not _is_legacy_run(out):
        return None
    probe = OutputFolder(out, KIND)  # only to resolve paths inside OUT
    paths = [name for name in RUN_FILES if (out / name).is_file()]
    rows, _ = read_previous_rows(out / "index.csv")
    for row in rows:
        for col in ("output_path", "reconstruction_path"):
            rel = inside(probe, row.get(col))
            if rel is not None and (out / rel).is_file() and not (out / rel).is_symlink():
                paths.append(rel)
    logger.warning(f"{out}: a run folder of an older phenolens; adopted it (only the {len(set(paths))} files it "
                   "lists can ever be replaced)")
    return paths


# ---------------------------------------------------------------------------------------- run
def run_translate(settings: TranslateSettings, out: str | Path, *, overwrite: bool = False,
                  skip_bad: bool = False, device: str | None = None, progress: bool = True, workers: int = 1) -> Path:
    """Translate every image of INPUT to every target; returns the path of index.csv. WORKERS > 1
    translates batches on that many CPU processes (`phenolens.run.workers`); the outputs are the same.

    Under `accelerate launch` (or torchrun) each process translates its share of the batches on its
    own device and one index.csv comes out (`phenolens.run.shards`)."""
    out = Path(out)
    check_settings(settings)
    shard = current_shard(device)
    if shard.world > 1:
        check_launch(settings, workers, shard)
        device = device or shard.device
    model = load_model_for(settings.model_dir, device=device)
    check_workers(workers, model.device)
    records = discover(settings.input, condition=settings.source)
    for rec in records:
        model.info.condition_index(rec.condition, "--from" if settings.source else f"source condition of {rec.path}")
    if settings.targets:  # recorded (and compared on a re-run) as used: once each
        settings = replace(settings, targets=unique_targets(settings.targets))
    targets = settings.targets or model.conditions
    for t in targets:
        model.info.condition_index(t, "--to")
    if settings.guidance_scale is None:
        settings = replace(settings, guidance_scale=default_guidance(settings.inversion, model.info))
        if settings.guidance_scale != 1:
            logger.info(f"guidance scale {settings.guidance_scale:g} (the default for a model trained with the default "
                        "recipe; --guidance-scale 1 for none)")
    check_guidance(settings, model.info)
    records = _unique_records(records)
    from phenolens.methods.diffusion_embedding import EmbeddingArithmetic

    embedded = isinstance(model, EmbeddingArithmetic)  # DIFFusion's edit: embedded or Kandinsky decoder
    if embedded:
        from phenolens.run.class_means import DEFAULT_MEAN_IMAGES, check_embedding_edit, mean_data_of

        settings = replace(settings, mean_images=DEFAULT_MEAN_IMAGES if settings.mean_images is None
                           else settings.mean_images,
                           mean_data=str(Path(mean_data_of(model, settings.mean_data, settings.input)).resolve()))
        check_embedding_edit(settings.omega, settings.mean_images)
    elif settings.omega is not None or settings.mean_images is not None or settings.mean_data is not None:
        raise PhenolensError("--omega, --mean-images and --mean-data are for a DIFFusion model (`phenolens train "
                             "--method diffusion` or `phenolens finetune --method kandinsky`); "
                             f"{settings.model_dir} is a {model.info.method} model")
    skips = check_minimal_edit(settings, workers) if settings.minimal_edit else []
    if settings.omega_sweep:
        settings = replace(settings, omega=check_omega_sweep(settings, embedded))
    check_apart(out, inputs=[Path(settings.input), *(r.path for r in records)], models=[Path(settings.model_dir)])

    # the first process alone opens the folder, plans the run and records every file it will write;
    # the others wait for that, then only read (`plan_todo`)
    if not shard.main:
        shard.barrier()
        folder = OutputFolder.read(out, KIND)
    else:
        folder = open_run_folder(out, settings, overwrite)
    if embedded:
        from phenolens.run.class_means import check_means_cover, prepare_class_means

        prepare_class_means(model, settings.mean_data, settings.mean_images, settings.omega, out, folder,
                            reuse=not overwrite or not shard.main)
    edits = {t: model.as_edit(t) for t in targets}  # values: a worker process needs nothing else
    if embedded:
        check_means_cover(model.class_means, {r.condition for r in records}, list(edits.values()), settings.mean_data)
    notices = Notices()
    provenance_path, run_json, index_path = out / "provenance.json", out / "run.json", out / "index.csv"
    model_hash, model_files, model_mtime = model_fingerprint(Path(settings.model_dir), read_cache(provenance_path))
    if shard.main:
        folder.record(provenance_path.name, run_json.name, index_path.name)
        write_json_atomic(provenance_path, dict(model_dir=settings.model_dir, model_hash=model_hash,
                                                model_files=model_files))
        write_json_atomic(run_json, dict(asdict(settings), model_hash=model_hash))

    latent_columns = LATENT_COLUMNS if model.latent else []
    minimal_columns = MINIMAL_COLUMNS if settings.minimal_edit else []
    ours = INDEX_COLUMNS + LATENT_COLUMNS + STAT_COLUMNS + PROVENANCE_COLUMNS + EDIT_COLUMNS + MINIMAL_COLUMNS
    meta_names = meta_column_names(records, ours, settings.input)
    columns = (INDEX_COLUMNS + latent_columns + STAT_COLUMNS + PROVENANCE_COLUMNS + EDIT_COLUMNS
               + minimal_columns + list(meta_names.values()))

    def meta(rec: ImageRecord) -> dict:
        return {meta_names[k]: v for k, v in rec.meta.items()}

    folders = plan_outputs(records)
    todo = plan_todo(folder, records, targets, columns, meta, model_hash, model_mtime, notices, shard, settings.input,
                     folders)
    if shard.main:
        shard.barrier()
    mine = shard.share(todo, settings.batch_size)
    if shard.world > 1:
        logger.info(f"process {shard.rank} of {shard.world}: {len(mine)} of the {len(todo)} images to translate")

    # the judges of --minimal-edit are trained only when there is something to judge
    minimal = prepare_minimal_edit(model, settings, todo, skips, progress) if settings.minimal_edit and todo else None
    journal = Journal(out / shard.journal_name(), columns)
    skipped_journal = Journal(out / shard.journal_name("skipped"), ["path", "reason"])
    skipped: list[tuple[Path, str]] = []
    check = InputCheck(model, settings.max_clipped, notices)
    inversion = settings.inversion_settings()
    forwards: list[int] = []
    bar = tqdm(total=len(mine), desc="translate", unit="img",  # no bar when not a terminal, one bar per launch
               disable=None if progress and shard.main else True)
    batches = batches_by_shape(mine, settings.batch_size, model.info.channels, model.info.n_channels,
                               skip_bad, skipped, check=check)
    jobs = ((batch, ([item.raw for item in batch], [item.rec for item in batch], list(edits.values()), inversion,
                     settings.guidance_scale, settings.seed, settings.render_precision, *((minimal,) if minimal else ())))
            for batch in batches)
    sweep = minimal.previous_sweep(out, {record_key(r) for r in records} - {record_key(r) for r in todo}) \
        if minimal else []
    finished = False
    try:
        for batch, result in map_in_order(minimal_translate_batch if minimal else translate_batch, jobs, model,
                                          settings.model_dir, workers):
            if skipped:
                skipped_journal.append([dict(path=str(p), reason=r) for p, r in skipped])
                skipped.clear()
            extra = None
            if minimal:
                extra, result = result, result.translation
            forwards.extend(int(f) for f in result.inversion_forwards)
            new_rows = []
            for i, item in enumerate(batch):  # every file written was recorded in the marker when planned
                rec, layout = item.rec, item.layout
                recon_rel, paths = output_paths(folders[record_key(rec)], rec, targets)
                write_image(out / recon_rel, result.reconstructions[i], layout)
                mae_raw, mse_raw = raw_errors(item.raw, as_stored(result.reconstructions[i], layout.dtype))
                recon_mse = float(result.recon_mse[i])
                common = dict(source_path=str(rec.path), source_condition=rec.condition,
                              recon_mse=f"{recon_mse:.6g}", recon_psnr=f"{float(psnr_from_mse(recon_mse)):.3f}",
                              reconstruction_path=recon_rel.as_posix(), clipped_fraction=f"{item.clipped:.6g}",
                              recon_mae_raw=f"{mae_raw:.6g}", recon_mse_raw=f"{mse_raw:.6g}", source_dtype=layout.dtype,
                              model_hash=model_hash, source_size=item.stamp[0], source_mtime_ns=item.stamp[1],
                              inversion_forwards=int(result.inversion_forwards[i]), **meta(rec))
                if model.latent and result.latent_recon_mse is not None:  # a --minimal-edit sweep measures none
                    common.update(latent_recon_mse=f"{float(result.latent_recon_mse[i]):.6g}",
                                  autoencoder_mse=f"{float(result.autoencoder_mse[i]):.6g}")
                for target in targets:
                    rel = paths[target]
                    kind = "reconstruction" if target == rec.condition else "translation"
                    label = edits[target].label
                    if kind == "translation":
                        write_image(out / rel, result.translations[label][i], layout)
                    row = dict(common, target_condition=target, output_path=rel.as_posix(), kind=kind,
                               edit=label, change_mse=f"{float(result.change_mse[label][i]):.6g}")
                    if model.latent and label in result.latent_change_mse:
                        row["latent_change_mse"] = f"{float(result.latent_change_mse[label][i]):.6g}"
                    if extra is not None and kind == "translation":
                        row.update(extra.columns[label][i])
                    new_rows.append(row)
            journal.append(new_rows)  # after the batch's files: a row never points at a file not yet written
            if extra is not None:
                sweep += extra.sweep
                folder.record(SWEEP_FILE)
                write_csv_atomic(out / SWEEP_FILE, sweep, SWEEP_COLUMNS)
            bar.update(len(batch))
        if skipped:
            skipped_journal.append([dict(path=str(p), reason=r) for p, r in skipped])
        finished = True
    finally:
        bar.close()
        if finished:
            shard.barrier()  # the first process merges once every process has finished
        if shard.main and (finished or shard.world == 1):  # alone, an interrupted run keeps what it did
            merge_run(folder, columns, finished)
    notices.close()
    if forwards and shard.main:
        rendered = settings.steps - settings.skip
        logger.info(f"inversion ({inversion.method}): {np.mean(forwards):.1f} network calls per image "
                    f"({np.mean(forwards) / rendered:.2f} per step)")
    return index_path


def plan_todo(folder: OutputFolder, records: list[ImageRecord], targets: list[str], columns: list[str], meta,
              model_hash: str, model_mtime: int, notices: Notices, shard: Shard, input_name: str,
              folders: dict) -> list[ImageRecord]:
    """The images still to translate, the same in every process of a launch.

    The first process takes in what an earlier run left (index.csv and the journals of a killed run),
    keeps the rows whose image is complete and current, writes them as index.csv (with the manifest's
    current columns) and records every file the run will write and every process's journal in the
    marker, before any is written. The others then read that index.csv, which holds only kept rows.
    """
    out = folder.path
    index_path = out / "index.csv"
    journals = existing_journals(out) if shard.main else []
    rows, note = read_previous_rows(index_path)
    if note and shard.main:
        logger.warning(note)
    rows += [r for p in journals for r in read_journal(p)]
    previous = Previous(folder, rows, model_hash, model_mtime)
    del rows
    done: dict[tuple[str, str], list[dict]] = {}
    todo: list[ImageRecord] = []
    for rec in records:
        kept = previous.done(rec, targets, notices if shard.main else Notices())
        if kept is None:
            todo.append(rec)
        else:
            done[record_key(rec)] = kept
    if not shard.main:
        return todo
    gone = len({k for k in previous.by_key} - {record_key(r) for r in records})
    if gone:
        logger.warning(f"{index_path}: {gone} image(s) listed there are no longer in {input_name}; "
                       "left out of index.csv (their files stay)")
    del previous

    def kept_rows() -> Iterator[dict]:
        for rec in records:  # rows kept as done get the manifest's current columns
            for r in done.get(record_key(rec), []):
                r.update({k: "" for k in columns if k not in r}, **meta(rec))
                if not r.get("edit"):  # a row of a phenolens before edits: its edit was its target
                    r["edit"] = ToCondition(r["target_condition"]).label
                yield r

    merge_journals(index_path, columns, kept_rows(), [], create_empty=False)
    remove_journals(journals, folder)
    planned = [p for rec in todo for recon, paths in [output_paths(folders[record_key(rec)], rec, targets)]
               for p in (recon, *paths.values())]
    folder.record(*planned, *journal_names(shard.world), *journal_names(shard.world, "skipped"))
    return todo


def stream_rows(path: Path) -> Iterator[dict]:
    """The rows of a CSV one at a time (none when it does not exist): memory stays flat on a screen."""
    if not path.is_file():
        return
    with open(path, newline="", encoding="utf-8") as fh:
        yield from csv.DictReader(fh)


def merge_run(folder: OutputFolder, columns: list[str], finished: bool = True) -> None:
    """index.csv = its kept rows + every process's journal; skipped.csv = every process's skipped files.
    A run stopped before its first row makes no index.csv (`measure` would find nothing in it)."""
    out = folder.path
    index_path, skipped_path = out / "index.csv", out / "skipped.csv"
    journals, skipped_journals = existing_journals(out), existing_journals(out, "skipped")
    merge_journals(index_path, columns, stream_rows(index_path), journals, create_empty=finished)
    skipped = [(Path(r["path"]), r["reason"]) for p in skipped_journals for r in read_journal(p)]
    if skipped:
        folder.record(skipped_path.name)
        write_skipped(skipped_path, skipped)
        logger.warning(f"skipped {len(skipped)} unusable file(s); list in {skipped_path}")
    elif skipped_path.is_file() and folder.owns(skipped_path.name):
        skipped_path.unlink()  # from an earlier run whose bad files are now done or gone
    remove_journals([*journals, *skipped_journals], folder)


def translate_batch(model, raws: list[np.ndarray], recs: list[ImageRecord], edits: list,
                    inversion: InversionSettings, guidance_scale: float, seed: int, render_precision: str = "fp32"):
    """One batch of sources (one shape) translated under every edit (Edit values, or condition names):
    what a worker process runs."""
    return model.translate(raws, [r.condition for r in recs], edits, inversion=inversion,
                           guidance_scale=guidance_scale, render_precision=render_precision,
                           generator=[noise_generator(seed, rec, raw) for rec, raw in zip(recs, raws)]
                           if inversion.method == "ef-ddpm" else None)


def minimal_translate_batch(model, raws: list[np.ndarray], recs: list[ImageRecord], edits: list,
                            inversion: InversionSettings, guidance_scale: float, seed: int, render_precision: str,
                            minimal):
    """One batch of sources at their minimal edits (`phenolens.run.minimal_edit`)."""
    gens = [noise_generator(seed, rec, raw) for rec, raw in zip(recs, raws)] if inversion.method == "ef-ddpm" else None
    return minimal_edit_batch(model, raws, recs, edits, inversion, guidance_scale, gens, minimal.judges, minimal.skips,
                              minimal.omegas, render_precision)


@dataclass
class MinimalEdit:
    """What a --minimal-edit run needs besides the translation settings: the judges and the T_skip tried."""

    judges: object
    skips: list[int]
    omegas: list[float] | None = None

    @staticmethod
    def previous_sweep(out: Path, done_keys: set) -> list[dict]:
        """The rows of an earlier sweep.csv whose images are done (resuming keeps them)."""
        import csv

        path = out / SWEEP_FILE
        if not path.is_file():
            return []
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        return [r for r in rows if (r.get("source_path"), r.get("source_condition")) in done_keys]


def check_launch(settings: TranslateSettings, workers: int, shard: Shard) -> None:
    """What a launch of several processes cannot do (said by each process, before anything is written)."""
    if workers != 1:
        raise PhenolensError(f"--workers {workers} under a launch of {shard.world} processes: the launcher already "
                             "starts one process per device; leave --workers out")
    if settings.minimal_edit:
        raise PhenolensError(f"--minimal-edit under a launch of {shard.world} processes: its judges and sweep.csv "
                             "belong to one process; run it without `accelerate launch`")


def check_minimal_edit(settings: TranslateSettings, workers: int) -> list[int]:
    """The options of --minimal-edit, before anything is written; the T_skip values it tries."""
    if workers != 1:
        raise PhenolensError(f"--minimal-edit with --workers {workers}: the judges run in this process; use --workers 1")
    if settings.skip:
        raise PhenolensError(f"--minimal-edit with --skip {settings.skip}: the minimal edit tries its own T_skip "
                             f"values (--strengths); leave --skip out")
    if settings.judge_steps < 1 or settings.max_reference < 1:
        raise PhenolensError("--judge-steps and --max-reference must be at least 1")
    try:
        return sweep_skips(settings.steps, settings.strengths)
    except ValueError as err:
        raise PhenolensError(str(err)) from None


def check_omega_sweep(settings: TranslateSettings, embedded: bool) -> float:
    """--omega-sweep: DIFFusion's minimal edit over several ω; returns the strongest (the ω a bare --to takes,
    so that the edit column names the strongest edit tried)."""
    import math

    if not settings.minimal_edit or not embedded:
        raise PhenolensError("--omega-sweep is for --minimal-edit on a DIFFusion model (`train --method diffusion` "
                             "or `finetune --method kandinsky`)")
    if settings.omega is not None:
        raise PhenolensError("--omega-sweep and --omega: give one (the sweep tries each of its ω)")
    if not all(math.isfinite(w) for w in settings.omega_sweep):
        raise PhenolensError(f"--omega-sweep {','.join(map(str, settings.omega_sweep))}: every ω must be a finite number")
    return max(settings.omega_sweep)


def prepare_minimal_edit(model, settings: TranslateSettings, records: list[ImageRecord], skips: list[int],
                         progress: bool) -> MinimalEdit:
    """Train the judges of --minimal-edit on real images of every condition, at the first source's size."""
    from phenolens.run.class_means import mean_data_of
    from phenolens.run.judges import train_judges

    size = read_image(records[0].path, channels=model.info.channels)[0].shape[1:]
    data = mean_data_of(model, settings.judge_data, settings.input)
    by_condition: dict[str, list] = defaultdict(list)
    for rec in discover(data):
        by_condition[rec.condition].append(rec)
    missing = [c for c in model.conditions if not by_condition.get(c)]
    if missing:
        raise PhenolensError(f"--judge-data {data}: no images of {', '.join(missing)}; the judges need real images of "
                             "every condition of the model")
    logger.info(f"training the judges (oracle ensemble, {settings.judge_steps} steps each) on {data}")
    judges = train_judges(by_condition, model.conditions, size, channels=model.info.channels,
                          normalization=model.info.normalization, max_reference=settings.max_reference,
                          steps=settings.judge_steps, progress=progress)
    return MinimalEdit(judges, skips, sorted(settings.omega_sweep) if settings.omega_sweep else None)


def noise_generator(seed: int, rec: ImageRecord, raw: np.ndarray) -> torch.Generator:
    """EF-DDPM's noise for one image: from --seed, the image's pixels and its condition, so an image gets
    the same draw whatever batch it falls in, whether or not the run was resumed, and wherever its file
    lives (a copied dataset, another machine: a validation re-runs to the same figures)."""
    pixels = np.ascontiguousarray(raw)
    digest = hashlib.sha256(f"{pixels.dtype.str}:{pixels.shape}".encode() + pixels.tobytes()).hexdigest()
    key = f"{seed}:{digest}:{rec.condition}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


def _unique_records(records: list[ImageRecord]) -> list[ImageRecord]:
    """One record per (file, condition): a file listed twice under one condition would write the same
    outputs twice and duplicate its rows."""
    seen: dict[tuple[str, str], ImageRecord] = {}
    for rec in records:
        seen.setdefault((os.path.realpath(rec.path), rec.condition), rec)
    if len(seen) < len(records):
        warn(f"{len(records) - len(seen)} image(s) are listed twice under the same condition; each is translated once")
    return list(seen.values())


def as_stored(raw: np.ndarray, dtype: str) -> np.ndarray:
    """RAW as the output file holds it (integers rounded and clipped to the dtype), so the raw-unit
    error is the error of the file the user gets."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return np.asarray(raw, dtype=np.float64)
    x = np.nan_to_num(np.asarray(raw, dtype=np.float64))
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.clip(np.rint(x), info.min, info.max)
    if dt.kind == "f":
        return x.astype(dt).astype(np.float64)
    return x


@dataclass
class Source:
    """One source read for translation: its record, pixels, layout, clipped fraction and stat stamp."""

    rec: ImageRecord
    raw: np.ndarray
    layout: ImageLayout
    clipped: float
    stamp: tuple[str, str]


def batches_by_shape(records: Sequence[ImageRecord], batch_size: int, channels: list[int] | None,
                     n_channels: int, skip_bad: bool, skipped: list,
                     check: Callable[[Path, np.ndarray, ImageLayout], float] | None = None) -> Iterator[list[Source]]:
    """Read images and yield batches of `Source` that share one shape.

    Images are read lazily, a batch at a time, so a large input never sits in memory whole. CHECK
    (the input check) may refuse an image; with SKIP_BAD it is listed instead.
    """
    pending: dict[tuple, list[Source]] = defaultdict(list)
    for rec in records:
        try:
            stamp = source_stamp(rec.path)  # before reading: a file changed meanwhile is redone next time
            raw, layout = read_image(rec.path, channels=channels)
            if raw.shape[0] != n_channels:
                raise PhenolensError(f"{rec.path}: has {raw.shape[0]} channels, the model expects {n_channels}"
                                     " (pick them with the model's --channels at training)")
            clipped = check(rec.path, raw, layout) if check is not None else 0.0
        except (PhenolensError, OSError) as err:
            if not skip_bad:
                if isinstance(err, OSError):
                    raise PhenolensError(f"{rec.path}: cannot read ({err.strerror or err})") from None
                raise
            skipped.append((rec.path, str(err)))
            continue
        group = pending[raw.shape]
        group.append(Source(rec, raw, layout, clipped, stamp))
        if len(group) == batch_size:
            yield group
            pending[raw.shape] = []
    for group in pending.values():
        if group:
            yield group


__all__ = ["TranslateSettings", "run_translate", "INDEX_COLUMNS", "ImageLayout", "safe_name", "plan_outputs",
           "target_file"]
