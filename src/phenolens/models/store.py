"""Save and load a phenolens model: diffusers' `save_pretrained` layout plus `phenolens.json`.

Layout of MODEL_DIR::

    phenolens.json       what the network means: conditions, channels, normalisation, size ...
    unet/                UNet2DModel.save_pretrained (safetensors only)
    scheduler/           DDIMScheduler.save_pretrained (the noise schedule it was trained with)

Loading never unpickles. A model is written into a temporary sibling folder and renamed into
place, so a crash never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phenolens.atomic import write_json_atomic
from phenolens.errors import PhenolensError

INFO_FILE = "phenolens.json"


@dataclass
class ModelInfo:
    """Everything needed to use a network on real files, besides its weights."""

    conditions: list[str]
    n_channels: int
    image_size: int
    normalization: dict[str, Any]
    method: str = "phendiff"
    channels: list[int] | None = None  # indices picked from the files (--channels), None = all
    preset: str = "tiny"
    prediction_type: str = "epsilon"
    training: dict[str, Any] = field(default_factory=dict)  # command line, steps, settings
    base: str | None = None  # a fine-tuned latent model: the pretrained pipeline it adapts (dir or hub id)
    adaptation: dict[str, Any] = field(default_factory=dict)  # ... and how (mode, rank, conditioning, prompts)
    version: str = ""
    # what the training images were, so that translate can warn about inputs unlike them (issue 9):
    # {"dtype": "uint16", "min": [per channel raw min], "max": [per channel raw max]}; {} = unknown (older model)
    input_stats: dict[str, Any] = field(default_factory=dict)
    cond_dropout: float | None = None  # condition dropout at training; 0 = the null condition was never trained

    def condition_index(self, name: str, option: str = "condition") -> int:
        if name not in self.conditions:
            raise PhenolensError(
                f"{option} {name!r} is not a condition of this model; it knows: {', '.join(self.conditions)}"
            )
        return self.conditions.index(name)


def save_info(model_dir: Path, info: ModelInfo) -> None:
    from phenolens import __version__

    info.version = info.version or __version__
    write_json_atomic(Path(model_dir) / INFO_FILE, asdict(info))


def load_info(model_dir: Path) -> ModelInfo:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise PhenolensError(f"{model_dir}: no such model directory")
    path = model_dir / INFO_FILE
    if not path.is_file():
        raise PhenolensError(f"{model_dir}: not a phenolens model (no {INFO_FILE}); make one with `phenolens train` or `phenolens finetune`")
    try:
        data = json.loads(path.read_text())
        return ModelInfo(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise PhenolensError(f"{path}: not a valid phenolens model description ({err})") from None


def save_model(model_dir: Path, unet, scheduler, info: ModelInfo) -> None:
    """Write the model to MODEL_DIR atomically (temporary folder, then rename)."""
    model_dir = Path(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_dir.with_name(f".{model_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    save_info(tmp, info)
    if model_dir.exists():
        # keep anything else the user put there (checkpoints, logs): replace only our files
        for name in ("unet", "scheduler", INFO_FILE):
            old = model_dir / name
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        for child in tmp.iterdir():
            os.replace(child, model_dir / child.name)
        tmp.rmdir()
    else:
        os.replace(tmp, model_dir)


def load_model(model_dir: Path, device: str = "cpu"):
    """(unet, scheduler, info) from MODEL_DIR; a clear error if it is not a phenolens model."""
    from diffusers import DDIMScheduler, UNet2DModel

    model_dir = Path(model_dir)
    info = load_info(model_dir)
    if not (model_dir / "unet").is_dir() or not (model_dir / "scheduler").is_dir():
        raise PhenolensError(f"{model_dir}: phenolens model is incomplete (unet/ or scheduler/ missing)")
    try:
        unet = UNet2DModel.from_pretrained(model_dir / "unet", use_safetensors=True)
        scheduler = DDIMScheduler.from_pretrained(model_dir / "scheduler")
    except (OSError, ValueError, EnvironmentError) as err:
        raise PhenolensError(f"{model_dir}: cannot load the network ({str(err).splitlines()[0]})") from None
    unet.to(device).eval()
    return unet, scheduler, info
