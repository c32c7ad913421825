"""Edits: how a counterfactual changes an image's condition, as a value a user writes and finds again.

Every edit has a `label` in `key=value[,key=value]` form, which is what `index.csv`'s `edit` column
holds and what the command line accepts. Today's methods condition on a condition's name, so their edit
is "render under another condition" (`to=high`). DiffEx moves a semantic code along a learned direction
(`direction=k,alpha=a`) and DIFFusion moves an image embedding towards a condition's mean
(`to=high,omega=w`): they add their own Edit classes and parsers, not a change to the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Edit(Protocol):
    """What the core needs of an edit."""

    @property
    def label(self) -> str:
        """How index.csv and the command line write it (`key=value[,key=value]`)."""

    @property
    def target_condition(self) -> str:
        """The condition the edited image is meant to show ('' when the edit names none)."""

    def is_identity(self, source: str) -> bool:
        """True when the edit leaves an image of condition SOURCE as it is: its result is then the
        reconstruction, which is not rendered twice."""


@dataclass(frozen=True)
class ToCondition:
    """Render the image under another condition (PhenDiff eq. 5, Phen-LDiff §3.3)."""

    target: str

    @property
    def label(self) -> str:
        return f"to={self.target}"

    @property
    def target_condition(self) -> str:
        return self.target

    def is_identity(self, source: str) -> bool:
        return source == self.target


def parse_fields(text: str) -> dict[str, str]:
    """`key=value,key=value` -> dict; a bare word is `{"to": word}` (a condition's name, as `--to` takes it)."""
    if "=" not in text:
        return {"to": text}
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"edit {text!r}: write it as key=value[,key=value] (e.g. to=high)")
        fields[key.strip()] = value.strip()
    return fields


def target_of(text: str) -> str:
    """The condition a `to=COND` edit (or a bare condition name) names; ValueError for any other edit."""
    fields = parse_fields(text)
    if set(fields) != {"to"} or not fields["to"]:
        raise ValueError(f"edit {text!r}: write to=<condition>; the methods of this version edit by condition only")
    return fields["to"]
