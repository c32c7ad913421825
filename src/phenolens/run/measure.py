"""`phenolens measure RUN_DIR`: features of real and generated images, statistics, image metrics.

It consumes what `phenolens translate` wrote (index.csv; source, reconstruction and translation
files), whatever method made them, plus real images of every condition (REFERENCE, by default the
data the model was trained on), and writes into RUN_DIR/measure/:

  features.csv          one row per image: image, condition, kind (real | reconstruction | translation),
                        role (source | reference | generated), source_image, target_condition, features
  stats.csv             per (feature, target): real and translated effect sizes and tests (measure/stats.py)
  ranked.csv            per target, the features the translation changes most
  dose_correlation.csv  per feature, real vs translated condition means across the dose series
  metrics.json          reconstruction MSE/PSNR/SSIM, identity, segmentation IoU, FID/KID, success ratio
  measure.json          the settings, so a re-run with the same settings reuses measured images

Images are measured in their own intensity scale (raw counts / dtype maximum), real and generated
alike, so a feature means the same thing on both.

RUN_DIR/measure/ is a phenolens output folder (`phenolens.folders.OutputFolder`, kind "measure"):
phenolens writes only the files above into it and lists them in its marker; a measure/ folder
that phenolens did not write is refused, and nothing else in RUN_DIR is ever removed.

Measuring can be split over processes: `accelerate launch --num_processes N -m phenolens measure RUN`
(or torchrun; on a machine without GPU `accelerate launch --multi_gpu --num_processes N` starts CPU
processes) gives each process chunks of the images still to measure (`run.shards`). Every process
appends each finished group of images to its own journal, measure/_journal/features-<rank>.csv (one
row per image: the job's key, its feature row, nucleus centroids and segmentation scores as JSON), and
the first process alone assembles the journals, in the jobs' order, into the files above, so the result
is that of a one-process run. A one-process run journals the same way: a run killed at any point
resumes from the journals (a cut last line is dropped and its image measured again), and they are
removed once measure.json is written. _journal/features-settings.json holds the settings that change a
row (`MeasureSettings.cache_key`); journals written with other settings are removed, not reused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from phenolens.atomic import write_csv_atomic, write_json_atomic
from phenolens.errors import PhenolensError
from phenolens.folders import OutputFolder, check_apart
from phenolens.run.index import open_run, reference_of, resolve_source
from phenolens.run.judges import judge_metrics
from phenolens.run.shards import (JOURNALS, Journal, Shard, current_shard, existing_journals, journal_names,
                                  read_journal, remove_journals, trim_cut_row)
from phenolens.run.workers import check_workers
from phenolens.measure.features import FEATURES_VERSION, PROFILES, FeatureSettings, measure_image
from phenolens.measure.segment import (SegmentationSettings, centroids as label_centroids, count_matches, touches_border,
                                       matched_iou, read_user_masks, segment)

ID_COLUMNS = ["image", "condition", "kind", "role", "source_image", "target_condition"]
MEASURE_FILES = ("features.csv", "centroids.npz", "segmentation_scores.json", "stats.csv", "ranked.csv",
                 "dose_correlation.csv", "metrics.json", "measure.json")
IDENTITY_DISTANCE = 3.0  # px: a source nucleus is "found again" if a translated one lies this close
JOURNAL_STEM = "features"  # measure/_journal/features-<rank>.csv
JOURNAL_SETTINGS = f"{JOURNALS}/{JOURNAL_STEM}-settings.json"  # the cache_key the journals were written with
JOURNAL_COLUMNS = ["key", "row", "centroids", "scores"]  # key: image|kind|role|target_condition; the rest JSON
JOURNAL_GROUP = 8  # finished images per journal append (a kill loses at most this many per process)
SHARE_CHUNK = 16  # consecutive images per chunk when the images are shared out among processes

logger = logging.getLogger(__name__)


@dataclass
class MeasureSettings:
    reference: str | None = None  # real images of every condition; default: the model's training data
    channel_names: list[str] | None = None
    nuclei_channel: int = 0
    cell_channel: int = 1
    nucleus_diameter: float | None = None  # px; estimated from the reference images when not given
    masks: str | None = None  # user label masks for real images
    profile: str = "standard"
    max_reference: int = 200  # real images per condition
    judges: bool = True  # train the oracle classifiers for success ratio and classifier FID/KID
    judge_steps: int = 300  # training steps per oracle; 94 % held-out accuracy on the demo simulation
    workers: int | None = None

    def cache_key(self) -> dict:
        """Settings that change a measured row (others only change the statistics)."""
        d = asdict(self)
        key = {k: d[k] for k in ("channel_names", "nuclei_channel", "cell_channel", "nucleus_diameter",
                                 "masks", "profile")}
        return dict(key, features_version=FEATURES_VERSION)


@dataclass
class _Job:
    image: str
    condition: str
    kind: str
    role: str
    source_image: str
    target_condition: str
    channels: list[int] | None
    features: FeatureSettings
    segmentation: SegmentationSettings
    masks: str | None
    truth: tuple[str, str] | None  # ground-truth (nuclei, cells) masks, when the data is simulated


def to_unit(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw counts to [0, 1] by the file's dtype maximum, as CellProfiler reads images."""
    kind = np.dtype(dtype)
    if kind.kind in "ui":
        return raw.astype(np.float64) / float(np.iinfo(kind).max)
    return np.clip(raw.astype(np.float64), 0.0, None)


