"""`phenolens crop SCREEN OUT`: a screen's whole fields in, a single-cell crop dataset out.

Layout written into OUT (a dataset `phenolens train OUT` reads as it is)::

    OUT/<condition>/<field>_n<label>.tif    uint16 (C, size, size) crops, channel names in the metadata
    OUT/manifest.csv     path, condition, field, nucleus, every metadata column, the source file of each
                         channel (source_<channel>), the crop's window in the field (center_y, center_x,
                         y0, x0, y1, x1, in field pixels), scale, nucleus_area, plate: a translated crop
                         can be traced back to its field
    OUT/fields.csv       one row per field: nuclei found, crops kept, skipped at the border / for overlap
    OUT/crop_settings.json   the options, checked on resume
    OUT/_plates/         per-plate illumination functions (TIFF) and intensity levels, when asked for
    OUT/_fields/<field>.json   a field's rows, written once its crops are: the resume record

Streaming: fields are read one at a time (per worker); the plate corrections take one extra pass
over a plate's fields first. Resumable: a field with its `_fields` record is done; a killed run
redoes at most the fields in flight. Safe: OUT follows the output-folder rules (`folders.py`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tifffile

from phenolens.atomic import write_bytes_atomic, write_csv_atomic, write_json_atomic
from phenolens.data.io import read_image
from phenolens.errors import PhenolensError
from phenolens.folders import MARKER, OutputFolder, check_apart
from phenolens.run.notices import Notices, warn
from phenolens.screen.cells import CropSettings, cut, find_nuclei, plan_crops
from phenolens.screen.fields import Field
from phenolens.screen.plates import (MIN_FIELDS_FOR_ILLUMINATION, PlateSummary, field_contribution,
                                     illumination_function, normalise, plate_levels)
from phenolens.screen.read import check_field_depth, check_screen_bit_depth, read_field
from phenolens.screen.sources import Screen

KIND = "crops"
MANIFEST, FIELDS_TABLE, SETTINGS_FILE = "manifest.csv", "fields.csv", "crop_settings.json"
RECORDS, PLATES = "_fields", "_plates"
_CROP_NAME = re.compile(r"^\.?[^/]+_n\d+\.tif(\.tmp-\d+)?$")  # a crop, or its temporary while written
FIELD_COLUMNS = ["field", "condition", "plate", "nuclei", "crops", "skipped_border", "skipped_overlap", "files"]


@dataclass(frozen=True)
class CropRun:
    """Everything a crop run decides besides the screen itself."""

    crop: CropSettings
    illumination: bool = False
    normalize: str = "none"  # none | plate
    labels: str | None = None  # folder of the user's nucleus label images
    workers: int = 1

    def check(self) -> None:
        self.crop.check()
        if self.normalize not in ("none", "plate"):
            raise PhenolensError(f"--normalize {self.normalize!r}: choose none or plate")
        if self.workers < 1:
            raise PhenolensError(f"--workers must be at least 1 (got {self.workers})")
        if self.labels is not None and not Path(self.labels).is_dir():
            raise PhenolensError(f"--labels {self.labels}: not a folder")


def crop_screen(screen: Screen, out: Path, run: CropRun, *, nuclei_channel: str | None = None,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Crop every field of SCREEN into OUT (see the module docstring); returns a summary."""
    run.check()
    run = replace(run, crop=replace(run.crop, nuclei_channel=screen.nuclei_channel(nuclei_channel)))
    out = Path(out)
    check_apart(out, inputs=screen.inputs + ([Path(run.labels)] if run.labels else []))
    depth = check_screen_bit_depth(screen.fields)
    if overwrite and (out / MARKER).is_file():
        _remove_crops(OutputFolder.open(out, KIND))
    folder = OutputFolder.open(out, KIND, overwrite=overwrite)
    recorded = _settings_record(screen, run)
    _check_resume(folder, recorded)
    write_json_atomic(out / SETTINGS_FILE, recorded)
    for rel in (SETTINGS_FILE, RECORDS, PLATES):
        folder.record(rel, save=False)
    folder.record(MANIFEST, FIELDS_TABLE)
    (out / RECORDS).mkdir(exist_ok=True)

    corrections = _plate_corrections(screen, out, run, progress)
    done = {p.stem for p in (out / RECORDS).glob("*.json")}
    todo = [f for f in screen.fields if f.key not in done]
    notices = Notices()
    for key, record in _map(todo, run, str(out), screen.channels, corrections, depth, progress):
        write_json_atomic(out / RECORDS / f"{key}.json", record)
        if record["summary"]["nuclei"] == 0:
            notices.add("no-nuclei", f"field {key} ({record['summary']['files'].split(';')[0]}): no nuclei found in "
                        f"the {screen.channels[run.crop.nuclei_channel]} channel; no crops from it",
                        "{n} fields had no nuclei (listed in fields.csv with nuclei 0)")
    notices.close()
    return _write_tables(screen, out, depth)


