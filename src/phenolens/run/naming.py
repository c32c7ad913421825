"""Output names of a translate run: one folder per (source file, condition), one file per target.

Names are unique by construction (issue 9 item 2). An image's folder is its readable stem plus a hash
of its *resolved* path and its condition, never of its manifest row: two files with one stem, one file
listed under two conditions, or a manifest whose rows are reordered or edited can never share or move a
folder, so a row always points at its own files. A target's file is `to-<target>`, plus a hash of the
target unless its name is already a plain, lower-case file name, so `dose 1` / `dose_1`, `High` /
`high` (one file on a case-insensitive disk) and a condition named `reconstruction` never share a file.
Readable parts keep Unicode letters and digits (NFC-normalised); only other characters become `_`.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Sequence

from phenolens.data.records import ImageRecord
from phenolens.errors import PhenolensError
from phenolens.run.notices import warn

_UNSAFE = re.compile(r"[^\w.-]+")  # \w keeps letters and digits of every script
_HASHED = re.compile(r".*-[0-9a-f]{10}")


def safe_name(text: str, limit: int = 60) -> str:
    """A readable file name from TEXT: Unicode letters and digits kept, anything else '_'.

    Readable only: names are made unique by the hash that `plan_outputs` / `target_file` add.
    """
    text = unicodedata.normalize("NFC", str(text))
    return _UNSAFE.sub("_", text).strip("._-")[:limit].rstrip("._-") or "image"


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]


def output_extension(path: Path) -> str:
    return ".png" if path.suffix.lower() == ".png" else ".tif"


def record_key(rec: ImageRecord) -> tuple[str, str]:
    """What identifies a source in index.csv: its path and its condition (the same file may be listed
    under two conditions, and then has two reconstructions)."""
    return str(rec.path), rec.condition


def plan_outputs(records: Sequence[ImageRecord]) -> dict[tuple[str, str], Path]:
    """A folder per (source file, condition): readable stem plus a hash of the resolved path and the
    condition, so it is unique by construction and does not move when a manifest's rows do."""
    folders: dict[tuple[str, str], Path] = {}
    owner: dict[str, tuple[str, str]] = {}
    for rec in records:
        resolved = os.path.realpath(rec.path)
        folder = Path(safe_name(rec.condition)) / f"{safe_name(rec.path.stem)}-{short_hash(resolved, rec.condition)}"
        key = record_key(rec)
        taken = owner.setdefault(folder.as_posix().lower(), key)
        if taken != key and os.path.realpath(taken[0]) != resolved:  # a hash collision: never in practice
            raise PhenolensError(f"{rec.path}: its output folder name {folder} collides with {taken[0]}'s; "
                                 "rename one of the files")
        folders[key] = folder
    return folders


def target_file(target: str, ext: str) -> str:
    """`to-<target>.tif`, with a hash of the target unless its name is already a plain lower-case file
    name: `dose 1` and `dose_1`, or `High` and `high` (one file on macOS), never share a file."""
    readable = safe_name(target)
    if readable != target or readable != readable.lower() or _HASHED.fullmatch(readable):
        return f"to-{readable}-{short_hash(target)}{ext}"
    return f"to-{readable}{ext}"


def unique_targets(targets: Sequence[str]) -> list[str]:
    """--to once per condition: a repeated target would duplicate rows (and files)."""
    counts = Counter(targets)
    twice = [t for t, n in counts.items() if n > 1]
    if twice:
        warn(f"--to lists {', '.join(twice)} more than once; each target is translated once")
    return list(dict.fromkeys(targets))


def meta_column_names(records: Sequence[ImageRecord], reserved: Sequence[str], source: str) -> dict[str, str]:
    """Manifest column -> index.csv column. A manifest column named like an output column is renamed
    (`manifest_<name>`) rather than dropped or allowed to overwrite ours; said on stderr."""
    taken = set(reserved)
    names: dict[str, str] = {}
    for col in dict.fromkeys(k for r in records for k in r.meta):
        new = col
        while new in taken:
            new = f"manifest_{new}"
        if new != col:
            warn(f"{source}: manifest column {col!r} is also an index.csv column; written as {new!r}")
        taken.add(new)
        names[col] = new
    return names


def output_paths(folder: Path, rec: ImageRecord, targets: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    """(reconstruction, {target: file}) of one source, relative to the run folder; the source's own
    condition maps to its reconstruction."""
    ext = output_extension(rec.path)
    recon = folder / f"reconstruction{ext}"
    return recon, {t: recon if t == rec.condition else folder / target_file(t, ext) for t in targets}