def _ground_truth(image: Path, condition: str) -> tuple[str, str] | None:
    """The simulator's masks (`<root>/_groundtruth/masks/<condition>/<stem>_nuclei.tif`) if present."""
    for root in (image.parent.parent, image.parent):
        folder = root / "_groundtruth" / "masks" / condition
        n, c = folder / f"{image.stem}_nuclei.tif", folder / f"{image.stem}_cells.tif"
        if n.is_file() and c.is_file():
            return str(n), str(c)
    return None


def _measure_job(job: _Job) -> tuple[dict, np.ndarray, dict]:
    """Read, segment and measure one image; returns (row, nucleus centroids, segmentation scores)."""
    import tifffile

    from phenolens.data.io import read_image

    raw, layout = read_image(job.image, channels=job.channels)
    image = to_unit(raw, layout.dtype)
    if job.masks and job.kind == "real":
        nuclei, cells = read_user_masks(Path(job.masks), Path(job.image), job.condition, image, job.segmentation)
    else:
        nuclei, cells = segment(image, job.segmentation)
    row = {k: getattr(job, k) for k in ID_COLUMNS}
    row.update(measure_image(image, nuclei, cells, job.features))
    # (y, x, 1 if the nucleus touches the image border): identity is reported for all and for whole nuclei
    centers = np.column_stack([label_centroids(nuclei), touches_border(nuclei)]).astype(np.float64)
    scores: dict = {}
    if job.truth is not None:
        scores = dict(nuclei=matched_iou(nuclei, np.asarray(tifffile.imread(job.truth[0]))).tolist(),
                      cells=matched_iou(cells, np.asarray(tifffile.imread(job.truth[1]))).tolist())
    return row, centers, scores


def estimate_nucleus_diameter(paths: Sequence[Path], channels: list[int] | None, nuclei_channel: int) -> float:
    """Median equivalent diameter of the Otsu foreground's components in a few DNA channels."""
    from skimage import measure

    from phenolens.data.io import read_image
    from phenolens.measure.segment import otsu_foreground

    diameters: list[float] = []
    for p in paths[:16]:
        labels = measure.label(otsu_foreground(read_image(p, channels=channels)[0][nuclei_channel], 1.0))
        diameters += [r.equivalent_diameter_area for r in measure.regionprops(labels) if r.area >= 9]
    return float(np.median(diameters)) if diameters else SegmentationSettings().nucleus_diameter


class RunData:
    """index.csv, run.json and the model's phenolens.json of one translate run."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.rows, settings, info, _, self.warnings = open_run(run_dir)
        self.settings = settings or {}
        self.info: dict = info or {}

    @property
    def conditions(self) -> list[str]:
        """The model's condition order (a dose series stays in order), else order of appearance."""
        seen = list(dict.fromkeys([r["source_condition"] for r in self.rows]
                                  + [r["reference_condition"] for r in self.rows]))
        order = list(self.info.get("conditions") or [])
        return [c for c in order if c in seen] + [c for c in seen if c not in order]

    @property
    def reference_of(self) -> dict[str, str]:
        """target -> the condition of the real images it is compared with (`run.index.edits_as_targets`)."""
        return reference_of(self.rows)

    def targets(self, conditions: Sequence[str]) -> list[str]:
        """What the run rendered images for: CONDITIONS (in their order), then edits that are their own
        targets (DiffEx directions), in order of appearance."""
        return list(conditions) + [t for t in dict.fromkeys(r["target_condition"] for r in self.rows)
                                   if t not in conditions]