def _settings_record(screen: Screen, run: CropRun) -> dict:
    return dict(source=screen.source, channels=screen.channels, fields=len(screen.fields),
                conditions=list(dict.fromkeys(f.condition for f in screen.fields)),
                crop=asdict(run.crop), illumination=run.illumination, normalize=run.normalize, labels=run.labels)


def _remove_crops(folder: OutputFolder) -> None:
    """--overwrite: remove the crops an earlier run wrote (files named `<field>_n<label>.tif`, and
    half-written temporaries, in the condition folders its settings list), then the folders it
    leaves empty. Why not the whole folders: a crop folder may have received a user's files since,
    and phenolens only ever deletes what it wrote. (The crops are not listed one by one in the
    marker: a screen has millions.)"""
    try:
        conditions = json.loads((folder.path / SETTINGS_FILE).read_text()).get("conditions") or []
    except (OSError, ValueError):
        return
    for cond in conditions:
        d = folder.path / str(cond)
        if not d.is_dir() or d.is_symlink() or d.resolve().parent != folder.path.resolve():
            continue
        for p in d.iterdir():
            if p.is_file() and not p.is_symlink() and _CROP_NAME.match(p.name):
                p.unlink()
        if not any(d.iterdir()):
            d.rmdir()


def _check_resume(folder: OutputFolder, recorded: dict) -> None:
    path = folder.path / SETTINGS_FILE
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    flat = lambda d: {**{k: d.get(k) for k in ("channels", "illumination", "normalize", "labels")},  # noqa: E731
                      **(d.get("crop") or {})}
    then, now = flat(before), flat(recorded)
    changed = [k for k in now if then.get(k) != now[k]]
    if changed:
        k = changed[0]
        option = "--channel-names" if k == "channels" else "--" + k.replace("_", "-")
        raise PhenolensError(f"OUT {folder.path}: was cropped with other settings ({option} {then.get(k)} then, "
                             f"{now[k]} now); resume with the same options, or start again with --overwrite")


# ------------------------------------------------------------------------------------- plates
def _plate_corrections(screen: Screen, out: Path, run: CropRun, progress: bool) -> dict[str, dict]:
    """Per plate: {'illumination': path of its flat-field TIFF or None, 'levels': (C, 2) or None}."""
    plates: dict[str, list[Field]] = {}
    for f in screen.fields:
        plates.setdefault(f.plate, []).append(f)
    result = {p: {"illumination": None, "levels": None} for p in plates}
    if not run.illumination and run.normalize == "none":
        return result
    (out / PLATES).mkdir(exist_ok=True)
    for plate, fields in plates.items():
        name = plate or "all"
        illum_path = out / PLATES / f"{name}_illumination.tif"
        levels_path = out / PLATES / f"{name}_levels.json"
        if run.illumination:
            if not illum_path.is_file():
                if len(fields) < MIN_FIELDS_FOR_ILLUMINATION:
                    warn(f"plate {name}: {len(fields)} field(s) to estimate its illumination from; with fewer than "
                         f"{MIN_FIELDS_FOR_ILLUMINATION} the cells do not average away and the correction may carry them")
                summary, shape = _summarise(fields, None, f"illumination {name}", progress)
                _write_tiff(illum_path, illumination_function(summary, shape), screen.channels, "float32")
            result[plate]["illumination"] = str(illum_path)
        if run.normalize == "plate":
            if not levels_path.is_file():
                illum = _load_illumination(str(illum_path)) if run.illumination else None
                summary, _ = _summarise(fields, illum, f"levels {name}", progress)
                write_json_atomic(levels_path, {"channels": screen.channels, "percentiles": [0.1, 99.9],
                                                "levels": plate_levels(summary).tolist()})
            result[plate]["levels"] = json.loads(levels_path.read_text())["levels"]
    return result


