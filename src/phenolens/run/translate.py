"""The `phenolens translate` run: every source image inverted once, rendered under each target.

A run folder holds::

    .phenolens.json                the marker: this is a translate run, and every path phenolens wrote here
    run.json                       the settings (model, input, steps, seed, inversion ...) and the model's hash
    provenance.json                what the run was made from: the model's files (size, mtime, sha256)
    index.csv                      one row per (source, target); the target equal to the source
                                   is the reconstruction (kind = reconstruction)
    <condition>/<image stem>-<hash>/reconstruction.tif      same dtype/layout as the source
    <condition>/<image stem>-<hash>/to-<target>[-<hash>].tif
    skipped.csv                    files that could not be used (--skip-bad)

Guarantees (issue 9):

- Nothing of the user's is ever removed: the folder is opened through
  :class:`phenolens.folders.OutputFolder`, every file is recorded in the marker *before* it is
  written, and `--overwrite` removes only recorded files. OUT may not be, contain or lie inside the
  input, any source image or the model folder (checked before anything is written). A run folder
  written by an older phenolens (run.json + index.csv, no marker) is adopted: the files its index
  lists and its run.json / index.csv / skipped.csv are recorded, nothing else.
- Output names are unique by construction and stable when a manifest is edited: an image's folder
  is its readable stem plus a hash of its resolved path and its condition (never its row), and a
  target's file is `to-<target>` (plus a hash of the target when its name is not already a plain,
  lower-case file name), so no two conditions and no condition named `reconstruction` can share a
  file. Unicode letters are kept. A row always points at its own files.
- Inputs are checked against the training set: `clipped_fraction` (pixel values outside the model's
  normalisation range, which the model sees clipped), `recon_mae_raw` / `recon_mse_raw` (the
  reconstruction error in the file's units, as written) are in index.csv; an input whose dtype
  differs from the training images', or with more than 5% clipped values, gets a warning naming the
  file, and one with more than `max_clipped` (default 50%) is refused (skipped with --skip-bad).
- Results are never stale: each row records the model's hash (`model_hash`) and its source's
  `source_size` / `source_mtime_ns`; a re-run redoes (and says so) the images whose model or source
  changed, and those whose rows are damaged or missing files, instead of keeping them as done.

Outputs are written atomically and `index.csv` is rewritten after every batch, so a killed run
resumes where it stopped; a re-run with the same settings skips what is done. Later stages
(measure, report) consume `index.csv` whatever method made the images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from phenolens.atomic import write_csv_atomic, write_json_atomic
from phenolens.data.io import ImageLayout, read_image, write_image
from phenolens.data.records import ImageRecord, discover
from phenolens.errors import PhenolensError
from phenolens.folders import MARKER, OutputFolder, check_apart
from phenolens.methods.core import CounterfactualModel, clipped_fraction, load_model_for, psnr_from_mse, raw_errors
from phenolens.methods.phendiff import write_skipped
from phenolens.models.store import INFO_FILE, ModelInfo
from phenolens.run.index import INDEX_COLUMNS, REQUIRED_COLUMNS

KIND = "translate"
# extra index.csv columns of a latent model (Phen-LDiff): the same errors in the diffusion space, and
# the VAE's own round-trip error, the floor under the pixel-space reconstruction error
LATENT_COLUMNS = ["latent_recon_mse", "latent_change_mse", "autoencoder_mse"]
# how far the input is from the training set, and the reconstruction error in the file's own units
STAT_COLUMNS = ["clipped_fraction", "recon_mae_raw", "recon_mse_raw", "source_dtype"]
# what each row was made from: a re-run redoes rows whose model or source changed
PROVENANCE_COLUMNS = ["model_hash", "source_size", "source_mtime_ns"]
RUN_FILES = ("run.json", "provenance.json", "index.csv", "skipped.csv")
# the files that make a model (phendiff: unet/ + scheduler/; phenldiff: adapter/ + embeddings + scheduler/)
MODEL_PARTS = (INFO_FILE, "unet", "scheduler", "adapter", "condition_embeddings.safetensors")
WARN_CLIPPED = 0.05  # a clipped fraction above this earns a warning (training images stay under ~2%)
NOT_COMPARED = ("max_clipped",)  # settings that decide which images run, not their numbers


@dataclass
class TranslateSettings:
    """What decides the numbers in a run; a re-run with other settings needs --overwrite."""

    model_dir: str
    input: str
    targets: list[str] | None = None
    source: str | None = None
    steps: int = 50
    seed: int = 0
    inversion: str = "fixed-point"
    inversion_iters: int = 5
    batch_size: int = 16
    guidance_scale: float = 1.0  # classifier-free guidance of the targets; 1 = none (exact inversion)
    # refuse an input with more of its pixel values outside the model's training range (they are clipped)
    max_clipped: float = 0.5


# ------------------------------------------------------------------------------------------ names
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


# -------------------------------------------------------------------------------------- messages
def warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


class Notices:
    """Per-file messages: the first few of each kind in full, then a count (thousands of identical
    lines would bury the one that matters)."""

    def __init__(self, limit: int = 3) -> None:
        self.limit = limit
        self.counts: Counter[str] = Counter()
        self.summaries: dict[str, str] = {}

    def add(self, kind: str, line: str, summary: str, prefix: str = "warning: ") -> None:
        self.counts[kind] += 1
        self.summaries[kind] = prefix + summary
        if self.counts[kind] <= self.limit:
            print(prefix + line, file=sys.stderr)

    def close(self) -> None:
        for kind, n in self.counts.items():
            if n > self.limit:
                print(self.summaries[kind].replace("{n}", str(n)), file=sys.stderr)


# ------------------------------------------------------------------------------------ checks
def check_guidance(settings: TranslateSettings, info: ModelInfo) -> None:
    """Guidance steers along (condition - null); a model never trained with condition dropout has an
    untrained null condition, so guided targets would follow noise."""
    if settings.guidance_scale == 1:
        return
    dropout = info.cond_dropout
    if dropout is None:  # older models: their training config may still say
        config = info.training.get("config") if isinstance(info.training, dict) else None
        if isinstance(config, dict) and isinstance(config.get("cond_dropout"), (int, float)):
            dropout = float(config["cond_dropout"])
    if dropout is not None and dropout <= 0:
        raise PhenolensError(f"--guidance-scale {settings.guidance_scale:g}: {settings.model_dir} was trained "
                             "without condition dropout, so its null condition was never trained and guidance "
                             "would be meaningless; use --guidance-scale 1, or train with --cond-dropout 0.1")
    if dropout is None:
        warn(f"--guidance-scale {settings.guidance_scale:g}: {settings.model_dir} does not record its condition "
             "dropout (an older model); if it was trained without --cond-dropout its null condition is untrained "
             "and guided translations are meaningless")


def check_settings(settings: TranslateSettings) -> None:
    if settings.steps < 1:
        raise PhenolensError(f"--steps must be at least 1, got {settings.steps}")
    if not 0 <= settings.max_clipped <= 1:
        raise PhenolensError(f"--max-clipped must be a fraction in [0, 1], got {settings.max_clipped}")


class InputCheck:
    """Compares each source with the training set: dtype, and how much of it the normaliser clips."""

    def __init__(self, model: CounterfactualModel, settings: TranslateSettings, notices: Notices) -> None:
        self.normalizer = model.normalizer
        stats = model.info.input_stats if isinstance(model.info.input_stats, dict) else {}
        self.dtype = stats.get("dtype") if isinstance(stats.get("dtype"), str) else None
        self.max_clipped = settings.max_clipped
        self.notices = notices

    def __call__(self, path: Path, raw: np.ndarray, layout: ImageLayout) -> float:
        """The clipped fraction of RAW; warns or raises (one line naming PATH)."""
        clipped = clipped_fraction(raw, self.normalizer)
        span = self._range()
        if clipped > self.max_clipped:
            raise PhenolensError(
                f"{path}: {clipped:.0%} of its pixel values ({layout.dtype}, {float(np.nanmin(raw)):g}.."
                f"{float(np.nanmax(raw)):g}) lie outside the model's training range ({span}) and would be clipped; "
                f"it is unlike the training images (other bit depth or scaling?). Convert it like the training "
                f"set, or raise --max-clipped (now {self.max_clipped:g}) to translate it anyway")
        problem = self._dtype_problem(layout.dtype)
        if problem:
            self.notices.add("dtype", f"{path}: {problem}; results may be meaningless",
                             f"{{n}} images in all with that problem ({problem})")
        if clipped > WARN_CLIPPED:
            self.notices.add("clipped", f"{path}: {clipped:.1%} of its pixel values lie outside the model's "
                             f"training range ({span}) and are clipped (column clipped_fraction in index.csv)",
                             f"{{n}} images in all have more than {WARN_CLIPPED:.0%} of their values clipped")
        return clipped

    def _range(self) -> str:
        lo, hi = self.normalizer.low, self.normalizer.high
        return ", ".join(f"{a:g}..{b:g}" for a, b in zip(lo, hi))

    def _dtype_problem(self, dtype: str) -> str | None:
        if self.dtype is not None:
            if dtype != self.dtype:
                return f"{dtype} pixels, the model was trained on {self.dtype} images"
            return None
        # an older model: only its normalisation range is known
        try:
            kind = np.dtype(dtype)
        except TypeError:
            return None
        if kind.kind in "iu" and max(self.normalizer.high) > np.iinfo(kind).max:
            return (f"{dtype} pixels cannot reach the model's training range (up to "
                    f"{max(self.normalizer.high):g})")
        return None


# --------------------------------------------------------------------------------- the folder
def _is_legacy_run(out: Path) -> bool:
    """A run folder of a phenolens that wrote no marker: run.json naming a model and an index.csv."""
    run_json, index = out / "run.json", out / "index.csv"
    if (out / MARKER).exists() or not run_json.is_file() or not index.is_file():
        return False
    try:
        data = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_dir" in data and "input" in data


def _previous_settings(out: Path) -> dict | None:
    run_json = out / "run.json"
    if not run_json.is_file():
        return None
    try:
        data = json.loads(run_json.read_text())
    except (OSError, ValueError) as err:
        raise PhenolensError(f"{run_json}: unreadable ({err}); pass --overwrite to replace this run "
                             "or choose another OUT") from None
    if not isinstance(data, dict):
        raise PhenolensError(f"{run_json}: not a JSON object; pass --overwrite to replace this run or choose another OUT")
    return data


def open_run_folder(out: Path, settings: TranslateSettings, overwrite: bool) -> OutputFolder:
    """Reopen (resume), replace (--overwrite: recorded files only) or create the run folder.

    Refuses to mix results of different settings, and never writes into a folder phenolens did not
    make (an older phenolens run folder is adopted: only what its index lists becomes ours).
    """
    marked = (out / MARKER).is_file()
    legacy = not marked and _is_legacy_run(out)
    if out.is_dir() and not marked and not legacy and any(out.iterdir()):
        raise PhenolensError(f"OUT {out}: folder is not empty and holds no phenolens run; phenolens never writes "
                             "into or clears such a folder (not even with --overwrite): choose a new or empty one")
    if (marked or legacy) and not overwrite:
        previous = _previous_settings(out)
        if previous is not None:
            wanted = {k: v for k, v in asdict(settings).items() if k not in NOT_COMPARED}
            defaults = asdict(TranslateSettings(model_dir="", input=""))  # a run from before a setting existed
            diff = [k for k in wanted if previous.get(k, defaults.get(k)) != wanted[k]]
            if diff:
                raise PhenolensError(f"{out}: holds a run with other settings ({', '.join(diff)}); pass --overwrite "
                                     "to replace it or choose another OUT")
    folder = OutputFolder.open(out, KIND, overwrite=overwrite and not legacy, adopt=legacy)
    if legacy:
        adopt_legacy(folder)
        if overwrite:
            folder.clear()
    return folder


def adopt_legacy(folder: OutputFolder) -> None:
    """Record what an older phenolens wrote: its run files and the outputs its index lists."""
    out = folder.path
    paths = [name for name in RUN_FILES if (out / name).is_file()]
    rows, _ = read_previous_rows(out / "index.csv")
    for row in rows:
        for col in ("output_path", "reconstruction_path"):
            rel = _inside(folder, row.get(col))
            if rel is not None and (out / rel).is_file() and not (out / rel).is_symlink():
                paths.append(rel)
    folder.record(*paths)
    print(f"{out}: a run folder of an older phenolens; adopted it (only the {len(set(paths))} files it lists can "
          "ever be replaced)", file=sys.stderr)


def _inside(folder: OutputFolder, text: str | None) -> str | None:
    """TEXT as a path inside the folder, or None (empty, absolute elsewhere, or climbing out)."""
    if not text:
        return None
    try:
        rel = folder.relative(text)
    except ValueError:
        return None
    return None if rel.startswith("/") or "/../" in f"/{rel}/" else rel


# -------------------------------------------------------------------------------- provenance
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
        if any(_inside(self.folder, f) is None or not (out / f).is_file() for f in files):
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


# ---------------------------------------------------------------------------------------- run
def run_translate(settings: TranslateSettings, out: str | Path, *, overwrite: bool = False,
                  skip_bad: bool = False, device: str | None = None, progress: bool = True) -> Path:
    """Translate every image of INPUT to every target; returns the path of index.csv."""
    out = Path(out)
    check_settings(settings)
    model = load_model_for(settings.model_dir, device=device)
    records = discover(settings.input, condition=settings.source)
    for rec in records:
        model.info.condition_index(rec.condition, "--from" if settings.source else f"source condition of {rec.path}")
    if settings.targets:  # recorded (and compared on a re-run) as used: once each
        settings = replace(settings, targets=unique_targets(settings.targets))
    targets = settings.targets or model.conditions
    for t in targets:
        model.info.condition_index(t, "--to")
    check_guidance(settings, model.info)
    records = _unique_records(records)
    check_apart(out, inputs=[Path(settings.input), *(r.path for r in records)], models=[Path(settings.model_dir)])

    folder = open_run_folder(out, settings, overwrite)
    notices = Notices()
    provenance_path, run_json, index_path = out / "provenance.json", out / "run.json", out / "index.csv"
    cache = _read_cache(provenance_path)
    model_hash, model_files, model_mtime = model_fingerprint(Path(settings.model_dir), cache)
    folder.record(provenance_path.name, run_json.name, index_path.name)
    write_json_atomic(provenance_path, dict(model_dir=settings.model_dir, model_hash=model_hash, model_files=model_files))
    write_json_atomic(run_json, dict(asdict(settings), model_hash=model_hash))

    rows, note = read_previous_rows(index_path)
    if note:
        print(note, file=sys.stderr)
    previous = Previous(folder, rows, model_hash, model_mtime)
    folders = plan_outputs(records)
    done: dict[tuple[str, str], list[dict]] = {}
    todo: list[ImageRecord] = []
    for rec in records:
        kept = previous.done(rec, targets, notices)
        if kept is None:
            todo.append(rec)
        else:
            done[record_key(rec)] = kept
    gone = len({k for k in previous.by_key} - {record_key(r) for r in records})
    if gone:
        print(f"{index_path}: {gone} image(s) listed there are no longer in {settings.input}; "
              "left out of index.csv (their files stay)", file=sys.stderr)

    latent_columns = LATENT_COLUMNS if model.latent else []
    meta_names = meta_column_names(records, INDEX_COLUMNS + LATENT_COLUMNS + STAT_COLUMNS + PROVENANCE_COLUMNS,
                                   settings.input)
    columns = INDEX_COLUMNS + latent_columns + STAT_COLUMNS + PROVENANCE_COLUMNS + list(meta_names.values())

    def meta(rec: ImageRecord) -> dict:
        return {meta_names[k]: v for k, v in rec.meta.items()}

    for rec in records:  # rows kept as done still get the manifest's current columns
        for r in done.get(record_key(rec), []):
            r.update({k: "" for k in meta_names.values()}, **meta(rec))

    def write_index() -> None:
        write_csv_atomic(index_path, [r for rec in records for r in done.get(record_key(rec), [])], columns,
                         only_if_changed=True)

    skipped: list[tuple[Path, str]] = []
    check = InputCheck(model, settings, notices)
    torch.manual_seed(settings.seed)
    bar = tqdm(total=len(todo), desc="translate", unit="img", disable=None if progress else True)  # no bar when not a terminal
    for batch in batches_by_shape(todo, settings.batch_size, model.info.channels, model.info.n_channels,
                                  skip_bad, skipped, check=check):
        recs = [item.rec for item in batch]
        result = model.translate([item.raw for item in batch], [r.condition for r in recs], targets,
                                 steps=settings.steps, inversion=settings.inversion, iters=settings.inversion_iters,
                                 guidance_scale=settings.guidance_scale)
        planned = [output_paths(folders[record_key(item.rec)], item.rec, targets) for item in batch]
        folder.record(*(p for recon_rel, paths in planned for p in (recon_rel, *paths.values())))  # before writing:
        for i, item in enumerate(batch):  # a crash never leaves a file of ours unlisted
            rec, layout = item.rec, item.layout
            recon_rel, paths = planned[i]
            write_image(out / recon_rel, result.reconstructions[i], layout)
            mae_raw, mse_raw = raw_errors(item.raw, as_stored(result.reconstructions[i], layout.dtype))
            recon_mse = float(result.recon_mse[i])
            common = dict(source_path=str(rec.path), source_condition=rec.condition,
                          recon_mse=f"{recon_mse:.6g}", recon_psnr=f"{float(psnr_from_mse(recon_mse)):.3f}",
                          reconstruction_path=recon_rel.as_posix(), clipped_fraction=f"{item.clipped:.6g}",
                          recon_mae_raw=f"{mae_raw:.6g}", recon_mse_raw=f"{mse_raw:.6g}", source_dtype=layout.dtype,
                          model_hash=model_hash, source_size=item.stamp[0], source_mtime_ns=item.stamp[1],
                          **meta(rec))
            if model.latent:
                common.update(latent_recon_mse=f"{float(result.latent_recon_mse[i]):.6g}",
                              autoencoder_mse=f"{float(result.autoencoder_mse[i]):.6g}")
            new_rows = []
            for target in targets:
                rel = paths[target]
                kind = "reconstruction" if target == rec.condition else "translation"
                if kind == "translation":
                    write_image(out / rel, result.translations[target][i], layout)
                row = dict(common, target_condition=target, output_path=rel.as_posix(), kind=kind,
                           change_mse=f"{float(result.change_mse[target][i]):.6g}")
                if model.latent:
                    row["latent_change_mse"] = f"{float(result.latent_change_mse[target][i]):.6g}"
                new_rows.append(row)
            done[record_key(rec)] = new_rows
        write_index()
        bar.update(len(batch))
    bar.close()
    write_index()
    notices.close()
    skipped_path = out / "skipped.csv"
    if skipped:
        folder.record(skipped_path.name)
        write_skipped(skipped_path, skipped)
        print(f"skipped {len(skipped)} unusable file(s); list in {skipped_path}")
    elif skipped_path.is_file() and folder.owns(skipped_path.name):
        skipped_path.unlink()  # from an earlier run whose bad files are now done or gone
    return index_path


def output_paths(folder: Path, rec: ImageRecord, targets: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    """(reconstruction, {target: file}) of one source, relative to the run folder; the source's own
    condition maps to its reconstruction."""
    ext = output_extension(rec.path)
    recon = folder / f"reconstruction{ext}"
    return recon, {t: recon if t == rec.condition else folder / target_file(t, ext) for t in targets}


def _unique_records(records: list[ImageRecord]) -> list[ImageRecord]:
    """One record per (file, condition): a file listed twice under one condition would write the same
    outputs twice and duplicate its rows."""
    seen: dict[tuple[str, str], ImageRecord] = {}
    for rec in records:
        seen.setdefault((os.path.realpath(rec.path), rec.condition), rec)
    if len(seen) < len(records):
        warn(f"{len(records) - len(seen)} image(s) are listed twice under the same condition; each is translated once")
    return list(seen.values())


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        files = data.get("model_files") if isinstance(data, dict) else None
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError):
        return {}


def as_stored(raw: np.ndarray, dtype: str) -> np.ndarray:
    """RAW as the output file holds it (integers rounded and clipped to the dtype), so the raw-unit
    error is the error of the file the user gets."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return np.asarray(raw, dtype=np.float64)
    x = np.nan_to_num(np.asarray(raw, dtype=np.float64))
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.clip(np.rint(x), info.min, info.max)
    if dt.kind == "f":
        return x.astype(dt).astype(np.float64)
    return x


