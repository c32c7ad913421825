"""Which condition a field of a screen belongs to, from its metadata.

A screen's image table rarely has a `condition` column: the condition is spread over metadata such
as `Metadata_Compound` and `Metadata_Concentration` (the Cell Painting Gallery's LoadData CSVs), or
it is a pattern's field (`{plate}`), or there is one condition for the whole screen. `ConditionRule`
says which; the joined value ('taxol_0.3') names the crops' condition folder and the model's class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from phenolens.errors import PhenolensError

# Columns that name the condition on their own when no rule is given, in order of preference.
DEFAULT_CONDITION_COLUMNS = ("Metadata_Condition", "condition", "Metadata_condition", "Condition")
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


@dataclass(frozen=True)
class ConditionRule:
    """`columns`: metadata columns whose values, joined by '_', name the condition
    (`--condition-from Metadata_Compound,Metadata_Concentration`); `constant`: one condition for
    every field (`--condition untreated`). Neither: a default condition column must exist."""

    columns: tuple[str, ...] = ()
    constant: str | None = None

    def __post_init__(self) -> None:
        if self.columns and self.constant:
            raise PhenolensError("--condition and --condition-from: give one of them, not both")

    def resolve(self, available: Sequence[str], source: str) -> "ConditionRule":
        """This rule with its columns checked against AVAILABLE (a default column chosen if none given)."""
        if self.constant is not None:
            return self
        if self.columns:
            missing = [c for c in self.columns if c not in available]
            if missing:
                raise PhenolensError(f"--condition-from {','.join(self.columns)}: {source} has no column "
                                     f"{missing[0]!r} (it has: {', '.join(available) or 'none'})")
            return self
        for c in DEFAULT_CONDITION_COLUMNS:
            if c in available:
                return ConditionRule((c,))
        meta = [c for c in available if c.lower().startswith("metadata")] or list(available)
        raise PhenolensError(f"{source}: no condition column ({' or '.join(DEFAULT_CONDITION_COLUMNS[:2])}); "
                             f"say which columns name it with --condition-from (one of: {', '.join(meta) or 'none'}) "
                             "or give one condition for all with --condition NAME")

    def condition(self, meta: Mapping[str, str], where: str) -> str:
        """The condition of one field (a file-name-safe name), or a one-line error naming WHERE."""
        if self.constant is not None:
            return self.constant
        values = [str(meta.get(c, "")).strip() for c in self.columns]
        if not all(values):
            empty = self.columns[values.index("")] if "" in values else self.columns[0]
            raise PhenolensError(f"{where}: empty {empty}, so its condition is unknown; fill it in or leave the row out")
        name = "_".join(_UNSAFE.sub("-", v).strip("-") for v in values)
        if not name or name.startswith((".", "_")):
            raise PhenolensError(f"{where}: condition {'_'.join(values)!r} cannot name a folder; rename it")
        return name


def parse_condition_rule(condition: str | None, condition_from: Sequence[str] | str | None) -> ConditionRule:
    """The rule from the CLI's --condition / --condition-from."""
    cols: tuple[str, ...] = ()
    if condition_from:
        parts = condition_from.split(",") if isinstance(condition_from, str) else list(condition_from)
        cols = tuple(p.strip() for p in parts if p.strip())
    const = condition.strip() if condition and condition.strip() else None
    if const is not None and (const.startswith((".", "_")) or "/" in const):
        raise PhenolensError(f"--condition {condition!r}: cannot name a folder (no '/', no leading '.' or '_')")
    return ConditionRule(cols, const)


__all__ = ["ConditionRule", "DEFAULT_CONDITION_COLUMNS", "parse_condition_rule"]