def _summarise(fields: Sequence[Field], illumination: np.ndarray | None, what: str,
               progress: bool) -> tuple[PlateSummary, tuple[int, int]]:
    from tqdm.auto import tqdm

    summary = PlateSummary()
    shape: tuple[int, ...] | None = None
    for f in tqdm(fields, desc=what, unit="field", disable=None if progress else True):
        image, _ = read_field(f)
        shape = shape or image.shape
        _check_plate_size(f, image, shape)
        summary.add(*field_contribution(image, illumination, len(fields)))
    return summary, shape[1:]


def _check_plate_size(field: Field, image: np.ndarray, shape: tuple[int, ...]) -> None:
    """A plate's corrections need its fields to share one size: one line naming the field that does not."""
    if image.shape[1:] != tuple(shape[-2:]):
        raise PhenolensError(f"field {field.key}: is {image.shape[2]}x{image.shape[1]} px, other fields of its plate "
                             f"are {shape[-1]}x{shape[-2]}; crop plates of one field size")


@lru_cache(maxsize=4)
def _load_illumination(path: str) -> np.ndarray:
    data = tifffile.imread(path).astype(np.float32)
    return data.reshape(-1, *data.shape[-2:])


# ------------------------------------------------------------------------------------- fields
def crop_field(field: Field, run: CropRun, out: str, channels: Sequence[str], correction: dict,
               depth: str = "") -> tuple[str, dict]:
    """Crop one field: read, correct, find nuclei, cut and write the kept crops; its record. DEPTH:
    the screen's bit depth, which the field's files must share."""
    image, dtype = read_field(field)
    check_field_depth(field, dtype, depth)
    if correction["illumination"]:
        illum = _load_illumination(correction["illumination"])
        _check_plate_size(field, image, illum.shape)
        image = image / illum
    s = run.crop
    labels = _user_labels(field, run.labels, image.shape[1:]) if run.labels else find_nuclei(image[s.nuclei_channel], s)
    nuclei = plan_crops(labels, s)
    fill = np.median(image.reshape(image.shape[0], -1), axis=1).astype(np.float32)
    levels = np.asarray(correction["levels"]) if correction["levels"] is not None else None
    rows = []
    (Path(out) / field.condition).mkdir(exist_ok=True)
    for nuc in nuclei:
        if nuc.status != "kept":
            continue
        crop = cut(image, nuc, s, fill)
        if levels is not None:
            crop = normalise(crop, levels)
        rel = f"{field.condition}/{field.key}_n{nuc.label}.tif"
        _write_tiff(Path(out) / rel, np.clip(np.rint(crop), 0, 65535), channels, "uint16")
        rows.append(dict(path=rel, condition=field.condition, field=field.key, nucleus=nuc.label, **field.meta,
                         **{f"source_{c}": str(src.path) + ("" if src.index is None else f"#{src.index}")
                            for c, src in field.channels.items()},
                         center_y=round(nuc.center_y, 2), center_x=round(nuc.center_x, 2), y0=nuc.y0, x0=nuc.x0,
                         y1=nuc.y0 + s.window, x1=nuc.x0 + s.window, scale=s.scale, nucleus_area=nuc.area,
                         plate=field.plate))
    summary = dict(field=field.key, condition=field.condition, plate=field.plate, nuclei=len(nuclei), crops=len(rows),
                   skipped_border=sum(n.status == "border" for n in nuclei),
                   skipped_overlap=sum(n.status == "overlap" for n in nuclei),
                   files=";".join(str(p) for p in field.files()))
    return field.key, {"summary": summary, "rows": rows}