def dose_order(conditions: Sequence[str], reference: Path | None) -> list[str]:
    """Order conditions as the reference manifest lists them (simulated dose series: weakest first)."""
    if reference is None:
        return list(conditions)
    manifest = reference if reference.suffix.lower() == ".csv" else reference / "manifest.csv"
    if not manifest.is_file():
        return list(conditions)
    from phenolens.data.records import conditions_in_order, discover

    try:
        listed = conditions_in_order(discover(manifest))
    except PhenolensError:
        return list(conditions)
    return [c for c in listed if c in conditions] + [c for c in conditions if c not in listed]


def check_settings(settings: MeasureSettings) -> None:
    """Refuse option values that cannot work, before anything is read or written."""
    if settings.max_reference < 1:
        raise PhenolensError(f"--max-reference must be at least 1 (got {settings.max_reference}): it is the "
                             "number of real images per condition to measure")
    for option, value in (("--nuclei-channel", settings.nuclei_channel), ("--cell-channel", settings.cell_channel)):
        if value < 0:
            raise PhenolensError(f"{option} {value}: channels are counted from 0")
    if settings.nucleus_diameter is not None and not settings.nucleus_diameter > 0:
        raise PhenolensError(f"--nucleus-diameter must be above 0 px (got {settings.nucleus_diameter})")
    if settings.workers is not None:
        check_workers(settings.workers, "cpu")  # measuring runs on the CPU's cores
    if settings.judges and settings.judge_steps < 1:
        raise PhenolensError(f"--judge-steps must be at least 1 (got {settings.judge_steps})")


def check_channels(settings: MeasureSettings, n_ch: int) -> None:
    """The segmentation channels must exist in the images measured (the model's channels)."""
    for option, value in (("--nuclei-channel", settings.nuclei_channel), ("--cell-channel", settings.cell_channel)):
        if not 0 <= value < n_ch:
            raise PhenolensError(f"{option} {value}: the images have {n_ch} channel(s), counted from 0 "
                                 f"(0..{n_ch - 1})")


def open_measure_folder(run_dir: Path, overwrite: bool = False) -> OutputFolder:
    """RUN_DIR/measure as an output folder; a measure/ of an older phenolens (measure.json, no marker)
    is adopted with the files that phenolens writes there, never anything else."""
    def older(out: Path) -> list[str] | None:
        return [f for f in MEASURE_FILES if (out / f).exists()] if (out / "measure.json").is_file() else None

    folder = OutputFolder.open(run_dir / "measure", "measure", overwrite=overwrite, older=older,
                               option="RUN_DIR/measure")
    folder.record(*MEASURE_FILES)
    return folder


def _named_channels(info: dict, source: Path, channels, n_ch: int) -> list[str]:
    """Channel names when --channel-names is not given: those the model learnt from its training images
    (written into crops by `phenolens crop`), else those the source images carry, else ch0, ch1, ..."""
    from phenolens.data.io import stored_channel_names

    stats = info.get("input_stats") if isinstance(info.get("input_stats"), dict) else {}
    for names in (stats.get("channel_names"), stored_channel_names(source, channels)):
        if isinstance(names, list) and len(names) == n_ch:
            return [str(n) for n in names]
    return [f"ch{i}" for i in range(n_ch)]


