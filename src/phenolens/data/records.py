"""Find the images of a data set and their conditions.

Three ways to point phenolens at images, so users need not reorganise their data:
  (a) a CSV manifest `path,condition[,more columns]` (extra columns travel along as `meta`);
  (b) a dataset root with one sub-folder per condition (`ROOT/<condition>/*.tif|*.tiff|*.png`);
  (c) one folder of images of a single condition (the folder's name, unless given).
Sub-folders starting with `_` or `.` are ignored (the simulator keeps ground truth in `_groundtruth/`).

Condition order matters (a dose series keeps it in the model, the report's dose strips and the
dose correlations), so a folder per condition is not listed alphabetically (control, high, low,
mid): a `manifest.csv` beside the folders gives the order (first appearance of each condition);
without one, a control-like name comes first and the others follow in natural order, numbers
compared as numbers (dose_2 < dose_10, 0.1uM < 1uM < 10uM). `condition_order_source` says which rule
applied, so commands can print it.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, TypeVar

import numpy as np

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


CONTROL_NAMES = ("control", "ctrl", "dmso", "untreated", "vehicle", "mock", "wt", "wildtype", "negative")
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")


def is_control_like(name: str) -> bool:
    """Whether a condition name reads as an untreated control (DMSO, ctrl_1, neg-control, wild-type, ...)."""
    words = re.split(r"[^a-z]+", name.lower())
    return any(w in CONTROL_NAMES for w in words) or re.sub(r"[^a-z]", "", name.lower()) in CONTROL_NAMES


def dose_key(name: str) -> tuple:
    """Sort key for condition names: control-like first, then natural order with decimal numbers
    compared as numbers (0.1uM < 1uM < 10uM, dose_2 < dose_10), then case-insensitive text."""
    parts: list = []
    pos = 0
    for m in _NUMBER.finditer(name):
        parts.append((1, 0.0, name[pos:m.start()].lower()))
        parts.append((0, float(m.group()), ""))
        pos = m.end()
    parts.append((1, 0.0, name[pos:].lower()))
    return (0 if is_control_like(name) else 1, parts, name)


def _manifest_condition_order(manifest: Path) -> list[str] | None:
    """Conditions of a manifest.csv in order of first appearance; None if it is absent or unreadable."""
    if not manifest.is_file():
        return None
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = [c.strip() for c in (reader.fieldnames or [])]
            if "condition" not in reader.fieldnames:
                return None
            return list(dict.fromkeys(c for c in ((row.get("condition") or "").strip() for row in reader) if c))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def order_condition_folders(root: Path, names: Sequence[str]) -> tuple[list[str], str]:
    """(condition folder names in order, which rule gave it): manifest.csv beside them, else dose_key."""
    listed = _manifest_condition_order(root / "manifest.csv") or []
    listed = [c for c in listed if c in names]
    rest = sorted((n for n in names if n not in listed), key=dose_key)
    if listed:
        how = f"as listed in {root / 'manifest.csv'}" + (", then natural order" if rest else "")
        return listed + rest, how
    return rest, "control-like name first, then natural order with numbers compared as numbers"


def condition_order_source(input: Path | str) -> str:
    """How `discover` ordered the conditions of INPUT, to print beside the order at train time."""
    root = Path(input)
    if root.is_file():
        return f"order of first appearance in {root}" if root.suffix.lower() == ".csv" else "one image"
    if root.is_dir():
        names = [p.name for p in root.iterdir() if p.is_dir() and not _ignored(p)]
        if names:
            return order_condition_folders(root, names)[1]
    return "one folder, one condition"


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".") and is_image_file(p)),
                  key=lambda p: natural_key(p.name))


def discover(input: Path | str, *, condition: str | None = None) -> list[ImageRecord]:
    """Records for a manifest CSV, a folder per condition, or a single-condition folder.

    CONDITION keeps only that condition for (a)/(b) and names the images for (c). Records come
    condition by condition in the dataset's condition order (see the module docstring).
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

    subdirs = [p for p in root.iterdir() if p.is_dir() and not _ignored(p)]
    order, _ = order_condition_folders(root, [d.name for d in subdirs])
    per_condition = {name: _images_in(root / name) for name in order}
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
            seen: dict[tuple[str, str], int] = {}  # (resolved file, condition) -> first line
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
                key = (str(path.resolve()), cond)
                if key in seen:
                    raise PhenolensError(f"{manifest}: rows {seen[key]} and {n} both list {text} under condition "
                                         f"{cond!r}; remove the duplicate row (each image once per condition)")
                seen[key] = n
                meta = {c: (row.get(c) or "").strip() for c in extra}
                records.append(ImageRecord(path, cond, meta))
    except UnicodeDecodeError:
        raise PhenolensError(f"{manifest}: not a UTF-8 text CSV file") from None
    except csv.Error as exc:
        raise PhenolensError(f"{manifest}: cannot parse CSV ({exc})") from None
    if not records:
        raise PhenolensError(f"{manifest}: no rows")
    return records


T = TypeVar("T")


def pick_evenly(items: Sequence[T], n: int) -> list[T]:
    """At most N of ITEMS, spread evenly from first to last (both kept), so a capped sample of a
    condition's images still covers every plate or well the listing walks through."""
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


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
