"""Which (original, counterfactual) pairs the study page shows, read from a translate run.

A teaching page should show what the target condition looks like on these cells. With `--minimal-edit`
the judges marked each edit `flipped` when they saw it as the target; an edit they did not flip may not
show the target at all, so by default only flipped edits are kept (per source -> target group; a group
with none flipped keeps all and says so). Everything here reads; `study.py` draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from phenolens.data.records import pick_evenly
from phenolens.errors import PhenolensError
from phenolens.report.run_data import RunInfo, load_run, load_set

MINIMAL_SHOWN = ("t_skip", "flipped", "flip_probability", "ssim")  # the minimal edit's columns, as index.csv has them


@dataclass(eq=False)  # compared by identity: fields hold arrays
class Pair:
    """One source image and its counterfactual, both in the model's units [-1, 1]."""

    key: str  # the source path as index.csv gives it
    name: str
    source_condition: str
    target: str  # the condition the edit moves towards
    edit: str  # the edit's label (index.csv's target_condition: the target, or e.g. to=high,omega=2)
    row: dict
    original: np.ndarray
    counterfactual: np.ndarray
    normalised_by: str = "model"


@dataclass
class Group:
    """The pairs of one source -> target condition, and how they were chosen."""

    source_condition: str
    target: str
    pairs: list[Pair] = field(default_factory=list)
    translations: int = 0  # translation rows of the run in this group
    flipped: int | None = None  # of them flipped by the judges; None when the run has no minimal edit
    kept: str = "all"  # "flipped" (only flipped edits), "all" (--all or not a minimal-edit run), "none-flipped"


@dataclass
class StudyData:
    """What study.html shows."""

    run: RunInfo
    groups: list[Group]
    minimal_edit: bool


def is_translation(row: dict) -> bool:
    """A row whose output is an edit to another condition (not the image's reconstruction)."""
    kind = (row.get("kind") or "translation").strip()
    return kind == "translation" and row["target_condition"] != row["source_condition"]


def _rank(name: str, order: Sequence[str]) -> int:
    return order.index(name) if name in order else len(order)


def group_rows(run: RunInfo) -> dict[tuple[str, str], list[dict]]:
    """Translation rows by (source condition, target condition), in the run's condition order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in run.rows:
        if is_translation(r):
            target = r.get("reference_condition") or r["target_condition"]
            groups.setdefault((r["source_condition"], target), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (_rank(kv[0][0], run.order), _rank(kv[0][1], run.order))))


def choose(rows: list[dict], minimal_edit: bool, keep_all: bool) -> tuple[list[dict], int | None, str]:
    """(rows to show, how many flipped or None, rule used) for one group; see the module docstring."""
    if not minimal_edit:
        return rows, None, "all"
    flipped = [r for r in rows if str(r.get("flipped", "")).strip() in ("1", "True", "true")]
    if keep_all:
        return rows, len(flipped), "all"
    if flipped:
        return flipped, len(flipped), "flipped"
    return rows, 0, "none-flipped"


def read_study(run_dir: str | Path, *, keep_all: bool = False, max_pairs: int = 12,
               progress: bool = True) -> StudyData:
    """The run's pairs to show, at most MAX_PAIRS per group (spread evenly over the run's rows).

    Refuses a folder that is not a translate run, or a run without a translation to another condition,
    with one line naming it (`PhenolensError`). An unreadable or missing image costs its pair and
    becomes a warning on the page."""
    run = load_run(run_dir)  # one-line errors for a folder without (a readable) index.csv
    minimal_edit = all(c in run.rows[0] for c in MINIMAL_SHOWN)
    grouped = group_rows(run)
    if not grouped:
        raise PhenolensError(f"{run.run_dir / 'index.csv'}: lists no translation to another condition (only "
                             "reconstructions); run `phenolens translate` with --to a condition other than "
                             "the source's")
    todo: list[tuple[Group, dict]] = []
    groups = []
    for (source, target), rows in grouped.items():
        shown, flipped, rule = choose(rows, minimal_edit, keep_all)
        group = Group(source, target, translations=len(rows), flipped=flipped, kept=rule)
        groups.append(group)
        todo += [(group, r) for r in pick_evenly(shown, max_pairs)]
    for group, row in tqdm(todo, desc="teach: read", unit="pair", disable=None if progress else True):
        s = load_set(run, row["source_path"], [row])
        original, counterfactual = s.source, s.outputs.get(row["target_condition"])
        if original is None or counterfactual is None or original.shape != counterfactual.shape:
            run.warnings.append(f"{row['source_path']} -> {row['target_condition']}: left out (its source or "
                                "counterfactual could not be read, see above, or their sizes differ)")
            continue
        group.pairs.append(Pair(key=row["source_path"], name=s.name, source_condition=group.source_condition,
                                target=group.target, edit=row["target_condition"], row=row, original=original,
                                counterfactual=counterfactual, normalised_by=s.normalised_by))
    if not any(g.pairs for g in groups):
        raise PhenolensError(f"{run.run_dir}: no translation could be shown (sources or outputs unreadable: "
                             f"{run.warnings[-1] if run.warnings else 'no details'})")
    return StudyData(run, groups, minimal_edit)
