"""`write_teaching`: read the run (and the quiz images), then write OUT's pages, key and animations.

OUT is a phenolens output folder (`folders.py`): it holds `.phenolens.json`, the list of what was written
there, so a later `--overwrite` removes exactly those files. A non-empty folder phenolens did not write,
a folder of another kind, or one holding earlier teaching pages without `--overwrite` is refused before
anything is read or written; every input is read and checked before OUT is touched, so a bad input
never leaves half a folder. Each file is written atomically (`atomic.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from phenolens.atomic import write_bytes_atomic, write_csv_atomic, write_text_atomic
from phenolens.errors import PhenolensError
from phenolens.folders import MARKER, OutputFolder, check_apart
from phenolens.run.index import resolve_source
from phenolens.run.naming import safe_name, short_hash
from phenolens.teach.animation import mp4_available, write_mp4
from phenolens.teach.pairs import StudyData, read_study
from phenolens.teach.quiz import KEY_COLUMNS, Quiz, key_rows, read_quiz
from phenolens.teach.quiz_page import quiz_page
from phenolens.teach.study import render_pair, scales_of, study_page

KIND = "teach"
STUDY, QUIZ, KEY, ANIMATIONS = "study.html", "quiz.html", "quiz_key.csv", "animations"


@dataclass
class TeachSettings:
    """The options of `phenolens teach` (see its --help)."""

    keep_all: bool = False
    max_pairs: int = 12
    frames: int = 8
    quiz_data: str | Path | None = None
    quiz_items: int = 20
    seed: int = 0


@dataclass
class TeachResult:
    """What was written, for the command to print."""

    study: Path
    animations: list[Path]
    quiz: Path | None = None
    key: Path | None = None
    quiz_items: int = 0
    pairs: int = 0
    notes: list[str] = field(default_factory=list)


def check_settings(s: TeachSettings) -> None:
    for option, value, least in (("--max-pairs", s.max_pairs, 1), ("--frames", s.frames, 2),
                                 ("--quiz-items", s.quiz_items, 1)):
        if value < least:
            raise PhenolensError(f"{option} must be at least {least}, got {value}")


def check_out(out: Path, run_dir: Path, quiz_data: Path | None, overwrite: bool) -> None:
    """Refuse OUT before any work: see the module docstring. OUT may lie inside RUN (like RUN/measure/)
    but may not be or contain it, nor touch the quiz images."""
    if quiz_data is not None:
        check_apart(out, inputs=[quiz_data], option="OUT")
    o, r = Path(os.path.realpath(out)), Path(os.path.realpath(run_dir))
    if o == r or o in r.parents:
        raise PhenolensError(f"OUT {out}: is or contains the run {run_dir}; choose a new folder, "
                             f"e.g. {run_dir / 'teach'}")
    if out.exists() and not out.is_dir():
        raise PhenolensError(f"OUT {out}: exists and is not a folder")
    marker = out / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
            kind, files = str(data["kind"]), list(data.get("files", []))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PhenolensError(f"{marker}: unreadable phenolens marker ({err}); choose another folder") from None
        if kind != KIND:
            raise PhenolensError(f"OUT {out}: holds a phenolens {kind} output, not teaching pages; "
                                 "choose another folder")
        if files and not overwrite:
            raise PhenolensError(f"OUT {out}: holds the pages of an earlier `phenolens teach`; add --overwrite to "
                                 "replace them (only the files phenolens wrote there are removed)")
    elif out.is_dir() and any(out.iterdir()):
        raise PhenolensError(f"OUT {out}: folder is not empty and was not written by phenolens; phenolens never "
                             "writes into such a folder: choose a new or empty one")


def animation_name(source_condition: str, name: str, edit: str, key: str) -> str:
    """A readable, unique file name for one pair's animation (the hash tells same-named files apart)."""
    stem = Path(name).stem
    return (f"{safe_name(source_condition, 30)}_{safe_name(stem, 40)}_to_{safe_name(edit, 40)}"
            f"-{short_hash(key, source_condition, edit)}")


