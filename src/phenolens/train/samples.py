"""Sample grids during training: the same noise under every condition, one row each.

How training is going, as a picture beside the model (and in TensorBoard when it is installed). The
model only needs `generate(noise, conditions, steps=)`, `code_shape`, `conditions`, `info` and `device`
(any `methods.core.CounterfactualModel`), so the trainer's layer never imports a method.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from phenolens.atomic import write_bytes_atomic
from phenolens.data.display import composite


@torch.no_grad()
def write_sample_grid(model, path: Path, step: int, per_condition: int = 4, steps: int = 50, seed: int = 0) -> None:
    """Samples from the same noise (drawn from SEED, never from torch's global generator) under every
    condition, written as PNG to PATH."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    n, size = len(model.info.conditions), model.info.image_size
    shape = model.code_shape(model.info.n_channels, size, size)
    noise = torch.randn(per_condition, *shape, generator=gen).repeat(n, 1, 1, 1)
    conditions = [c for c in model.conditions for _ in range(per_condition)]
    x = model.generate(noise.to(model.device), conditions, steps=steps).cpu()
    tiles = [composite(img.numpy()) for img in x]
    rows = [np.concatenate(tiles[i * per_condition:(i + 1) * per_condition], axis=1) for i in range(n)]
    grid = np.concatenate(rows, axis=0)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buf.getvalue())
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return
    with SummaryWriter(log_dir=str(path.parent.parent / "tensorboard")) as tb:
        tb.add_image("samples", grid, step, dataformats="HWC")