@dataclass
class Source:
    """One source read for translation: its record, pixels, layout, clipped fraction and stat stamp."""

    rec: ImageRecord
    raw: np.ndarray
    layout: ImageLayout
    clipped: float
    stamp: tuple[str, str]


def batches_by_shape(records: Sequence[ImageRecord], batch_size: int, channels: list[int] | None,
                     n_channels: int, skip_bad: bool, skipped: list,
                     check: Callable[[Path, np.ndarray, ImageLayout], float] | None = None) -> Iterator[list[Source]]:
    """Read images and yield batches of `Source` that share one shape.

    Images are read lazily, a batch at a time, so a large input never sits in memory whole. CHECK
    (the input check) may refuse an image; with SKIP_BAD it is listed instead.
    """
    pending: dict[tuple, list[Source]] = defaultdict(list)
    for rec in records:
        try:
            stamp = source_stamp(rec.path)  # before reading: a file changed meanwhile is redone next time
            raw, layout = read_image(rec.path, channels=channels)
            if raw.shape[0] != n_channels:
                raise PhenolensError(f"{rec.path}: has {raw.shape[0]} channels, the model expects {n_channels}"
                                     " (pick them with the model's --channels at training)")
            clipped = check(rec.path, raw, layout) if check is not None else 0.0
        except (PhenolensError, OSError) as err:
            if not skip_bad:
                if isinstance(err, OSError):
                    raise PhenolensError(f"{rec.path}: cannot read ({err.strerror or err})") from None
                raise
            skipped.append((rec.path, str(err)))
            continue
        group = pending[raw.shape]
        group.append(Source(rec, raw, layout, clipped, stamp))
        if len(group) == batch_size:
            yield group
            pending[raw.shape] = []
    for group in pending.values():
        if group:
            yield group


__all__ = ["TranslateSettings", "run_translate", "INDEX_COLUMNS", "ImageLayout", "safe_name", "plan_outputs",
           "target_file"]
