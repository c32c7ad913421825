"""The quiz's items: held-out real images, picked evenly across conditions, read for display.

DIFFusion's user study tested people on real images balanced across classes (§4.3: 25 per class), so a
score reflects all of them and not the commonest one. Items are drawn the same way from `--quiz-data`
(listed by phenolens' own reader, `data/records.py`), with a fixed seed so the same quiz can be given
twice. All items share one intensity scale, since a brighter stain may be the very difference taught.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from phenolens.data.io import read_image
from phenolens.data.normalize import Normalizer
from phenolens.data.records import ImageRecord, conditions_in_order, discover
from phenolens.errors import PhenolensError

KEY_COLUMNS = ["item", "image", "truth", "path"]


@dataclass(eq=False)
class QuizItem:
    """One image of the quiz: its number (from 1), a name for the answers file, and its truth."""

    item: int
    image: str  # the path under --quiz-data, as the answers CSV names it
    path: Path
    truth: str
    pixels: np.ndarray  # model units [-1, 1]


@dataclass
class Quiz:
    """The items, the classes offered (the conditions found, in the data's order) and how it was made."""

    conditions: list[str]
    items: list[QuizItem]
    available: int  # images found, study sources excluded
    excluded: int  # images left out because the run translated them (the study page may show them)
    normalised_by: str


def quiz_records(quiz_data: Path, exclude: Iterable[Path] = ()) -> tuple[list[ImageRecord], list[str], int]:
    """(records, conditions, how many excluded) of --quiz-data, without the run's source images (EXCLUDE).

    Refused with one line: a missing folder, no images, or fewer than two conditions (a quiz with
    one class has only one answer)."""
    try:
        records = discover(quiz_data)
    except PhenolensError as err:
        raise PhenolensError(f"--quiz-data: {err}") from None
    conditions = conditions_in_order(records)
    if len(conditions) < 2:
        raise PhenolensError(f"--quiz-data {quiz_data}: holds {len(conditions)} condition ({', '.join(conditions)}); "
                             "a quiz needs real images of at least 2 conditions, one sub-folder per condition")
    seen = {p.resolve() for p in exclude}
    kept = [r for r in records if r.path.resolve() not in seen]
    if len(conditions_in_order(kept)) < 2:
        raise PhenolensError(f"--quiz-data {quiz_data}: once the run's own source images are left out, fewer "
                             "than 2 conditions remain; give held-out images the translate run did not use")
    return kept, conditions, len(records) - len(kept)


def pick_items(records: Sequence[ImageRecord], conditions: Sequence[str], n: int, seed: int) -> list[ImageRecord]:
    """N records taken in turn from each condition (random within it, SEED fixed), then shuffled.

    A condition with too few images gives what it has and the others fill up, so the quiz has
    min(N, all images) items."""
    rng = np.random.default_rng(seed)
    queues = []
    for c in conditions:
        mine = [r for r in records if r.condition == c]
        queues.append([mine[i] for i in rng.permutation(len(mine))])
    picked: list[ImageRecord] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return [picked[i] for i in rng.permutation(len(picked))]


def _display_name(path: Path, root: Path) -> str:
    base = root if root.is_dir() else root.parent
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.name


def read_quiz(quiz_data: str | Path, n: int, seed: int, *, channels: Sequence[int] | None = None,
              normalizer: Normalizer | None = None, exclude: Iterable[Path] = (), progress: bool = True) -> Quiz:
    """Pick N items of QUIZ_DATA and read them, scaled by NORMALIZER (the model's) when the channels fit,
    else by percentiles of all the quiz images together."""
    if n < 1:
        raise PhenolensError(f"--quiz-items must be at least 1, got {n}")
    root = Path(quiz_data)
    records, conditions, excluded = quiz_records(root, exclude)
    picked = pick_items(records, conditions, n, seed)
    raw = []
    for r in tqdm(picked, desc="teach: quiz", unit="img", disable=None if progress else True):
        try:
            raw.append(read_image(r.path, channels=channels)[0])
        except PhenolensError as err:
            raise PhenolensError(f"--quiz-data: {err}") from None
    odd = next(((r.path, x.shape[0]) for r, x in zip(picked, raw) if x.shape[0] != raw[0].shape[0]), None)
    if odd is not None:
        raise PhenolensError(f"--quiz-data: {odd[0]} has {odd[1]} channel(s), {picked[0].path} has "
                             f"{raw[0].shape[0]}; a quiz shows images of one kind")
    how = "the model's normalisation"
    if normalizer is None or normalizer.n_channels != raw[0].shape[0]:
        normalizer, how = Normalizer.fit(raw), "percentiles of the quiz images together"
    items = [QuizItem(i + 1, _display_name(r.path, root), r.path, r.condition, normalizer.to_model(x))
             for i, (r, x) in enumerate(zip(picked, raw))]
    return Quiz(conditions, items, len(records), excluded, how)


def key_rows(quiz: Quiz) -> list[dict]:
    """OUT/quiz_key.csv: the truth of every item, for whoever marks the answers."""
    return [dict(item=q.item, image=q.image, truth=q.truth, path=str(q.path.resolve())) for q in quiz.items]
