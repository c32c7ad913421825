"""The --skip-bad report: one row per input file that could not be used, and why.

Written by training (into the model folder) and by translation (into the run folder), so it sits with
the data it describes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from phenolens.atomic import write_csv_atomic

SKIPPED_FILE = "skipped_files.csv"


def write_skipped(path: Path, bad: Sequence[tuple[Path, str]]) -> None:
    write_csv_atomic(path, [dict(path=str(p), reason=reason) for p, reason in bad], ["path", "reason"])
