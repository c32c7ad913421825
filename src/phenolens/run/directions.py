"""`phenolens directions MODEL DATA OUT`: learn DiffEx's K directions in a model's semantic space.

DATA's images are encoded once into their semantic codes z_sem (the model's encoder and classifier);
the direction models are then trained on the codes alone (`phenolens.methods.diffex_directions`).
OUT holds directions.safetensors (weights and optimiser state) and directions.json (the model they
belong to, the settings, α, the loss every 100 steps). A run saves every `CHECKPOINT_EVERY` steps and
re-running the command resumes it exactly (same settings) or extends it (more --steps); --overwrite
starts again, removing only what phenolens wrote in OUT.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from phenolens.data.records import discover
from phenolens.errors import PhenolensError
from phenolens.folders import OutputFolder, check_apart
from phenolens.methods.diffex_directions import (DIRECTIONS_INFO, DirectionModels, DirectionSettings, DirectionsInfo,
                                                 code_spread, direction_loss, load_directions, model_identity,
                                                 save_directions)

logger = logging.getLogger(__name__)
KIND = "directions"
CHECKPOINT_EVERY = 500
LOSS_EVERY = 100
BEFORE_SETTING_EXISTED = {"standardize": False, "whiten": False}  # what directions saved before a setting existed did


def load_diffex(model_dir: str | Path, device: str | None = None):
    """The DiffEx model of MODEL_DIR; a clear error for another method's model."""
    from phenolens.methods.registry import load_model_for

    model = load_model_for(model_dir, device=device)
    if model.info.method != "diffex":
        raise PhenolensError(f"MODEL {model_dir}: is a {model.info.method} model; directions live in the semantic "
                             "space of a DiffEx model (`phenolens train --method diffex`)")
    return model


@torch.no_grad()
def encode_codes(model, records, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """z_sem of every image (N, d), images grouped by shape."""
    from tqdm.auto import tqdm

    from phenolens.data.io import read_image

    raws = [read_image(r.path, channels=model.info.channels)[0] for r in records]
    codes: list[torch.Tensor | None] = [None] * len(raws)
    by_shape: dict[tuple, list[int]] = {}
    for i, raw in enumerate(raws):
        by_shape.setdefault(raw.shape, []).append(i)
    bar = tqdm(total=len(raws), desc="encode", unit="img", disable=None if progress else True)
    for idx in by_shape.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            x0, _ = model.to_model_space([raws[i] for i in chunk])
            z = model.semantic_code(x0).float().cpu()
            for i, row in zip(chunk, z):
                codes[i] = row
            bar.update(len(chunk))
    bar.close()
    return torch.stack(codes)  # type: ignore[arg-type]


def _restore_adam(optimizer: torch.optim.Optimizer, saved: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in saved.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _same_run(saved: DirectionsInfo, settings: DirectionSettings, model_id: str) -> list[str]:
    """What differs between a saved run and this one (steps may grow)."""
    diffs = []
    if saved.model_id != model_id:
        diffs.append("they were learnt in another model's semantic space")
    now = {k: v for k, v in asdict(settings).items() if k != "steps"}
    for key, value in now.items():
        was = saved.settings.get(key, BEFORE_SETTING_EXISTED.get(key))
        if was != value:
            diffs.append(f"{key} {was} -> {value}")
    return diffs


def learn_directions(model_dir: str | Path, data: str | Path, out: str | Path, settings: DirectionSettings, *,
                     overwrite: bool = False, device: str | None = None, progress: bool = True) -> DirectionsInfo:
    """Encode DATA, train (or resume) the direction models, write OUT; returns directions.json's content."""
    from tqdm.auto import tqdm

    from phenolens.train.trainer import step_seed

    settings.check()
    model_dir, data, out = Path(model_dir), Path(data), Path(out)
    model = load_diffex(model_dir, device)
    records = discover(data)
    check_apart(out, inputs=[data, *(r.path for r in records)], models=[model_dir])
    folder = OutputFolder.open(out, KIND, overwrite=overwrite)
    model_id = model_identity(model_dir)
    saved = None
    if (out / DIRECTIONS_INFO).is_file():
        models, saved, adam = load_directions(out, optimizer_for=True)
        diffs = _same_run(saved, settings, model_id)
        if diffs:
            raise PhenolensError(f"OUT {out}: holds directions of another run ({'; '.join(diffs)}); run with the same "
                                 "settings to resume, or pass --overwrite to start again")
        if saved.steps_done >= settings.steps:
            logger.info("directions: %d steps done already (--steps %d): nothing to do", saved.steps_done, settings.steps)
            return saved
    z = encode_codes(model, records, progress=progress)
    if len(z) < 2:
        raise PhenolensError(f"DATA {data}: {len(z)} image(s); learning directions needs at least 2")
    if saved is None:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(settings.seed)
            models = DirectionModels(z.shape[1], settings.k)
        if settings.standardize:
            models.fit_standardization(z, whiten=settings.whiten)
    alpha = settings.alpha if settings.alpha is not None else code_spread(models.standardized(z))
    if saved is None:
        info = DirectionsInfo(model=str(model_dir.resolve()), model_id=model_id, dim=int(z.shape[1]),
                              settings=asdict(settings), alpha=float(alpha))
        adam = {}
    else:
        info = saved
        info.settings["steps"] = settings.steps
    if abs(info.alpha - alpha) > 1e-6 * max(1.0, abs(alpha)):
        raise PhenolensError(f"OUT {out}: its directions were learnt with α {info.alpha:.6g}, these codes give "
                             f"{alpha:.6g} (other DATA?); use the same DATA, or --overwrite")
    optimizer = torch.optim.Adam(models.parameters(), lr=settings.lr)
    if adam:
        _restore_adam(optimizer, adam)
    batch = min(settings.batch_size, len(z))
    losses: list[float] = []
    bar = tqdm(total=settings.steps, initial=info.steps_done, desc="directions", disable=None if progress else True)
    for step in range(info.steps_done, settings.steps):
        g = torch.Generator().manual_seed(step_seed(settings.seed, step, "directions"))
        idx = torch.randperm(len(z), generator=g)[:batch]
        loss = direction_loss(models, z[idx], info.alpha, settings.tau, settings.lambda_reg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.update(1)
        done = step + 1
        if done % LOSS_EVERY == 0 or done == settings.steps:
            info.loss.append(float(np.mean(losses)))
            losses = []
        if done % CHECKPOINT_EVERY == 0 or done == settings.steps:
            info.steps_done = done
            folder.record(*save_directions(out, models, info, optimizer))
    bar.close()
    return info


def directions_summary(info: DirectionsInfo) -> str:
    last = f", loss {info.loss[-1]:.4f}" if info.loss else ""
    return (f"{info.settings['k']} directions in a {info.dim}-value semantic space, α {info.alpha:.3g}, "
            f"{info.steps_done} steps{last}")


__all__ = ["directions_summary", "encode_codes", "learn_directions", "load_diffex"]