def run_measure(run_dir: str | Path, settings: MeasureSettings = MeasureSettings(), *, overwrite: bool = False,
                progress: bool = True) -> Path:
    """Measure a translate run; returns RUN_DIR/measure.

    A re-run with the same settings reuses the rows already measured; OVERWRITE measures all again
    (removing only measure/'s own files first).
    """
    from phenolens.data.records import discover, pick_evenly

    check_settings(settings)
    run_dir = Path(run_dir)
    run = RunData(run_dir)
    if settings.profile not in PROFILES:
        raise PhenolensError(f"--profile {settings.profile!r}: choose one of {', '.join(PROFILES)}")
    channels = run.info.get("channels")

    ref_text = settings.reference or (run.info.get("training") or {}).get("data")
    if not ref_text:
        raise PhenolensError("no reference images: pass --reference DATA (real images of every condition)")
    reference = Path(ref_text)
    if not reference.exists():
        raise PhenolensError(f"--reference {reference}: does not exist (the model's training data moved? "
                             "pass --reference DATA)")
    ref_records = discover(reference)
    by_condition: dict[str, list] = {}
    for rec in ref_records:
        by_condition.setdefault(rec.condition, []).append(rec)
    conditions = dose_order(run.conditions, reference)
    missing = [c for c in conditions if c not in by_condition]
    if missing:
        raise PhenolensError(f"--reference {reference}: no real images of {', '.join(missing)} "
                             f"(found: {', '.join(by_condition)})")

    sources = {}
    for r in run.rows:
        found = resolve_source(r["source_path"], run_dir)
        if found is None:
            raise PhenolensError(f"{run_dir / 'index.csv'}: source image {r['source_path']} not found "
                                 "(moved since the run?)")
        sources[r["source_path"]] = found
    n_ch = len(run.info.get("channels") or []) or int(run.info.get("n_channels") or 0)
    if not n_ch:
        from phenolens.data.io import read_image

        n_ch = read_image(next(iter(sources.values())), channels=channels)[0].shape[0]
    names = settings.channel_names or _named_channels(run.info, next(iter(sources.values())), channels, n_ch)
    if len(names) != n_ch:
        raise PhenolensError(f"--channel-names: {len(names)} name(s) for {n_ch} channel(s)")
    check_channels(settings, n_ch)
    out = run_dir / "measure"
    check_apart(out, inputs=[p for p in (reference, settings.masks) if p and Path(p).is_dir()], option="RUN_DIR/measure")
    # under `accelerate launch` / torchrun, one of WORLD processes; only the first writes the folder's marker
    # and the files below, the others only their journal (the diameter is estimated alike by every process)
    shard = current_shard("cpu")  # measuring runs on the CPU: the processes meet over gloo, on any machine
    folder = open_measure_folder(run_dir, overwrite) if shard.main else None
    diameter = settings.nucleus_diameter or estimate_nucleus_diameter(
        [r.path for recs in by_condition.values() for r in recs[:4]], channels, settings.nuclei_channel)
    seg = SegmentationSettings(nuclei_channel=settings.nuclei_channel, cell_channel=settings.cell_channel,
                               nucleus_diameter=diameter)
    feats = FeatureSettings(channel_names=tuple(names), profile=settings.profile)

    def job(path: Path, condition: str, kind: str, role: str, source: str = "", target: str = "") -> _Job:
        # real files hold every channel (the model picks its own); its outputs hold only the picked ones
        return _Job(str(path), condition, kind, role, source, target, channels if kind == "real" else None, feats,
                    seg, settings.masks, _ground_truth(path, condition) if kind == "real" else None)

    source_condition = {r["source_path"]: r["source_condition"] for r in run.rows}
    jobs = [job(p, source_condition[s], "real", "source") for s, p in sources.items()]
    jobs += [job(run_dir / r["output_path"], r["target_condition"], r["kind"], "generated",
                 str(sources[r["source_path"]]), r["target_condition"]) for r in run.rows]
    jobs += [job(rec.path, c, "real", "reference") for c in conditions
             for rec in pick_evenly(by_condition[c], settings.max_reference)]

    measured = _measure_all(jobs, out, dict(settings.cache_key(), nucleus_diameter=diameter, channel_names=names),
                            settings.workers, progress, shard=shard, folder=folder)
    if measured is None:  # not the first process of a launch: its images are in its journal
        return out
    rows, centroids, scores = measured
    columns = _feature_columns(rows)
    write_csv_atomic(out / "features.csv", rows, ID_COLUMNS + columns)

    from phenolens.measure.stats import compare_conditions, dose_correlation, rank_changes

    def values(sel) -> dict[str, np.ndarray]:
        chosen = [r for r in rows if sel(r)]
        return {f: np.array([_num(r.get(f)) for r in chosen]) for f in columns}

    stats_rows, ranked_rows = [], []
    source_conditions = list(dict.fromkeys(r["source_condition"] for r in run.rows))
    targets, ref_of = run.targets(conditions), run.reference_of
    for sc in source_conditions:
        src_vals = values(lambda r: r["role"] == "source" and r["condition"] == sc)
        real_src = values(lambda r: r["role"] == "reference" and r["condition"] == sc)
        for tc in [c for c in targets if c != sc]:
            if not any(r["target_condition"] == tc and r["source_condition"] == sc for r in run.rows):
                continue
            ref = ref_of.get(tc, tc)
            src_set = {str(sources[r["source_path"]]) for r in run.rows if r["source_condition"] == sc}
            res = compare_conditions(columns, real_src, values(lambda r: r["role"] == "reference" and r["condition"] == ref),
                                     src_vals, values(lambda r: r["kind"] == "translation" and r["target_condition"] == tc
                                                      and r["source_image"] in src_set))
            for r in res:
                r.update(source_condition=sc, target_condition=tc)
            stats_rows += res
            ranked_rows += [dict(rank=i + 1, **{k: r[k] for k in ("feature", "target_condition", "trans_d", "real_d",
                                                                  "trans_q", "real_q", "direction_agrees")})
                            for i, r in enumerate(rank_changes(res, top=50))]
    write_csv_atomic(out / "stats.csv", [_fmt(r) for r in stats_rows], STATS_COLUMNS)
    write_csv_atomic(out / "ranked.csv", [_fmt(r) for r in ranked_rows],
                     ["rank", "feature", "target_condition", "trans_d", "real_d", "trans_q", "real_q", "direction_agrees"])

    # dose series: real means per condition vs means of what the model made for that condition
    real_means = {f: [] for f in columns}
    trans_means = {f: [] for f in columns}
    for c in conditions:
        rv = values(lambda r: r["role"] == "reference" and r["condition"] == c)
        tv = values(lambda r: r["role"] == "generated" and r["target_condition"] == c)
        for f in columns:
            real_means[f].append(_mean(rv[f]))
            trans_means[f].append(_mean(tv[f]))
    corr = dose_correlation(columns, real_means, trans_means)
    write_csv_atomic(out / "dose_correlation.csv", [_fmt(r) for r in corr],
                     ["feature", "pearson_r", "p_value", "n_conditions"])

    metrics = _image_metrics(run, run_dir, sources, rows, centroids, scores, conditions, columns, channels)
    if settings.judges:
        metrics["judges"] = judge_metrics(run.rows, run_dir, sources, by_condition, conditions,
                                          channels=channels, normalization=run.info.get("normalization"),
                                          max_reference=settings.max_reference, steps=settings.judge_steps,
                                          progress=progress)
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "measure.json", dict(asdict(settings), nucleus_diameter=diameter, channel_names=names,
                                                 features_version=FEATURES_VERSION,
                                                 conditions=conditions, reference=str(reference)))
    _remove_journals(out, folder)  # only now: until measure.json says which rows features.csv holds, they count
    return out


