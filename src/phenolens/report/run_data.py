"""What a report shows, read from a run folder into plain dataclasses (`report/html.py` draws them).

Everything `phenolens report` reads is read here, and nothing is drawn: index.csv, run.json and the
model's phenolens.json (`RunInfo`), the source images and their outputs scaled to the model's [-1, 1]
(`ImageSet`), and RUN/measure/'s tables and metrics.json (`MeasureData`). `read_report` gathers them
into one `ReportData`. A file that is missing or unreadable never fails a report: it becomes None (the
section says how to add it) or a line in `RunInfo.warnings`, shown at the top of the page.

A section for a future method's outputs (DiffEx directions, DIFFusion teaching pages) gets a reader
here: a dataclass of what the section shows, filled from the run folder (None when the run has none,
as every section is optional), and a field on `ReportData`; `html.py` then draws it in its own
`section_*` function.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from phenolens.data.io import read_image
from phenolens.data.normalize import Normalizer
from phenolens.errors import PhenolensError
from phenolens.run.index import open_run, read_json_object, resolve_source


# ------------------------------------------------------------------------------------- the run

@dataclass
class RunInfo:
    """What the page needs to know about a run besides its images."""

    run_dir: Path
    rows: list[dict]
    settings: dict | None
    model: dict | None
    model_path: Path | None
    normalizer: Normalizer | None
    order: list[str]
    warnings: list[str] = field(default_factory=list)
    measured: dict = field(default_factory=dict)  # RUN/measure/measure.json: dose order, channel names


@dataclass(eq=False)  # compared by identity: fields hold arrays
class ImageSet:
    """One source image with its reconstruction and translations, in model space [-1, 1]."""

    key: str
    name: str
    condition: str
    source: np.ndarray | None
    reconstruction: np.ndarray | None
    outputs: dict[str, np.ndarray | None]
    rows: dict[str, dict]
    normalised_by: str = "model"


def condition_order(rows: Sequence[dict], model_conditions: Sequence[str] | None,
                    order: Sequence[str] | None) -> list[str]:
    """--order, else the measured dose order or the model's, then any condition of the run not yet named."""
    present = list(dict.fromkeys([r["source_condition"] for r in rows] + [r["target_condition"] for r in rows]))
    if order:
        known = set(present) | set(model_conditions or [])
        unknown = [c for c in order if c not in known]
        if unknown:
            raise PhenolensError(f"--order: {', '.join(unknown)} is not a condition of this run; "
                                 f"it has: {', '.join(present)}")
        base = list(dict.fromkeys(order))
    else:
        base = list(model_conditions or [])
    return base + [c for c in present if c not in base]


def load_run(run_dir: str | Path, order: Sequence[str] | None = None) -> RunInfo:
    run_dir = Path(run_dir)
    rows, settings, model, model_path, warnings = open_run(run_dir)
    normalizer = None
    if model is not None and "normalization" in model:
        try:
            normalizer = Normalizer.from_dict(model["normalization"])
        except PhenolensError as err:
            warnings.append(f"{model_path}: {err}; images are scaled per image set")
    conditions = model.get("conditions") if model else None
    measured_path = run_dir / "measure" / "measure.json"
    measured = (read_json_object(measured_path, warnings) if measured_path.is_file() else None) or {}
    # `phenolens measure` ordered the dose series by the reference manifest
    conditions = measured.get("conditions") or conditions
    return RunInfo(run_dir, rows, settings, model, model_path, normalizer,
                   condition_order(rows, conditions if isinstance(conditions, list) else None, order), warnings,
                   measured)


def pick_sources(rows: Sequence[dict], max_images: int, order: Sequence[str]) -> list[str]:
    """Up to MAX_IMAGES sources, taken in turn from each source condition so all are seen."""
    by_condition: dict[str, dict[str, None]] = {}
    for r in rows:
        by_condition.setdefault(r["source_condition"], {})[r["source_path"]] = None
    queues = [list(by_condition[c]) for c in sorted(by_condition, key=lambda c: order.index(c) if c in order else 0)]
    picked: list[str] = []
    while len(picked) < max_images and any(queues):
        for q in queues:
            if q and len(picked) < max_images:
                picked.append(q.pop(0))
    return picked


def _read(path: Path, channels: Sequence[int] | None, warnings: list[str]) -> np.ndarray | None:
    """An unreadable file becomes a warning and a placeholder tile, never a failed report."""
    try:
        return read_image(path, channels=channels)[0]
    except PhenolensError as err:
        warnings.append(str(err))
        return None


