"""The one idea every method shares (DESIGN.md): invert -> edit the condition -> render.

A method says how an image enters the diffusion space (`encode`: identity for a pixel model, the VAE
for a latent one), what network predicts the noise under a condition (`model_fn`), and how it leaves
(`decode`). This module does the rest once: normalise raw images, pad them to a size the networks
accept, DDIM-invert under the source condition, render under the source (the reconstruction, whose
error is the floor under which no change can be believed) and under every target, and return the
images in the files' raw units. `translate`, `measure`, `report` and the memorisation check consume
this interface and never ask which method made the images.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from phenolens.data.normalize import Normalizer
from phenolens.diffusion.ddim import ModelFn, invert, sample
from phenolens.errors import PhenolensError
from phenolens.models.store import INFO_FILE, ModelInfo, load_info


def pick_device(device: str | None = None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def psnr_from_mse(mse: np.ndarray | float) -> np.ndarray:
    """PSNR in dB for images in [-1, 1] (data range 2)."""
    mse = np.maximum(np.asarray(mse, dtype=np.float64), 1e-20)
    return 10.0 * np.log10(4.0 / mse)


def mse_per_image(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).cpu().numpy().astype(np.float64)


# ------------------------------------------------------------------ per-image statistics in raw units
# Why: the [-1, 1] errors above are measured after normalisation, which clips whatever lies outside the
# training range; an 8-bit image fed to a 16-bit model is mostly clipped and still reconstructs
# "perfectly" there. These say how much of an image the model could not see, and the error in the
# file's own units.

def clipped_fraction(raw: np.ndarray, normalizer: Normalizer) -> float:
    """Fraction of the pixel values of a raw CHW image outside the normaliser's per-channel range
    (values the model sees clipped to -1 or +1; NaN counts as outside)."""
    raw = np.asarray(raw, dtype=np.float32)
    low = np.asarray(normalizer.low, dtype=np.float32).reshape(-1, 1, 1)
    high = np.asarray(normalizer.high, dtype=np.float32).reshape(-1, 1, 1)
    if raw.ndim != 3 or raw.shape[0] != low.shape[0] or raw.size == 0:
        raise ValueError(f"expected a CHW image with {low.shape[0]} channel(s), got shape {raw.shape}")
    inside = (raw >= low) & (raw <= high)
    return float(1.0 - inside.mean())


def raw_errors(source: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean absolute error, mean squared error) between two raw CHW images, in raw units."""
    diff = np.asarray(source, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    return float(np.abs(diff).mean()), float((diff * diff).mean())


@dataclass
class Translation:
    """What `translate` returns for a batch of source images.

    Images are in the files' raw intensity units (float32 CHW). The MSEs are per image in the model's
    [-1, 1] image units. For a latent model `latent_recon_mse` / `latent_change_mse` give the same in
    the diffusion space (scaled VAE latents), where inversion itself is judged, and `autoencoder_mse`
    the error of encoding and decoding alone (the floor a latent model cannot go under).
    """

    reconstructions: list[np.ndarray]
    translations: dict[str, list[np.ndarray]]
    recon_mse: np.ndarray
    change_mse: dict[str, np.ndarray] = field(default_factory=dict)
    latent_recon_mse: np.ndarray | None = None
    latent_change_mse: dict[str, np.ndarray] = field(default_factory=dict)
    autoencoder_mse: np.ndarray | None = None

    @property
    def recon_psnr(self) -> np.ndarray:
        return psnr_from_mse(self.recon_mse)


class CounterfactualModel:
    """Base of every method: conditions, normalisation and the invert / render loop around `model_fn`."""

    info: ModelInfo
    scheduler: object
    device: str
    latent: bool = False  # True when encode/decode leave pixel space

    def __init__(self, info: ModelInfo, scheduler, device: str | None = None):
        self.info = info
        self.scheduler = scheduler
        self.device = pick_device(device)
        self.normalizer = Normalizer.from_dict(info.normalization)

    # ------------------------------------------------------------------ what a method provides
    def model_fn(self) -> ModelFn:
        raise NotImplementedError

    def spatial_factor(self) -> int:
        """Image sides must be a multiple of this (the networks' total downsampling)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the space the diffusion runs in (identity for a pixel model)."""
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def inference(self) -> contextlib.AbstractContextManager:
        """Context for a whole invert/render pass (a method may cache derived weights in it)."""
        return contextlib.nullcontext()

    def code_shape(self, n_channels: int, height: int, width: int) -> tuple[int, int, int]:
        """Shape of one diffusion-space code for an image of this shape (what generation starts from)."""
        return (n_channels, height, width)

    # -------------------------------------------------------------------------------- common
    @property
    def conditions(self) -> list[str]:
        return list(self.info.conditions)

    @property
    def null_label(self) -> int:
        return len(self.info.conditions)

    def labels(self, conditions: Sequence[str], option: str = "condition") -> torch.Tensor:
        return torch.tensor([self.info.condition_index(c, option) for c in conditions], device=self.device)

    def invert(self, z0: torch.Tensor, source: Sequence[str], steps: int = 50,
               inversion: str = "fixed-point", iters: int = 5, progress: bool = False) -> torch.Tensor:
        """The code z_T that regenerates z0 under its own condition (DDIM inversion, always unguided)."""
        return invert(self.model_fn(), z0.to(self.device), self.labels(source, "--from"), self.scheduler,
                      steps=steps, method=inversion, iters=iters, progress=progress)

    def render(self, zT: torch.Tensor, conditions: Sequence[str], steps: int = 50,
               guidance_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
        """The diffusion-space image that z_T becomes under each given condition (deterministic DDIM)."""
        return sample(self.model_fn(), zT.to(self.device), self.labels(conditions, "--to"), self.scheduler,
                      steps=steps, progress=progress, guidance_scale=guidance_scale, null_label=self.null_label)

    def to_model_space(self, raw_images: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalise raw CHW images of one shape to [-1, 1] and reflect-pad them to a size the networks
        accept. They are convolutional, so images are processed at their own resolution (no resampling,
        so reconstructions stay exact in raw units)."""
        shapes = {img.shape for img in raw_images}
        if len(shapes) != 1:
            raise ValueError("to_model_space needs images of one shape; group them first")
        c, h, w = next(iter(shapes))
        if c != self.info.n_channels:
            raise PhenolensError(f"images have {c} channels but the model expects {self.info.n_channels}")
        x = torch.from_numpy(np.stack([self.normalizer.to_model(img) for img in raw_images])).float()
        f = self.spatial_factor()
        ph, pw = (-h) % f, (-w) % f
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode=mode)
        return x, (h, w)

    @staticmethod
    def crop_back(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h, w = hw
        top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
        return x[..., top:top + h, left:left + w]

    @torch.no_grad()
    def translate(self, images: Sequence[np.ndarray], source: str | Sequence[str],
                  targets: Sequence[str] | None = None, steps: int = 50, inversion: str = "fixed-point",
                  iters: int = 5, guidance_scale: float = 1.0, progress: bool = False) -> Translation:
        """Translate raw CHW images (one shape) from their source condition(s) to each target.

        `source` is one condition for all images or one per image; `targets` defaults to every
        condition of the model. A target equal to an image's source gives its reconstruction.
        Inversion is unguided; `guidance_scale` != 1 applies classifier-free guidance to the targets
        only (the reconstruction stays exact).
        """
        sources = [source] * len(images) if isinstance(source, str) else list(source)
        if len(sources) != len(images):
            raise ValueError("give one source condition per image")
        targets = list(targets) if targets is not None else self.conditions
        for t in targets:
            self.info.condition_index(t, "--to")
        with self.inference():
            return self._translate(images, sources, targets, steps, inversion, iters, guidance_scale, progress)

    def _translate(self, images, sources, targets, steps, inversion, iters, guidance_scale, progress) -> Translation:
        x0, hw = self.to_model_space(images)
        x0 = x0.to(self.device)
        z0 = self.encode(x0)
        zT = self.invert(z0, sources, steps, inversion, iters, progress)
        z_recon = self.render(zT, sources, steps, progress=progress)
        recon = self.crop_back(self.decode(z_recon).clamp(-1, 1), hw)
        src = self.crop_back(x0, hw)
        result = Translation(reconstructions=self._to_raw(recon), translations={},
                             recon_mse=mse_per_image(recon, src))
        if self.latent:
            result.latent_recon_mse = mse_per_image(z_recon, z0)
            result.autoencoder_mse = mse_per_image(self.crop_back(self.decode(z0).clamp(-1, 1), hw), src)
        for target in targets:
            z_out = self.render(zT, [target] * len(images), steps, guidance_scale=guidance_scale, progress=progress)
            out = self.crop_back(self.decode(z_out).clamp(-1, 1), hw)
            # an image translated to its own condition is its reconstruction
            own = torch.tensor([s == target for s in sources], device=out.device)
            out = torch.where(own[:, None, None, None], recon, out)
            result.translations[target] = self._to_raw(out)
            result.change_mse[target] = mse_per_image(out, src)
            if self.latent:
                z_out = torch.where(own[:, None, None, None], z_recon, z_out)
                result.latent_change_mse[target] = mse_per_image(z_out, z0)
        return result

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, conditions: Sequence[str], steps: int = 50,
                 guidance_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
        """Images in [-1, 1] rendered from diffusion-space noise (shape from `code_shape`)."""
        with self.inference():
            return self.decode(self.render(noise, conditions, steps, guidance_scale, progress)).clamp(-1, 1)

    def _to_raw(self, x: torch.Tensor) -> list[np.ndarray]:
        raw = self.normalizer.from_model(x.float().cpu().numpy())
        return [np.asarray(r, dtype=np.float32) for r in raw]


@torch.no_grad()
def write_sample_grid(model: CounterfactualModel, path: Path, step: int, per_condition: int = 4,
                      steps: int = 50) -> None:
    """Samples from the same noise under every condition (a row each): how training is going.

    Written as PNG beside the model, and to TensorBoard when it is installed.
    """
    from phenolens.atomic import write_bytes_atomic
    from phenolens.report.grids import composite

    gen = torch.Generator().manual_seed(0)
    n, size = len(model.info.conditions), model.info.image_size
    shape = model.code_shape(model.info.n_channels, size, size)
    noise = torch.randn(per_condition, *shape, generator=gen).repeat(n, 1, 1, 1)
    conditions = [c for c in model.conditions for _ in range(per_condition)]
    x = model.generate(noise.to(model.device), conditions, steps=steps).cpu()
    tiles = [composite(img.numpy()) for img in x]
    rows = [np.concatenate(tiles[i * per_condition:(i + 1) * per_condition], axis=1) for i in range(n)]
    grid = np.concatenate(rows, axis=0)
    import io

    from PIL import Image

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


def load_model_for(model_dir: str | Path, device: str | None = None) -> CounterfactualModel:
    """Whichever method made MODEL_DIR (its phenolens.json says), loaded for translation."""
    method = load_info(Path(model_dir)).method
    if method == "phendiff":
        from phenolens.methods.phendiff import PhenDiff

        return PhenDiff.from_pretrained(model_dir, device=device)
    if method == "phenldiff":
        from phenolens.methods.phenldiff import PhenLDiff

        return PhenLDiff.from_pretrained(model_dir, device=device)
    raise PhenolensError(f"{Path(model_dir) / INFO_FILE}: method {method!r} is not one this phenolens knows "
                         "(phendiff, phenldiff)")