STATS_COLUMNS = ["feature", "source_condition", "target_condition", "n_source", "n_real_target", "n_translation",
                 "real_diff", "real_d", "real_p_welch", "real_p_mw", "real_q", "trans_diff", "trans_d",
                 "trans_p_welch", "trans_p_mw", "trans_q", "trans_d_common", "direction_agrees", "d_ratio",
                 "effect_ratio"]


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def _fmt(row: dict) -> dict:
    return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}


def _feature_columns(rows: list[dict]) -> list[str]:
    """Feature columns in first-seen order, without columns that are empty everywhere."""
    cols = list(dict.fromkeys(k for r in rows for k in r if k not in ID_COLUMNS))
    return [c for c in cols if any(np.isfinite(_num(r.get(c))) for r in rows)]


def _row_key(r: dict) -> tuple:
    return (r["image"], r["kind"], r["role"], r["target_condition"])


def _job_key(j: _Job) -> tuple:
    return (j.image, j.kind, j.role, j.target_condition)


def _cached_rows(out: Path, cache_key: dict, jobs: list[_Job]) -> dict[str, tuple[dict, np.ndarray, dict]]:
    """The rows of an earlier completed run with the same settings (features.csv, centroids.npz,
    segmentation_scores.json), by job name, for the jobs that have all they need there."""
    import csv

    cache_file, cache_rows = out / "features.csv", {}
    settings_file = out / "measure.json"
    if cache_file.is_file() and settings_file.is_file():
        old = json.loads(settings_file.read_text())
        if all(old.get(k) == v for k, v in cache_key.items()) and (out / "centroids.npz").is_file():
            with open(cache_file, newline="") as fh:
                cache_rows = {_row_key(r): r for r in csv.DictReader(fh)}
    if not cache_rows:
        return {}
    saved = dict(np.load(out / "centroids.npz", allow_pickle=False))
    saved_scores = json.loads((out / "segmentation_scores.json").read_text()) \
        if (out / "segmentation_scores.json").is_file() else {}
    cached = {}
    for j in jobs:
        key = _job_key(j)
        name = "|".join(key)
        if key in cache_rows and name in saved and saved[name].shape[1:] == (3,):  # older runs: (y, x) only
            if j.truth is None:
                cached[name] = (cache_rows[key], saved[name], {})
            elif name in saved_scores:
                cached[name] = (cache_rows[key], saved[name], saved_scores[name])
    return cached


