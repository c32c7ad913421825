"""Reading a translate run folder without loading any model: index.csv, sources, the model's description.

`measure` and `report` consume runs whatever method made them, and must start fast, so this module
imports nothing heavier than the standard library.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from phenolens.errors import PhenolensError

INDEX_COLUMNS = ["source_path", "source_condition", "target_condition", "output_path", "recon_mse",
                 "recon_psnr", "change_mse", "kind", "reconstruction_path"]
REQUIRED_COLUMNS = ("source_path", "source_condition", "target_condition", "output_path", "reconstruction_path")


def read_index(path: Path) -> list[dict]:
    """index.csv rows as dicts; no file gives no rows."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def read_index_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number where the row ends, row) of index.csv, to name a damaged line."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return [(reader.line_num, row) for row in reader]


def check_rows(index: Path, numbered: list[tuple[int, dict]]) -> None:
    """Refuse a truncated or hand-damaged index.csv (a row cut short, fields missing or extra, an
    empty path), naming its line, rather than failing somewhere later on a missing value."""
    damaged = "the file is truncated or damaged: re-run `phenolens translate` into a new OUT"
    for line, row in numbered:
        short = [k for k, v in row.items() if k is not None and v is None]
        if short:
            raise PhenolensError(f"{index}: line {line} has fewer fields than the header (no {short[0]}); {damaged}")
        if None in row:
            raise PhenolensError(f"{index}: line {line} has more fields than the header; {damaged}")
        empty = [c for c in ("source_path", "source_condition", "target_condition", "output_path") if not row[c].strip()]
        if empty:
            raise PhenolensError(f"{index}: line {line} has an empty {empty[0]}; {damaged}")


def edits_as_targets(rows: list[dict]) -> list[dict]:
    """Give each row `reference_condition`, the condition whose real images its output is compared with,
    and make an edit that is more than "render under another condition" (a DiffEx direction,
    `direction=3,alpha=1.5`) its own target: its `target_condition` becomes the edit's label. Then
    every stage keyed on target_condition (statistics, identity, judges, the report's sections) treats
    each such edit as one more target, compared with the real images of its reference condition."""
    for r in rows:
        r.setdefault("reference_condition", r["target_condition"])
        edit = (r.get("edit") or "").strip()
        if edit and r.get("kind") == "translation" and edit != f"to={r['reference_condition']}":
            r["target_condition"] = edit
    return rows


def reference_of(rows: list[dict]) -> dict[str, str]:
    """target -> the condition whose real images it is compared with (itself, for a condition)."""
    return {r["target_condition"]: r.get("reference_condition") or r["target_condition"] for r in rows}


def resolve_source(text: str, run_dir: Path) -> Path | None:
    """The source as given (absolute or relative to the current folder), then under RUN, then beside RUN."""
    p = Path(text)
    for candidate in (p, run_dir / p, run_dir.parent / p):
        if candidate.is_file():
            return candidate
    return None


def read_json_object(path: Path, warnings: list[str], consequence: str = "") -> dict | None:
    """A JSON object from PATH, or None with a warning (unreadable, not JSON, not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        warnings.append(f"{path}: cannot read ({err}){consequence}")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{path}: not a JSON object{consequence}")
        return None
    return data


def find_model_info(settings: dict | None, run_dir: Path, warnings: list[str]) -> tuple[dict | None, Path | None]:
    """The model's phenolens.json (conditions, normalisation); a moved run may find it beside itself."""
    model_dir = (settings or {}).get("model_dir")
    if not model_dir:
        return None, None
    for base in (Path(model_dir), run_dir / model_dir, run_dir.parent / model_dir):
        path = base / "phenolens.json"
        if path.is_file():
            return read_json_object(path, warnings, "; images are scaled per image set"), path
    warnings.append(f"model {model_dir}: no phenolens.json found; images are scaled by each source's "
                    "0.1/99.9 percentiles instead of the model's normalisation")
    return None, None


def open_run(run_dir: Path) -> tuple[list[dict], dict | None, dict | None, Path | None, list[str]]:
    """(index rows, run.json settings, model info, its path, warnings) of a translate run folder.

    A missing or empty index is an error (nothing to work on); a missing run.json or model
    description only costs information, so it becomes a warning.
    """
    hint = "RUN_DIR should be the OUT folder of `phenolens translate`"
    if not run_dir.is_dir():
        raise PhenolensError(f"{run_dir}: no such folder; {hint}")
    index = run_dir / "index.csv"
    if not index.is_file():
        raise PhenolensError(f"{run_dir}: no index.csv in it; {hint}")
    try:
        numbered = read_index_lines(index)
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise PhenolensError(f"{index}: cannot read ({err})") from None
    rows = [row for _, row in numbered]
    if not rows:
        raise PhenolensError(f"{index}: lists no images yet (did `phenolens translate` stop before its first batch?)")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise PhenolensError(f"{index}: missing column(s) {', '.join(missing)}; {hint}")
    check_rows(index, numbered)
    edits_as_targets(rows)
    warnings: list[str] = []
    settings = None
    run_json = run_dir / "run.json"
    if run_json.is_file():
        settings = read_json_object(run_json, warnings)
    else:
        warnings.append(f"{run_json}: missing; the run's settings are unknown")
    model, model_path = find_model_info(settings, run_dir, warnings)
    return rows, settings, model, model_path, warnings
