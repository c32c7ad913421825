"""What a translate run was made from, and whether an earlier run's rows are still current.

`model_fingerprint` hashes the model's files (cached by size and mtime in provenance.json), and
`source_stamp` is a source's size and mtime; both go into every index.csv row. `Previous` reads an
earlier run's index.csv and keeps an image's rows only if they are complete, their files are inside the
run folder and claimed by no other image, and neither the model nor the source changed since.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from phenolens.data.records import ImageRecord
from phenolens.folders import OutputFolder
from phenolens.models.store import INFO_FILE
from phenolens.run.index import REQUIRED_COLUMNS
from phenolens.run.naming import record_key
from phenolens.run.notices import Notices

# the files that make a model (phendiff: unet/ + scheduler/; phenldiff: adapter/ + embeddings + scheduler/)
MODEL_PARTS = (INFO_FILE, "unet", "scheduler", "adapter", "condition_embeddings.safetensors")


def _model_files(model_dir: Path) -> list[Path]:
    files: list[Path] = []
    for part in MODEL_PARTS:
        p = model_dir / part
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return files


def model_fingerprint(model_dir: Path, cache: dict) -> tuple[str, dict, int]:
    """(hash of the model's files, {file: [size, mtime_ns, sha256]}, newest mtime_ns).

    A file whose size and modification time match CACHE (the previous run's) is not read again, so a
    re-run of a large model costs a few stat calls.
    """
    entries: dict[str, list] = {}
    newest = 0
    total = hashlib.sha256()
    for f in _model_files(model_dir):
        rel = f.relative_to(model_dir).as_posix()
        st = f.stat()
        newest = max(newest, st.st_mtime_ns)
        old = cache.get(rel)
        if isinstance(old, list) and len(old) == 3 and old[:2] == [st.st_size, st.st_mtime_ns]:
            digest = str(old[2])
        else:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.hexdigest()
        entries[rel] = [st.st_size, st.st_mtime_ns, digest]
        total.update(f"{rel}\0{digest}\n".encode())
    return total.hexdigest()[:16], entries, newest


def source_stamp(path: Path) -> tuple[str, str]:
    st = os.stat(path)
    return str(st.st_size), str(st.st_mtime_ns)


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        files = data.get("model_files") if isinstance(data, dict) else None
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError):
        return {}


def inside(folder: OutputFolder, text: str | None) -> str | None:
    """TEXT as a path inside the folder, or None (empty, absolute elsewhere, or climbing out)."""
    if not text:
        return None
    try:
        rel = folder.relative(text)
    except ValueError:
        return None
    return None if rel.startswith("/") or "/../" in f"/{rel}/" else rel


# ------------------------------------------------------------------------------ the old index
def read_previous_rows(index_path: Path) -> tuple[list[dict], str | None]:
    """index.csv rows as dicts and a note when it cannot be read whole; never raises.

    A damaged file (truncated, garbled) costs the rows it damaged, which are then redone.
    """
    if not index_path.is_file():
        return [], None
    try:
        text = index_path.read_text(encoding="utf-8")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
        columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        return [], f"{index_path}: cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__}); every image is redone"
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if rows and missing:
        return [], f"{index_path}: lacks column(s) {', '.join(missing)}; every image is redone"
    good = [r for r in rows if None not in r and all(r.get(c) is not None for c in columns)
            and all(r.get(c) for c in REQUIRED_COLUMNS)]
    note = None
    if len(good) < len(rows):
        note = f"{index_path}: {len(rows) - len(good)} damaged row(s) (truncated file?); their images are redone"
    return good, note


class Previous:
    """What an earlier run in this folder already did, and whether each of its images still holds."""

    def __init__(self, folder: OutputFolder, rows: list[dict], model_hash: str, model_mtime: int) -> None:
        self.folder = folder
        self.model_hash = model_hash
        self.model_mtime = model_mtime
        self.by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in rows:
            self.by_key[(r["source_path"], r["source_condition"])].append(r)
        # a file claimed by rows of two sources (older phenolens collided names): neither row is its own
        claims: dict[str, set] = defaultdict(set)
        for key, rs in self.by_key.items():
            for r in rs:
                for col in ("output_path", "reconstruction_path"):
                    claims[r[col]].add(key)
        self.shared = {p for p, keys in claims.items() if len(keys) > 1}

    def done(self, rec: ImageRecord, targets: Sequence[str], notices: Notices) -> list[dict] | None:
        """The rows of REC if they are complete and current, else None (with a notice saying why)."""
        rows = self.by_key.get(record_key(rec))
        if not rows:
            return None
        if sorted(r["target_condition"] for r in rows) != sorted(targets):
            return None
        out = self.folder.path
        files = {r[c] for r in rows for c in ("output_path", "reconstruction_path")}
        if any(inside(self.folder, f) is None or not (out / f).is_file() for f in files):
            return None
        if files & self.shared:
            notices.add("shared", f"{rec.path}: its rows in index.csv share output files with another image "
                        "(names made by an older phenolens); redoing it",
                        "{n} images in all shared output files with another image; redone", prefix="")
            return None
        stamp = source_stamp(rec.path)
        row = rows[0]
        oldest = min((out / f).stat().st_mtime_ns for f in files)
        if row.get("model_hash"):
            model_changed = row["model_hash"] != self.model_hash
        else:  # written by an older phenolens: outputs older than the model's files are stale
            model_changed = self.model_mtime > oldest
        if model_changed:
            notices.add("model", f"{rec.path}: was translated with an earlier version of the model (its files "
                        "changed since); redoing it", "{n} images in all were made with an earlier version of "
                        "the model; redone", prefix="")
            return None
        if row.get("source_size") and row.get("source_mtime_ns"):
            source_changed = (row["source_size"], row["source_mtime_ns"]) != stamp
        else:
            source_changed = int(stamp[1]) > oldest
        if source_changed:
            notices.add("source", f"{rec.path}: changed since it was translated (size or modification time); "
                        "redoing it", "{n} source images in all changed since they were translated; redone",
                        prefix="")
            return None
        return rows