def _journal_row(name: str, res: tuple[dict, np.ndarray, dict]) -> dict:
    """One finished image as a journal row. Values JSON does not know (numpy integers ...) are kept as
    their text, which is what the CSV writer would have written, so features.csv is the same either way."""
    row, centers, scores = res
    return dict(key=name, row=json.dumps(row, default=str),
                centroids=json.dumps(np.asarray(centers, dtype=np.float64).tolist()),
                scores=json.dumps(scores, default=str))


def _journal_entries(out: Path) -> Iterator[tuple[str, dict, np.ndarray, dict]]:
    """(name, row, centroids, scores) of every complete, readable row of the journals of OUT, rank by rank."""
    for path in existing_journals(out, JOURNAL_STEM):
        for r in read_journal(path):
            try:
                name, row, scores = r["key"], json.loads(r["row"]), json.loads(r["scores"])
                centers = np.asarray(json.loads(r["centroids"]), dtype=np.float64).reshape(-1, 3)
            except (KeyError, TypeError, ValueError):
                continue  # not a row this phenolens writes: its image is measured again
            if name and isinstance(row, dict) and isinstance(scores, dict):
                yield name, row, centers, scores


def _journal_settings(cache_key: dict) -> dict:
    return json.loads(json.dumps(cache_key, default=str))


def _journals_current(out: Path, cache_key: dict) -> bool:
    try:
        return json.loads((out / JOURNAL_SETTINGS).read_text()) == _journal_settings(cache_key)
    except (OSError, ValueError):
        return False


def _prepare_journals(out: Path, cache_key: dict, folder: OutputFolder) -> None:
    """Before any process reads or appends: journals written with other settings (or with none recorded)
    do not count and are removed; the others lose a cut last row."""
    journals = existing_journals(out, JOURNAL_STEM)
    if not journals:
        return
    if _journals_current(out, cache_key):
        for path in journals:
            if folder.owns(path.absolute()):
                trim_cut_row(path)
        return
    remove_journals(journals, folder)
    left = existing_journals(out, JOURNAL_STEM)
    if left:
        raise PhenolensError(f"{left[0]}: a file that phenolens did not write, in the folder of its journals; "
                             f"move it out of {out / JOURNALS}")


def _remove_journals(out: Path, folder: OutputFolder | None) -> None:
    """Remove the journals (merged into features.csv) and their settings file, if phenolens wrote them."""
    if folder is not None:
        remove_journals([*existing_journals(out, JOURNAL_STEM), out / JOURNAL_SETTINGS], folder)


def _effective_workers(workers: int | None, world: int) -> int:
    """--workers, or by default: one per launched process (a launch of N processes already uses N cores),
    else the CPU count, at most 8."""
    if workers is not None:
        return workers
    return 1 if world > 1 else min(os.cpu_count() or 1, 8)


