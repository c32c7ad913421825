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
from typing import Any, Callable, Mapping

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
    # the scale the network learnt cells at (issue 11): "own" = every training image at its own pixel size;
    # "resize-up" = images whose short side was below image_size were resized up to it (`--size` above the
    # data's own), and translate resizes its inputs the same way; None = an older model, not recorded
    size_rule: str | None = None
    # a semantic model (DiffEx): the code's size, the classifier it is aware of, the KL weight (λ₁)
    semantic: dict[str, Any] = field(default_factory=dict)

    @property
    def training_config(self) -> dict[str, Any]:
        """The optimiser-loop settings the model was trained with, as recorded ({} when not recorded)."""
        config = self.training.get("config") if isinstance(self.training, dict) else None
        return config if isinstance(config, dict) else {}

    @property
    def trained_dropout(self) -> float | None:
        """The condition dropout it was trained with; None when not recorded (older models)."""
        if self.cond_dropout is not None:
            return self.cond_dropout
        value = self.training_config.get("cond_dropout")  # older models: their training config may say
        return float(value) if isinstance(value, (int, float)) else None

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


MODEL_FILES = ("unet", "scheduler", INFO_FILE)  # what `save_model` writes into MODEL_DIR


def current_umask() -> int:
    """The process's umask (read without changing it for longer than two system calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(*paths: str | Path) -> None:
    """Give every file under PATHS the mode a plain `open()` would have given it (0666 & ~umask).

    Why: safetensors (and other writers that go through a temporary file) leave 0600 files, so a
    model shared on a group drive could not be read by the user's colleagues, while the CSV and JSON
    beside it could (issue 9, "Also").
    """
    mode = 0o666 & ~current_umask()
    for root in paths:
        root = Path(root)
        if root.is_symlink():
            continue
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        for f in files:
            if (f.stat().st_mode & 0o777) != mode:
                os.chmod(f, mode)


def fresh_tmp_folder(folder: Path, what: str) -> Path:
    """An empty FOLDER/.<what>.tmp-<pid> (FOLDER created): where a save is assembled before it is renamed
    into place, inside the destination, never beside it in a folder that is not ours."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{what}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def save_model(model_dir: Path, unet, scheduler, info: ModelInfo,
               extra: Mapping[str, Callable[[Path], Any]] | None = None) -> None:
    """Write the model to MODEL_DIR atomically (temporary folder inside it, then renames).

    The temporary folder lives inside MODEL_DIR (never beside it, in a folder that is not ours);
    only `MODEL_FILES` (and the names of EXTRA) are replaced, anything else in MODEL_DIR (checkpoints,
    logs) stays, and phenolens.json is moved last: it is what marks a complete model. EXTRA maps a
    further part's name to a function that writes it at the path given (a method's other networks).
    """
    model_dir = Path(model_dir)
    tmp = fresh_tmp_folder(model_dir, "model")
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    for name, write in (extra or {}).items():
        write(tmp / name)
    save_info(tmp, info)
    apply_umask(tmp)
    info_file = model_dir / INFO_FILE
    if info_file.is_file():  # first out, last in: a half-replaced model never looks complete
        info_file.unlink()
    for name in (*(extra or {}), *MODEL_FILES):
        old = model_dir / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
        os.replace(tmp / name, old)
    shutil.rmtree(tmp, ignore_errors=True)


def check_network(model_dir: Path, info: ModelInfo, in_channels: int | None,
                  num_class_embeds: int | None = None) -> None:
    """Refuse a phenolens.json that does not describe the network beside it, and say so.

    Why: a hand-edited or copied phenolens.json (3 channels for a 2-channel network) would
    otherwise surface at translate as an error about the user's image, which is not at fault.
    """
    path = Path(model_dir) / INFO_FILE
    if in_channels is not None and int(in_channels) != int(info.n_channels):
        raise PhenolensError(f"{path}: says n_channels {info.n_channels}, but the network in {Path(model_dir) / 'unet'} "
                             f"takes {in_channels} channel(s); this phenolens.json does not belong to these weights "
                             "(restore the model's own phenolens.json)")
    if num_class_embeds is not None and int(num_class_embeds) != len(info.conditions) + 1:
        raise PhenolensError(f"{path}: lists {len(info.conditions)} condition(s), but the network in "
                             f"{Path(model_dir) / 'unet'} was trained with {int(num_class_embeds) - 1}; this "
                             "phenolens.json does not belong to these weights (restore the model's own phenolens.json)")


def check_info(model_dir: Path, info: ModelInfo) -> None:
    """The fields of phenolens.json that must agree with one another (channels, normalisation)."""
    path = Path(model_dir) / INFO_FILE
    try:
        n = int(info.n_channels)
    except (TypeError, ValueError):
        raise PhenolensError(f"{path}: n_channels {info.n_channels!r} is not a number") from None
    if n < 1:
        raise PhenolensError(f"{path}: n_channels {n} must be at least 1")
    if info.channels is not None and len(info.channels) != n:
        raise PhenolensError(f"{path}: channels {info.channels} picks {len(info.channels)} channel(s), but "
                             f"n_channels says {n}")
    norm = info.normalization if isinstance(info.normalization, dict) else {}
    for key in ("low", "high"):
        values = norm.get(key)
        if isinstance(values, list) and len(values) != n:
            raise PhenolensError(f"{path}: normalization {key} has {len(values)} value(s), but n_channels says {n}")


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
    check_info(model_dir, info)
    cfg = getattr(unet, "config", {})
    check_network(model_dir, info, cfg.get("in_channels"), cfg.get("num_class_embeds"))
    unet.to(device).eval()
    return unet, scheduler, info
