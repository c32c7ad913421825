"""The `phenolens translate` run: every source image inverted once, rendered under each target.

A run folder holds::

    run.json                       the settings (model, input, steps, seed, inversion ...)
    index.csv                      one row per (source, target); the target equal to the source
                                   is the reconstruction (kind = reconstruction)
    <source condition>/<image>/reconstruction.tif, <target>.tif   same dtype/layout as the source
    skipped.csv                    files that could not be read (--skip-bad)

Outputs are written atomically and `index.csv` is rewritten after every batch, so a killed run
resumes where it stopped; a re-run with the same settings skips what is done. Later stages
(measure, report) consume `index.csv` whatever method made the images.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from phenolens.atomic import write_csv_atomic, write_json_atomic
from phenolens.data.io import ImageLayout, read_image, write_image
from phenolens.data.records import ImageRecord, discover
from phenolens.errors import PhenolensError
from phenolens.methods.core import load_model_for, psnr_from_mse
from phenolens.methods.phendiff import write_skipped
from phenolens.run.index import INDEX_COLUMNS, read_index

# extra index.csv columns of a latent model (Phen-LDiff): the same errors in the diffusion space, and
# the VAE's own round-trip error, the floor under the pixel-space reconstruction error
LATENT_COLUMNS = ["latent_recon_mse", "latent_change_mse", "autoencoder_mse"]



@dataclass
class TranslateSettings:
    """What decides the numbers in a run; a re-run with other settings needs --overwrite."""

    model_dir: str
    input: str
    targets: list[str] | None = None
    source: str | None = None
    steps: int = 50
    seed: int = 0
    inversion: str = "fixed-point"
    inversion_iters: int = 5
    batch_size: int = 16
    guidance_scale: float = 1.0  # classifier-free guidance of the targets; 1 = none (exact inversion)


def output_extension(path: Path) -> str:
    return ".png" if path.suffix.lower() == ".png" else ".tif"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


def plan_outputs(records: Sequence[ImageRecord]) -> dict[Path, Path]:
    """A folder per source image, unique even when two sources share a file name."""
    seen: dict[str, int] = defaultdict(int)
    folders = {}
    for rec in records:
        key = f"{safe_name(rec.condition)}/{safe_name(rec.path.stem)}"
        seen[key] += 1
        if seen[key] > 1:
            key = f"{key}_{seen[key]}"
        folders[rec.path] = Path(key)
    return folders


def prepare_run_folder(out: Path, settings: TranslateSettings, overwrite: bool) -> None:
    """Refuse to mix results of different settings in one folder unless told to replace them."""
    run_json = out / "run.json"
    wanted = asdict(settings)
    if out.exists() and any(out.iterdir()):
        previous = json.loads(run_json.read_text()) if run_json.is_file() else None
        if previous is not None:  # a run from before a setting existed used its default
            defaults = asdict(TranslateSettings(model_dir="", input=""))
            previous = {k: previous.get(k, defaults.get(k)) for k in wanted}
        if overwrite:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif previous is None:
            raise PhenolensError(f"{out}: folder is not empty and holds no phenolens run; choose another OUT or pass --overwrite")
        elif previous != wanted:
            diff = ", ".join(k for k in wanted if previous.get(k) != wanted[k])
            raise PhenolensError(f"{out}: holds a run with other settings ({diff}); pass --overwrite to replace it or choose another OUT")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_json, wanted)


def run_translate(settings: TranslateSettings, out: str | Path, *, overwrite: bool = False,
                  skip_bad: bool = False, device: str | None = None, progress: bool = True) -> Path:
    """Translate every image of INPUT to every target; returns the path of index.csv."""
    out = Path(out)
    model = load_model_for(settings.model_dir, device=device)
    records = discover(settings.input, condition=settings.source)
    for rec in records:
        model.info.condition_index(rec.condition, "--from" if settings.source else f"source condition of {rec.path}")
    targets = settings.targets or model.conditions
    for t in targets:
        model.info.condition_index(t, "--to")
    if settings.steps < 1:
        raise PhenolensError(f"--steps must be at least 1, got {settings.steps}")
    prepare_run_folder(out, settings, overwrite)

    index_path = out / "index.csv"
    rows = read_index(index_path)
    done = {r["source_path"] for r in rows if all((out / p).is_file() for p in (r["output_path"], r["reconstruction_path"]))}
    rows = [r for r in rows if r["source_path"] in done]
    folders = plan_outputs(records)
    todo = [r for r in records if str(r.path) not in done]
    meta_columns = list(dict.fromkeys(k for r in records for k in r.meta if k not in INDEX_COLUMNS))
    latent_columns = LATENT_COLUMNS if model.latent else []
    columns = INDEX_COLUMNS + latent_columns + meta_columns
    skipped: list[tuple[Path, str]] = []

    torch.manual_seed(settings.seed)
    bar = tqdm(total=len(todo), desc="translate", unit="img", disable=None if progress else True)  # no bar when not a terminal
    for batch in batches_by_shape(todo, settings.batch_size, model.info.channels, model.info.n_channels,
                                  skip_bad, skipped):
        recs = [rec for rec, _, _ in batch]
        raws = [raw for _, raw, _ in batch]
        result = model.translate(raws, [r.condition for r in recs], targets, steps=settings.steps,
                                 inversion=settings.inversion, iters=settings.inversion_iters,
                                 guidance_scale=settings.guidance_scale)
        for i, (rec, _, layout) in enumerate(batch):
            folder = folders[rec.path]
            ext = output_extension(rec.path)
            recon_rel = folder / f"reconstruction{ext}"
            write_image(out / recon_rel, result.reconstructions[i], layout)
            recon_mse = float(result.recon_mse[i])
            common = dict(source_path=str(rec.path), source_condition=rec.condition,
                          recon_mse=f"{recon_mse:.6g}", recon_psnr=f"{float(psnr_from_mse(recon_mse)):.3f}",
                          reconstruction_path=str(recon_rel), **{k: rec.meta.get(k, "") for k in meta_columns})
            if model.latent:
                common.update(latent_recon_mse=f"{float(result.latent_recon_mse[i]):.6g}",
                              autoencoder_mse=f"{float(result.autoencoder_mse[i]):.6g}")
            for target in targets:
                if target == rec.condition:
                    rel, kind = recon_rel, "reconstruction"
                else:
                    rel, kind = folder / f"{safe_name(target)}{ext}", "translation"
                    write_image(out / rel, result.translations[target][i], layout)
                row = dict(common, target_condition=target, output_path=str(rel), kind=kind,
                           change_mse=f"{float(result.change_mse[target][i]):.6g}")
                if model.latent:
                    row["latent_change_mse"] = f"{float(result.latent_change_mse[target][i]):.6g}"
                rows.append(row)
        write_csv_atomic(index_path, rows, columns)
        bar.update(len(batch))
    bar.close()
    if not rows:
        write_csv_atomic(index_path, rows, columns)
    if skipped:
        write_skipped(out / "skipped.csv", skipped)
        print(f"skipped {len(skipped)} unreadable file(s); list in {out / 'skipped.csv'}")
    return index_path


def batches_by_shape(records: Sequence[ImageRecord], batch_size: int, channels: list[int] | None,
                     n_channels: int, skip_bad: bool, skipped: list):
    """Read images and yield batches of (record, raw CHW, layout) that share one shape.

    Images are read lazily, a batch at a time, so a large input never sits in memory whole.
    """
    pending: dict[tuple, list] = defaultdict(list)
    for rec in records:
        try:
            raw, layout = read_image(rec.path, channels=channels)
            if raw.shape[0] != n_channels:
                raise PhenolensError(f"{rec.path}: has {raw.shape[0]} channels, the model expects {n_channels}"
                                     " (pick them with the model's --channels at training)")
        except PhenolensError as err:
            if not skip_bad:
                raise
            skipped.append((rec.path, str(err)))
            continue
        group = pending[raw.shape]
        group.append((rec, raw, layout))
        if len(group) == batch_size:
            yield group
            pending[raw.shape] = []
    for group in pending.values():
        if group:
            yield group


__all__ = ["TranslateSettings", "run_translate", "INDEX_COLUMNS", "ImageLayout"]
