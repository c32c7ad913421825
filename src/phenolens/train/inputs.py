"""What every method's training says about its inputs before it starts, whichever method it is."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def training_inputs(data: str | Path, records: Sequence) -> list[Path]:
    """What a model folder must stay apart from: DATA, every training file and the folders holding them."""
    files = [Path(r.path) for r in records]
    return [Path(data), *dict.fromkeys(p.parent for p in files), *files]


def condition_order_line(data: str | Path, conditions: Sequence[str], wanted: Sequence[str] | None) -> str:
    """One line saying in which order the conditions are stored (a dose series keeps its order in
    phenolens.json and the report's strips), and which rule gave that order."""
    from phenolens.data.records import condition_order_source

    order = ", ".join(conditions)
    if wanted:
        return f"conditions, in this order: {order} (from --conditions)"
    return f"conditions, in this order: {order} ({condition_order_source(data)}; pass --conditions to change)"


def size_line(images, asked: int | None) -> str:
    """One line saying at which size and scale the network learns the cells: the data's own (the
    default, nothing resized) or --size, and how many images that resized up."""
    lo, hi = images.input_stats.get("short_side", [None, None])
    if asked is None:
        return (f"training crops of {images.size} px: the data's own size (smallest short side {lo} px), no image "
                "resized; pass --size to choose")
    if images.resized_up:
        return (f"--size {images.size}: {images.resized_up} of {len(images.images)} images have a short side under "
                f"{images.size} px (smallest {lo} px) and are resized up to it; the model learns cells at that "
                "scale and translate resizes its inputs the same way (leave --size out to train at the data's "
                "own size)")
    return f"training crops of {images.size} px (--size; images {lo}-{hi} px, none resized)"
