"""Atomic file writes: readers see the old file or the new one, never half of one.

Every table and settings file phenolens writes goes through here (temporary file in the same
folder, then `os.replace`), so a run killed mid-write can be resumed without losing data.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def write_csv_atomic(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str],
                     *, only_if_changed: bool = False) -> None:
    """`only_if_changed` leaves an identical file untouched (its mtime too), so that a re-run with
    nothing to do changes nothing on disk."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    text = buf.getvalue()
    if only_if_changed:
        try:
            if Path(path).read_bytes() == text.encode():
                return
        except OSError:
            pass
    write_text_atomic(path, text)