def load_set(run: RunInfo, key: str, rows: Sequence[dict]) -> ImageSet:
    """Read a source and its outputs; scale them all the same way so intensities compare."""
    first = rows[0]
    channels = run.model.get("channels") if run.model else None
    src_path = resolve_source(key, run.run_dir)
    if src_path is None:
        run.warnings.append(f"source image {key}: not found (as given, under {run.run_dir} or beside it); "
                            "shown as a placeholder")
        source = None
    else:
        source = _read(src_path, channels if isinstance(channels, list) else None, run.warnings)
    recon = _read(run.run_dir / first["reconstruction_path"], None, run.warnings)
    outputs: dict[str, np.ndarray | None] = {}
    by_target: dict[str, dict] = {}
    for r in rows:
        by_target[r["target_condition"]] = r
        same = r["output_path"] == first["reconstruction_path"]
        outputs[r["target_condition"]] = recon if same else _read(run.run_dir / r["output_path"], None, run.warnings)
    raw = [source, recon, *outputs.values()]
    ref = next((x for x in raw if x is not None), None)
    norm, how = run.normalizer, "model"
    if ref is not None and (norm is None or norm.n_channels != ref.shape[0]):
        if norm is not None:
            run.warnings.append(f"{key}: {ref.shape[0]} channel(s), the model's normalisation has "
                                f"{norm.n_channels}; scaled by the image's own percentiles")
        norm = Normalizer.fit([ref])
        how = "source percentiles" if ref is source else "percentiles of its first readable output"

    def to_model(x: np.ndarray | None, what: str) -> np.ndarray | None:
        if x is None or norm is None:
            return None
        if x.shape[0] != norm.n_channels:
            run.warnings.append(f"{key}: {what} has {x.shape[0]} channel(s), expected {norm.n_channels}")
            return None
        return norm.to_model(x)

    return ImageSet(key=key, name=Path(key).name, condition=first["source_condition"],
                    source=to_model(source, "source"), reconstruction=to_model(recon, "reconstruction"),
                    outputs={t: to_model(x, f"output for {t}") for t, x in outputs.items()},
                    rows=by_target, normalised_by=how)

# --------------------------------------------------------------------------------- measure/

def read_csv(path: Path, warnings: list[str]) -> list[dict] | None:
    """A measure table, or None when absent: every measure section is optional."""
    if not path.is_file():
        return None
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        warnings.append(f"{path}: cannot read ({err})")
        return None


@dataclass
class MeasureData:
    """RUN/measure/'s outputs (`phenolens measure`); each is None when its file is missing or unreadable."""

    dir: Path
    present: bool  # RUN/measure/ exists: without it the report shows one hint instead of every part
    features: list[dict] | None = None
    stats: list[dict] | None = None
    ranked: list[dict] | None = None
    dose: list[dict] | None = None
    metrics: Any = None  # metrics.json as parsed
    metrics_state: str = "missing"  # "missing" | "read" | "unreadable"


def read_measure(run_dir: Path, warnings: list[str]) -> MeasureData:
    """The measure tables and metrics of RUN_DIR; problems reading them become WARNINGS."""
    mdir = run_dir / "measure"
    if not mdir.is_dir():
        return MeasureData(mdir, present=False)
    data = MeasureData(mdir, present=True, features=read_csv(mdir / "features.csv", warnings),
                       stats=read_csv(mdir / "stats.csv", warnings), ranked=read_csv(mdir / "ranked.csv", warnings),
                       dose=read_csv(mdir / "dose_correlation.csv", warnings))
    metrics_path = mdir / "metrics.json"
    if metrics_path.is_file():
        try:
            data.metrics, data.metrics_state = json.loads(metrics_path.read_text()), "read"
        except (OSError, json.JSONDecodeError) as err:
            warnings.append(f"{metrics_path}: cannot read ({err})")
            data.metrics_state = "unreadable"
    return data


@dataclass
class DirectionsData:
    """A DiffEx explanation around the run (`phenolens explain` writes the run as OUT/run): its ranking
    and the strip of each kept direction (PNG bytes, None when missing)."""

    ranking: list[dict]
    strips: dict[str, bytes | None]  # rank -> the strip's PNG


def read_directions(run_dir: Path, warnings: list[str]) -> DirectionsData | None:
    """RUN_DIR/../ranking.csv and strips/ when RUN_DIR is the run of `phenolens explain`, else None."""
    out = run_dir.resolve().parent
    if run_dir.resolve().name != "run" or not (out / "explain.json").is_file():
        return None
    ranking = read_csv(out / "ranking.csv", warnings) or []
    strips: dict[str, bytes | None] = {}
    for r in ranking:
        path = out / "strips" / f"rank-{r.get('rank')}-direction-{r.get('direction')}.png"
        try:
            strips[str(r.get("rank"))] = path.read_bytes()
        except OSError:
            warnings.append(f"{path}: missing; the strip of direction {r.get('direction')} is not shown")
            strips[str(r.get("rank"))] = None
    return DirectionsData(ranking, strips)


# ------------------------------------------------------------------------------------ everything

@dataclass
class ReportData:
    """Everything one report page shows, read once; `html.build_page` draws it."""

    run: RunInfo
    picked: list[str]  # the source images shown, in the order shown
    sets: list[ImageSet]
    measure: MeasureData
    directions: DirectionsData | None = None  # a DiffEx explanation's ranking and strips


def read_report(run_dir: str | Path, *, max_images: int = 12, order: Sequence[str] | None = None,
                progress: bool = True) -> ReportData:
    """Read RUN_DIR for a page of at most MAX_IMAGES source images, conditions in ORDER (see
    `condition_order`)."""
    run = load_run(run_dir, order)
    picked = pick_sources(run.rows, max_images, run.order)
    rows_of: dict[str, list[dict]] = {}
    for r in run.rows:
        rows_of.setdefault(r["source_path"], []).append(r)
    sets = [load_set(run, key, rows_of[key])
            for key in tqdm(picked, desc="report: read", unit="img", disable=None if progress else True)]
    return ReportData(run, picked, sets, read_measure(run.run_dir, run.warnings),
                      read_directions(run.run_dir, run.warnings))