def _user_labels(field: Field, folder: str, shape: tuple[int, ...]) -> np.ndarray:
    """The user's nucleus labels for FIELD: `<field>_nuclei.tif` or `<DNA file stem>_nuclei.tif` in FOLDER."""
    names = [f"{field.key}_nuclei.tif"] + [f"{src.path.stem}_nuclei.tif" for src in field.channels.values()]
    for name in names:
        path = Path(folder) / name
        if path.is_file():
            lab = read_image(path)[0][0].astype(np.int32)
            if lab.shape != tuple(shape):
                raise PhenolensError(f"{path}: labels are {lab.shape[1]}x{lab.shape[0]} but field {field.key} is "
                                     f"{shape[1]}x{shape[0]}")
            return lab
    raise PhenolensError(f"--labels {folder}: no label image for field {field.key} (looked for {', '.join(names[:2])})")


def _write_tiff(path: Path, data: np.ndarray, channels: Sequence[str], dtype: str) -> None:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data.astype(dtype), photometric="minisblack", compression="zlib",
                     metadata={"axes": "CYX", "Channel": {"Name": list(channels)}})
    write_bytes_atomic(path, buf.getvalue())


def _map(fields: list[Field], run: CropRun, out: str, channels: Sequence[str], corrections: dict, depth: str,
         progress: bool) -> Iterator[tuple[str, dict]]:
    """crop_field over FIELDS in order, in WORKERS processes when more than one; a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(fields), desc="crop", unit="field", disable=None if progress else True)
    jobs: Iterable = ((f, run, out, channels, corrections[f.plate], depth) for f in fields)
    try:
        if run.workers <= 1 or len(fields) < 2:
            results: Iterable = (crop_field(*j) for j in jobs)
            yield from _counted(results, bar)
        else:
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(max_workers=run.workers, mp_context=get_context(method)) as ex:
                yield from _counted(ex.map(crop_field, *zip(*jobs)), bar)
    finally:
        bar.close()


def _counted(results: Iterable[tuple[str, dict]], bar) -> Iterator[tuple[str, dict]]:
    crops = 0
    for key, record in results:
        crops += record["summary"]["crops"]
        bar.set_postfix(crops=crops, refresh=False)
        bar.update()
        yield key, record


# ------------------------------------------------------------------------------------- tables
def _write_tables(screen: Screen, out: Path, depth: str) -> dict:
    """manifest.csv and fields.csv from the per-field records, in the screen's field order. The
    manifest is written row by row (a screen's crops may number millions), to a temporary file
    renamed into place at the end, so a reader never sees half of it."""
    summaries = []
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    crops = 0
    try:
        with open(tmp, "w", newline="") as fh:
            writer = None
            for f in screen.fields:
                record = json.loads((out / RECORDS / f"{f.key}.json").read_text())
                summaries.append(record["summary"])
                for row in record["rows"]:
                    if writer is None:  # every field of a screen has the same metadata columns
                        writer = csv.DictWriter(fh, fieldnames=list(row), extrasaction="ignore")
                        writer.writeheader()
                    writer.writerow(row)
                    crops += 1
        write_csv_atomic(out / FIELDS_TABLE, summaries, FIELD_COLUMNS)
        if not crops:
            raise PhenolensError(f"no crops from any of the {len(summaries)} field(s) of {screen.source}: no nuclei "
                                 "were found or every nucleus was skipped (see fields.csv); check --nuclei-channel, "
                                 "--nucleus-diameter, --size and --border")
        os.replace(tmp, out / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)
    return dict(fields=len(summaries), nuclei=sum(s["nuclei"] for s in summaries), crops=crops,
                skipped_border=sum(s["skipped_border"] for s in summaries),
                skipped_overlap=sum(s["skipped_overlap"] for s in summaries),
                empty_fields=sum(s["nuclei"] == 0 for s in summaries), bit_depth=depth)


__all__ = ["CropRun", "crop_field", "crop_screen"]