def _write(folder: OutputFolder, rel: str, data: bytes | str) -> Path:
    """Record REL as phenolens' own before writing it (a killed run leaves nothing unlisted), then write."""
    path = folder.path / rel
    folder.record(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        write_bytes_atomic(path, data)
    else:
        write_text_atomic(path, data)
    return path


def write_teaching(run_dir: str | Path, out: str | Path, settings: TeachSettings | None = None, *,
                   overwrite: bool = False, progress: bool = True) -> TeachResult:
    """Write OUT/study.html, OUT/animations/*.gif (and .mp4 with imageio_ffmpeg) and, with
    settings.quiz_data, OUT/quiz.html and OUT/quiz_key.csv. Returns what was written."""
    s = settings or TeachSettings()
    run_dir, out = Path(run_dir), Path(out)
    quiz_data = Path(s.quiz_data) if s.quiz_data is not None else None
    check_settings(s)
    check_out(out, run_dir, quiz_data, overwrite)

    # read and check every input before OUT is touched
    study: StudyData = read_study(run_dir, keep_all=s.keep_all, max_pairs=s.max_pairs, progress=progress)
    run = study.run
    # pages inside the images the run translated would be read back as a condition folder
    sources = [resolve_source(k, run.run_dir) for k in dict.fromkeys(r["source_path"] for r in run.rows)]
    translated = [Path(str((run.settings or {}).get("input")))] if (run.settings or {}).get("input") else []
    check_apart(out, inputs=translated + [p for p in sources if p is not None], option="OUT")
    quiz: Quiz | None = None
    if quiz_data is not None:
        channels = run.model.get("channels") if run.model else None
        quiz = read_quiz(quiz_data, s.quiz_items, s.seed, channels=channels if isinstance(channels, list) else None,
                         normalizer=run.normalizer, exclude=[p for p in sources if p is not None], progress=progress)

    pairs = [p for g in study.groups for p in g.pairs]
    names = {id(p): animation_name(p.source_condition, p.name, p.edit, p.key) for p in pairs}
    mp4 = mp4_available()
    planned = [STUDY, *(f"{ANIMATIONS}/{n}.{ext}" for n in names.values() for ext in ("gif", "mp4")[:1 + mp4])]
    planned += [QUIZ, KEY] if quiz is not None else []
    folder = OutputFolder.open(out, KIND, overwrite=overwrite, option="OUT")
    theirs = [rel for rel in planned if (out / rel).exists() and not folder.owns(rel)]
    if theirs:
        raise PhenolensError(f"OUT {out}: {theirs[0]} exists and was not written by phenolens; it is never replaced: "
                             "move it or choose another folder")

    result = TeachResult(study=out / STUDY, animations=[], pairs=len(pairs))
    scales = scales_of(study)
    rendered, files = {}, {}
    todo = [(i, p) for i, g in enumerate(study.groups) for p in g.pairs]
    for i, p in tqdm(todo, desc="teach: render", unit="pair", disable=None if progress else True):
        r = render_pair(p, scales[i], s.frames)
        rel = f"{ANIMATIONS}/{names[id(p)]}.gif"
        result.animations.append(_write(folder, rel, r.transition_gif))
        if mp4:  # optional: the first failure stops the MP4s and says why, the GIFs go on
            folder.record(rel[:-4] + ".mp4")
            problem = write_mp4(out / (rel[:-4] + ".mp4"), r.frames)
            if problem is None:
                result.animations.append(out / (rel[:-4] + ".mp4"))
            else:
                mp4 = False
                result.notes.append(f"no MP4 beside the GIFs: {problem}")
        rendered[id(p)], files[id(p)] = r, rel
    if not mp4_available():
        result.notes.append("no MP4 beside the GIFs: imageio_ffmpeg is not installed (pip install imageio-ffmpeg)")
    _write(folder, STUDY, study_page(study, rendered, files, scales))

    if quiz is not None:
        result.quiz, result.key = out / QUIZ, out / KEY
        _write(folder, QUIZ, quiz_page(quiz, run.run_dir.resolve().name))
        folder.record(KEY)
        write_csv_atomic(out / KEY, key_rows(quiz), KEY_COLUMNS)
        result.quiz_items = len(quiz.items)
        if len(quiz.items) < s.quiz_items:
            result.notes.append(f"--quiz-items {s.quiz_items}: {quiz_data} has {quiz.available} usable image(s); "
                                f"the quiz has {len(quiz.items)}")
        if not set(quiz.conditions) & set(run.order):
            result.notes.append(f"--quiz-data {quiz_data}: its conditions ({', '.join(quiz.conditions)}) are none of "
                                f"the run's ({', '.join(run.order)}); is it the right folder?")
        if quiz.excluded:
            result.notes.append(f"{quiz.excluded} image(s) of {quiz_data} left out of the quiz: "
                                "the run translated them")
    return result