def _measure_all(jobs: list[_Job], out: Path, cache_key: dict, workers: int | None, progress: bool, *,
                 shard: Shard | None = None, folder: OutputFolder | None = None
                 ) -> tuple[list[dict], dict[tuple, np.ndarray], dict[tuple, dict]] | None:
    """Measure every job, reusing rows of an earlier run with the same settings (runs can resume):
    those of a completed run (features.csv) and those journalled by a killed one.

    Each process of SHARD's launch measures its share of the rest and journals it; the first process
    (FOLDER: the measure folder it opened) then returns (rows in the jobs' order, centroids, scores),
    the others None."""
    shard = shard or Shard()
    if shard.main:
        if folder is None:
            raise ValueError("the first process needs the measure folder")
        _prepare_journals(out, cache_key, folder)
    shard.barrier()  # 1: the folder is ready; every process now reads the same files and plans alike

    names = {"|".join(_job_key(j)): _job_key(j) for j in jobs}
    cached = _cached_rows(out, cache_key, jobs)
    journalled = {name for name, *_ in _journal_entries(out)} if _journals_current(out, cache_key) else set()
    todo, planned = [], set()
    for j in jobs:
        name = "|".join(_job_key(j))
        if name not in cached and name not in journalled and name not in planned:
            todo.append(j)
            planned.add(name)
    if shard.main and todo:  # before any process journals: which settings, and which files are phenolens's
        folder.record(JOURNAL_SETTINGS, *journal_names(shard.world, JOURNAL_STEM))
        if not _journals_current(out, cache_key):
            (out / JOURNALS).mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / JOURNAL_SETTINGS, _journal_settings(cache_key))
    shard.barrier()  # 2: every process has planned (nothing is journalled before)

    mine = shard.share(todo, SHARE_CHUNK)
    if shard.world > 1:
        logger.info("measure: process %d of %d measures %d of the %d images left (of %d)", shard.rank + 1,
                    shard.world, len(mine), len(todo), len(jobs))
    _measure_share(mine, out / shard.journal_name(JOURNAL_STEM), _effective_workers(workers, shard.world),
                   progress and shard.main)
    shard.barrier()  # 3: every process has journalled its share
    if not shard.main:
        return None

    found: dict[str, tuple[dict, np.ndarray, dict]] = dict(cached)
    for name, row, centers, scores in _journal_entries(out):
        if name in names and name not in found:
            found[name] = (row, centers, scores)
    missing = [n for n in names if n not in found]
    if missing:
        raise PhenolensError(f"{len(missing)} image(s) were not measured, e.g. {missing[0].split('|')[0]} "
                             "(did a process of the launch fail?); run the command again to measure them")
    rows: dict[tuple, dict] = {}
    centroids: dict[tuple, np.ndarray] = {}
    scores: dict[tuple, dict] = {}
    for name, key in names.items():
        rows[key], centroids[key], s = found[name]
        if s:
            scores[key] = s
    np.savez(out / "centroids.npz", **{name: centroids[key] for name, key in names.items()})
    write_json_atomic(out / "segmentation_scores.json", {"|".join(k): v for k, v in scores.items()})
    return [rows[_job_key(j)] for j in jobs], centroids, scores


def _measure_share(todo: list[_Job], journal_path: Path, workers: int, progress: bool) -> None:
    """Measure TODO (WORKERS processes), appending every JOURNAL_GROUP finished images to the journal."""
    journal = Journal(journal_path, JOURNAL_COLUMNS)
    pending: list[dict] = []
    bar = tqdm(total=len(todo), desc="measure", unit="img", disable=None if progress else True)
    try:
        if workers > 1 and len(todo) > 8:
            with ProcessPoolExecutor(workers) as pool:
                results = pool.map(_measure_job, todo, chunksize=4)
                for j, res in zip(todo, results):
                    pending.append(_journal_row("|".join(_job_key(j)), res))
                    bar.update()
                    if len(pending) >= JOURNAL_GROUP:
                        journal.append(pending)
                        pending = []
        else:
            for j in todo:
                pending.append(_journal_row("|".join(_job_key(j)), _measure_job(j)))
                bar.update()
                if len(pending) >= JOURNAL_GROUP:
                    journal.append(pending)
                    pending = []
    finally:  # an image that failed (or an interrupt) keeps the images finished before it
        if pending:
            journal.append(pending)
        bar.close()


