"""Find the images of a data set and their conditions.

Three ways to point phenolens at images, so users need not reorganise their data:
  (a) a CSV manifest `path,condition[,more columns]` (extra columns travel along as `meta`);
  (b) a dataset root with one sub-folder per condition (`ROOT/<condition>/*.tif|*.tiff|*.png`);
  (c) one folder of images of a single condition (the folder's name, unless given).
Sub-folders starting with `_` or `.` are ignored (the simulator keeps ground truth in `_groundtruth/`).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from phenolens.data.io import IMAGE_SUFFIXES
from phenolens.errors import PhenolensError


@dataclass
class ImageRecord:
    """One image: where it is, its condition, and any extra manifest columns (in manifest order)."""

    path: Path
    condition: str
    meta: dict[str, str] = field(default_factory=dict)


def natural_key(text: str) -> list:
    """Sort key so that 'img2' < 'img10' (digits compared as numbers), case-insensitive."""
    return [(0, int(tok), tok) if tok.isdigit() else (1, 0, tok.lower()) for tok in re.split(r"(\d+)", text)]


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _ignored(path: Path) -> bool:
    return path.name.startswith(("_", "."))


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".") and is_image_file(p)),
                  key=lambda p: natural_key(p.name))


def discover(input: Path | str, *, condition: str | None = None) -> list[ImageRecord]:
    """Records for a manifest CSV, a folder per condition, or a single-condition folder.

    CONDITION keeps only that condition for (a)/(b) and names the images for (c).
    """
    root = Path(input)
    if not root.exists():
        raise PhenolensError(f"{root}: does not exist")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return _filter(_read_manifest(root), condition, root)
        if root.suffix.lower() in IMAGE_SUFFIXES:  # a single image: its folder names the condition
            return [ImageRecord(root, condition or root.resolve().parent.name, {})]
        raise PhenolensError(f"{root}: expected a folder of images, a folder per condition, or a .csv manifest")
    if not root.is_dir():
        raise PhenolensError(f"{root}: is neither a file nor a folder")

    subdirs = sorted((p for p in root.iterdir() if p.is_dir() and not _ignored(p)), key=lambda p: natural_key(p.name))
    per_condition = {d.name: _images_in(d) for d in subdirs}
    direct = _images_in(root)
    if any(per_condition.values()) or (subdirs and not direct):
        # (b) one sub-folder per condition; images at root level are ignored
        empty = [name for name, paths in per_condition.items() if not paths]
        if empty:
            raise PhenolensError(f"{root / empty[0]}: condition folder '{empty[0]}' has no images "
                                 f"({', '.join(IMAGE_SUFFIXES)}); remove it or add images")
        records = [ImageRecord(p, name, {}) for name, paths in per_condition.items() for p in paths]
        return _filter(records, condition, root)
    if direct:
        # (c) a folder of one condition
        name = condition or root.resolve().name
        return [ImageRecord(p, name, {}) for p in direct]
    raise PhenolensError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) and no condition sub-folders found")


def _filter(records: list[ImageRecord], condition: str | None, source: Path) -> list[ImageRecord]:
    if condition is None:
        return records
    kept = [r for r in records if r.condition == condition]
    if not kept:
        found = ", ".join(conditions_in_order(records)) or "none"
        raise PhenolensError(f"--from {condition}: no such condition in {source} (found: {found})")
    return kept


def _read_manifest(manifest: Path) -> list[ImageRecord]:
    """Read a CSV manifest; rows are numbered as in a spreadsheet (the header is row 1)."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in ("path", "condition") if c not in columns]
            if missing:
                raise PhenolensError(f"{manifest}: missing column(s) {', '.join(missing)} "
                                     f"(found: {', '.join(columns) or 'no header'}); need path,condition")
            reader.fieldnames = columns
            extra = [c for c in columns if c not in ("path", "condition") and c]
            records: list[ImageRecord] = []
            for row in reader:
                n = reader.line_num  # physical line; equals the spreadsheet row for plain CSV
                if all(not (v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue
                text = (row.get("path") or "").strip()
                cond = (row.get("condition") or "").strip()
                if not text:
                    raise PhenolensError(f"{manifest} row {n}: empty path")
                if not cond:
                    raise PhenolensError(f"{manifest} row {n}: {text}: empty condition")
                path = Path(text).expanduser()
                if not path.is_absolute():
                    path = manifest.parent / path
                if not path.is_file():
                    raise PhenolensError(f"{manifest} row {n}: {text}: file not found ({path})")
                meta = {c: (row.get(c) or "").strip() for c in extra}
                records.append(ImageRecord(path, cond, meta))
    except UnicodeDecodeError:
        raise PhenolensError(f"{manifest}: not a UTF-8 text CSV file") from None
    except csv.Error as exc:
        raise PhenolensError(f"{manifest}: cannot parse CSV ({exc})") from None
    if not records:
        raise PhenolensError(f"{manifest}: no rows")
    return records


def conditions_in_order(records: Iterable[ImageRecord]) -> list[str]:
    """Conditions in order of first appearance."""
    return list(dict.fromkeys(r.condition for r in records))


def validate_training_conditions(conditions: Sequence[str]) -> None:
    """Training contrasts conditions, so it needs at least two."""
    conditions = list(conditions)
    if len(conditions) < 2:
        raise PhenolensError(f"training needs at least 2 conditions, found {len(conditions)}"
                             f"{': ' + ', '.join(conditions) if conditions else ''}")


def training_records(data: Path | str, wanted: Sequence[str] | None = None) -> tuple[list[ImageRecord], list[str]]:
    """The images of DATA and the conditions to train on, in WANTED's order when given (a dose
    series keeps its order in the model), checked against what DATA holds."""
    records = discover(data)
    found = conditions_in_order(records)
    conditions = list(wanted) if wanted else found
    unknown = sorted(set(conditions) - set(found))
    if unknown:
        raise PhenolensError(f"--conditions names {', '.join(unknown)}, not found in {data} (found: {', '.join(found)})")
    missing = [c for c in found if c not in conditions]
    if missing:
        raise PhenolensError(f"--conditions leaves out {', '.join(missing)}, found in {data}; list every condition")
    validate_training_conditions(conditions)
    return records, conditions
