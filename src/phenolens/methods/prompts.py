"""How a condition becomes the text a text-conditioned model (Phen-LDiff) is told.

Kept free of torch so that the command line can show the defaults in `--help` without loading it.
"""

from __future__ import annotations

from typing import Mapping

PROMPT_TEMPLATE = "a fluorescence microscopy image of {condition} cells"
# prompt: the text encoder's embedding of the prompt, fixed; learned: that embedding trained further
CONDITIONINGS = ("prompt", "learned")


def prompt_for(condition: str, template: str = PROMPT_TEMPLATE, overrides: Mapping[str, str] | None = None) -> str:
    """The condition's own prompt when one was given, else the template filled with its name."""
    if overrides and overrides.get(condition):
        return overrides[condition]
    return template.format(condition=condition)
