"""Fields of a screen from a CellProfiler LoadData CSV (the image table of most profiling pipelines).

One row per field of view; per channel a `FileName_<Ch>` / `PathName_<Ch>` pair (optionally
`Frame_<Ch>`, the plane of a multi-page file); every `Metadata_*` column describes the field
(`Metadata_Plate`, `Metadata_Well`, `Metadata_Site`, `Metadata_Compound`, ...). This is the format
of the Cell Painting Gallery, so a user's existing table works as it is. A relative `PathName` is
read relative to the CSV's folder, so a screen folder can move.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from phenolens.errors import PhenolensError
from phenolens.screen.conditions import ConditionRule
from phenolens.screen.fields import ChannelSource, Field, check_unique_keys, safe_key
from phenolens.screen.platemap import PlateMap

_FILE, _PATH, _FRAME = "FileName_", "PathName_", "Frame_"
# Metadata that identifies a field, in the order a field key is built from.
KEY_COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Field")


def loaddata_channels(columns: Sequence[str], table: Path) -> list[str]:
    """Channel names in header order; every FileName_<Ch> needs its PathName_<Ch> and the reverse."""
    files = [c[len(_FILE):] for c in columns if c.startswith(_FILE)]
    paths = [c[len(_PATH):] for c in columns if c.startswith(_PATH)]
    frames = [c[len(_FRAME):] for c in columns if c.startswith(_FRAME)]
    if not files and not paths:
        raise PhenolensError(f"{table}: not a LoadData table: no FileName_<channel> / PathName_<channel> columns "
                             f"(found: {', '.join(columns) or 'no header'})")
    only_file = [c for c in files if c not in paths]
    only_path = [c for c in paths if c not in files]
    if only_file or only_path:
        parts = [f"{_FILE}{c} has no {_PATH}{c}" for c in only_file] + \
                [f"{_PATH}{c} has no {_FILE}{c}" for c in only_path]
        raise PhenolensError(f"{table}: channel columns disagree: {'; '.join(parts)} "
                             f"(channels with both: {', '.join(c for c in files if c in paths) or 'none'})")
    stray = [c for c in frames if c not in files]
    if stray:
        raise PhenolensError(f"{table}: channel columns disagree: {_FRAME}{stray[0]} has no {_FILE}{stray[0]}")
    return files


def select_channels(found: Sequence[str], wanted: Sequence[str] | None, source: str) -> list[str]:
    """The channels to crop, in WANTED's order when given (`--channels DNA,Actin`), checked against FOUND."""
    if not wanted:
        return list(found)
    unknown = [c for c in wanted if c not in found]
    if unknown:
        raise PhenolensError(f"--channels: {source} has no channel {unknown[0]!r} (it has: {', '.join(found)})")
    return list(wanted)


def read_loaddata(table: Path, rule: ConditionRule, channels: Sequence[str] | None = None,
                  platemap: PlateMap | None = None) -> list[Field]:
    """Fields of a LoadData CSV, with PLATEMAP's columns joined on the well; rows numbered as in a
    spreadsheet (the header is row 1)."""
    table = Path(table)
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            names = select_channels(loaddata_channels(columns, table), channels, str(table))
            rule = rule.resolve(columns + (platemap.columns if platemap else []), str(table))
            meta_cols = [c for c in columns if c.startswith("Metadata_") or c in rule.columns]
            fields = [_field(table, reader.line_num, row, names, meta_cols, rule, platemap)
                      for row in reader if any((v or "").strip() for v in row.values() if isinstance(v, str))]
    except UnicodeDecodeError:
        raise PhenolensError(f"{table}: not a UTF-8 text CSV file") from None
    except csv.Error as exc:
        raise PhenolensError(f"{table}: cannot parse CSV ({exc})") from None
    except OSError as exc:
        raise PhenolensError(f"{table}: cannot read ({exc.strerror or exc})") from None
    if not fields:
        raise PhenolensError(f"{table}: no rows")
    check_unique_keys(fields, str(table))
    return fields


def _field(table: Path, line: int, row: dict, names: Sequence[str], meta_cols: Sequence[str],
           rule: ConditionRule, platemap: PlateMap | None) -> Field:
    where = f"{table} row {line}"
    channels: dict[str, ChannelSource] = {}
    for ch in names:
        name = (row.get(_FILE + ch) or "").strip()
        folder = (row.get(_PATH + ch) or "").strip()
        if not name:
            raise PhenolensError(f"{where}: empty {_FILE}{ch}")
        path = Path(folder).expanduser() / name if folder else Path(name)
        if not path.is_absolute():
            path = table.parent / path
        if not path.is_file():
            raise PhenolensError(f"{where}: {_FILE}{ch} {name}: file not found ({path})")
        frame = (row.get(_FRAME + ch) or "").strip()
        if frame and not frame.isdigit():
            raise PhenolensError(f"{where}: {_FRAME}{ch} {frame!r} is not a plane number (0, 1, ...)")
        channels[ch] = ChannelSource(path, int(frame) if frame else None)
    meta = {c: (row.get(c) or "").strip() for c in meta_cols}
    if platemap is not None:  # the table's own columns win over the map's
        meta = {**platemap.lookup(meta, where), **meta}
    ids = [meta[c] for c in KEY_COLUMNS if meta.get(c)]
    key = safe_key(*ids) if ids else safe_key(channels[names[0]].path.stem)
    return Field(key=key, condition=rule.condition(meta, where), channels=channels, meta=meta,
                 plate=meta.get("Metadata_Plate", ""))


__all__ = ["KEY_COLUMNS", "loaddata_channels", "read_loaddata", "select_channels"]
