"""A plate map: what is in each well (compound, concentration, gene), joined onto the screen's fields.

Why: a screen's image table names plate, well and site, but what was done to each well usually
lives in a separate layout file (the Cell Painting Gallery's `platemap.txt`: `well_position`,
`broad_sample`, ...). `--platemap FILE` joins it on the well (and the plate, when the map has a
plate column), so `--condition-from` can name its columns and every crop carries them.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from phenolens.errors import PhenolensError

WELL_COLUMNS = ("Metadata_Well", "well_position", "Well", "well")
PLATE_COLUMNS = ("Metadata_Plate", "plate_map_name", "Plate", "plate")
_WELL = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")


def well_key(text: str) -> str:
    """'B4', 'b04', 'B004' -> 'B04': wells compared as a row letter and a column number."""
    m = _WELL.match(text.strip())
    return f"{m.group(1).upper()}{int(m.group(2)):02d}" if m else text.strip()


def metadata_column(name: str) -> str:
    return name if name.startswith("Metadata_") else "Metadata_" + name


@dataclass
class PlateMap:
    """Rows of a plate map keyed by (plate or '', well)."""

    path: Path
    columns: list[str]  # the metadata columns it adds, as Metadata_<name>
    rows: dict[tuple[str, str], dict[str, str]]
    by_plate: bool

    def lookup(self, meta: Mapping[str, str], where: str) -> dict[str, str]:
        """The map's columns for the field whose metadata is META (one line naming WHERE if it has none)."""
        well = meta.get("Metadata_Well", "")
        if not well:
            raise PhenolensError(f"--platemap {self.path}: {where} has no Metadata_Well to look up (a LoadData "
                                 "column, or a {well} field of the pattern)")
        plate = meta.get("Metadata_Plate", "") if self.by_plate else ""
        row = self.rows.get((plate, well_key(well)))
        if row is None:
            raise PhenolensError(f"--platemap {self.path}: no row for well {well}"
                                 + (f" of plate {plate}" if self.by_plate else "") + f" ({where})")
        return row


def read_platemap(path: Path) -> PlateMap:
    """A CSV or tab-separated plate map with a well column (Metadata_Well, well_position, Well or well)."""
    path = Path(path)
    if not path.is_file():
        raise PhenolensError(f"--platemap {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PhenolensError(f"--platemap {path}: cannot read it as text ({exc})") from None
    delimiter = "\t" if text.split("\n", 1)[0].count("\t") > text.split("\n", 1)[0].count(",") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    header = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = header
    well_col = next((c for c in WELL_COLUMNS if c in header), None)
    if well_col is None:
        raise PhenolensError(f"--platemap {path}: no well column ({', '.join(WELL_COLUMNS)}); found: "
                             f"{', '.join(header) or 'no header'}")
    plate_col = next((c for c in PLATE_COLUMNS if c in header), None)
    # a Cell Painting Gallery map names its layout, not the plates imaged with it: joined on the well only
    by_plate = plate_col is not None and plate_col != "plate_map_name"
    added = [c for c in header if c and c not in (well_col, plate_col)]
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for row in reader:
        well = (row.get(well_col) or "").strip()
        if not well:
            continue
        key = ((row.get(plate_col) or "").strip() if by_plate else "", well_key(well))
        if key in rows:
            raise PhenolensError(f"--platemap {path}: well {well}" + (f" of plate {key[0]}" if by_plate else "")
                                 + " is listed twice")
        rows[key] = {metadata_column(c): (row.get(c) or "").strip() for c in added}
    if not rows:
        raise PhenolensError(f"--platemap {path}: no rows")
    return PlateMap(path, [metadata_column(c) for c in added], rows, by_plate)


__all__ = ["PlateMap", "read_platemap", "well_key"]