def _image_metrics(run: RunData, run_dir: Path, sources: dict[str, Path], rows: list[dict],
                   centroids: dict, scores: dict, conditions: list[str], columns: list[str],
                   channels) -> dict:
    """Reconstruction error, identity of nuclei, segmentation IoU and CellProfiler-profile FID/KID."""
    from phenolens.data.io import read_image
    from phenolens.measure.image_metrics import distribution_metrics, ssim

    metrics: dict = {}
    recon = [r for r in run.rows if r["kind"] == "reconstruction"]
    if recon:
        ssims = []
        for r in recon:
            a, la = read_image(sources[r["source_path"]], channels=channels)
            b, lb = read_image(run_dir / r["output_path"])  # outputs hold the model's channels only
            ssims.append(ssim(to_unit(a, la.dtype) * 2 - 1, to_unit(b, lb.dtype) * 2 - 1))
        metrics["reconstruction"] = dict(
            n=len(recon), mse_mean=float(np.mean([_num(r["recon_mse"]) for r in recon])),
            psnr_mean=float(np.mean([_num(r["recon_psnr"]) for r in recon])),
            psnr_min=float(np.min([_num(r["recon_psnr"]) for r in recon])), ssim_mean=float(np.mean(ssims)))

    # identity: are the source's nuclei still where they were? Recall: source nuclei found again
    # within 3 px. Precision: translated nuclei that sit on a source nucleus -- where a treatment kills
    # cells recall must fall, but the cells that remain should still be the source's own.
    identity = {}
    ref_of = run.reference_of
    for tc in run.targets(conditions):
        pairs = [(str(sources[r["source_path"]]), r["output_path"], r["kind"]) for r in run.rows
                 if r["target_condition"] == tc]
        found = total = total_gen = whole_found = whole = 0
        for src, outp, kind in pairs:
            c_src = centroids[(src, "real", "source", "")]
            c_gen = centroids[(str(run_dir / outp), kind, "generated", tc)]
            total += len(c_src)
            total_gen += len(c_gen)
            found += count_matches(c_src, c_gen, IDENTITY_DISTANCE)
            inner = c_src[c_src[:, 2] == 0]  # source nuclei not cut by the border, matched against all
            whole += len(inner)
            whole_found += count_matches(inner, c_gen, IDENTITY_DISTANCE)
        if total:
            identity[tc] = dict(source_nuclei=total, translated_nuclei=total_gen, matched=found,
                                fraction=found / total, translated_matched_fraction=found / max(total_gen, 1),
                                whole_source_nuclei=whole, whole_matched=whole_found,
                                whole_fraction=whole_found / whole if whole else math.nan)
    metrics["identity_nuclei_within_3px"] = identity

    if scores:
        nuc = [v for s in scores.values() for v in s["nuclei"]]
        cel = [v for s in scores.values() for v in s["cells"]]
        metrics["segmentation_vs_ground_truth"] = dict(images=len(scores), nuclei=len(nuc),
                                                        nuclei_mean_iou=float(np.mean(nuc)) if nuc else math.nan,
                                                        cells_mean_iou=float(np.mean(cel)) if cel else math.nan)

    # FID/KID on the CellProfiler profile, standardised by the real images
    def table(sel) -> np.ndarray:
        return np.array([[_num(r.get(f)) for f in columns] for r in rows if sel(r)], dtype=np.float64)

    ref_all = table(lambda r: r["role"] == "reference")
    keep = np.isfinite(ref_all).all(axis=0) & (np.nanstd(ref_all, axis=0) > 0) if len(ref_all) else np.zeros(0, bool)
    mu, sd = ref_all[:, keep].mean(axis=0), ref_all[:, keep].std(axis=0)
    profile = {}
    src_tab = table(lambda r: r["role"] == "source")
    for tc in run.targets(conditions):
        real = table(lambda r, ref=ref_of.get(tc, tc): r["role"] == "reference" and r["condition"] == ref)
        gen = table(lambda r, tc=tc: r["role"] == "generated" and r["target_condition"] == tc)
        if len(real) < 2 or len(gen) < 2:
            continue
        z = lambda t: np.nan_to_num((t[:, keep] - mu) / sd)
        profile[tc] = dict(generated=distribution_metrics(z(real), z(gen)),
                           untranslated_sources=distribution_metrics(z(real), z(src_tab)))
    metrics["profile_fid_kid"] = profile
    return metrics


