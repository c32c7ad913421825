"""PhenDiff (Bourou, Boyer et al., MICCAI 2024): image-to-image translation between conditions with
one class-conditional diffusion model.

Method, as in the paper's §2:

1. **Train** one conditional DDPM on the images of every condition, the class label y being the
   condition (§2.2; the loss is eq. 4, see `phenolens.train.trainer`).
2. **Invert** a real image x_0 of condition y_src into x_T by running the deterministic DDIM
   process backwards under y_src (§2.3, eq. 6). Plain eq. 6 is only exact in the limit of small
   steps, so by default each step is solved implicitly (`phenolens.diffusion.ddim.invert`).
3. **Render** x_T forwards with DDIM under the target label y_tgt (eq. 5): the counterfactual
   "same cells, other condition". Rendering under y_src gives the reconstruction, whose error is
   the floor under which no change can be believed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from phenolens.data.normalize import Normalizer
from phenolens.diffusion.ddim import invert, sample, unet_fn
from phenolens.errors import PhenolensError
from phenolens.models.store import ModelInfo, load_model, save_model
from phenolens.models.unet import unet_downsample_factor


def pick_device(device: str | None = None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Translation:
    """What `PhenDiff.translate` returns for a batch of source images.

    Images are in the files' raw intensity units (float32 CHW); `model_space` holds the same in
    [-1, 1] at the model's view (what the metrics are computed on).
    """

    reconstructions: list[np.ndarray]
    translations: dict[str, list[np.ndarray]]
    recon_mse: np.ndarray  # per image, in [-1, 1] units
    change_mse: dict[str, np.ndarray] = field(default_factory=dict)  # per target, per image

    @property
    def recon_psnr(self) -> np.ndarray:
        return psnr_from_mse(self.recon_mse)


def psnr_from_mse(mse: np.ndarray | float) -> np.ndarray:
    """PSNR in dB for images in [-1, 1] (data range 2)."""
    mse = np.maximum(np.asarray(mse, dtype=np.float64), 1e-20)
    return 10.0 * np.log10(4.0 / mse)


class PhenDiff:
    """A trained PhenDiff model: conditions, normalisation and the class-conditional UNet."""

    def __init__(self, unet, scheduler, info: ModelInfo, device: str | None = None):
        self.device = pick_device(device)
        self.unet = unet.to(self.device).eval()
        self.scheduler = scheduler
        self.info = info
        self.normalizer = Normalizer.from_dict(info.normalization)

    # ----------------------------------------------------------------------------- persistence
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | None = None) -> "PhenDiff":
        unet, scheduler, info = load_model(Path(model_dir), device="cpu")
        if info.method != "phendiff":
            raise PhenolensError(f"{model_dir}: is a {info.method!r} model, not a PhenDiff model")
        return cls(unet, scheduler, info, device=device)

    def save_pretrained(self, model_dir: str | Path) -> None:
        save_model(Path(model_dir), self.unet, self.scheduler, self.info)

    @property
    def conditions(self) -> list[str]:
        return list(self.info.conditions)

    # ------------------------------------------------------------------------------ the method
    def labels(self, conditions: Sequence[str], option: str = "condition") -> torch.Tensor:
        return torch.tensor([self.info.condition_index(c, option) for c in conditions], device=self.device)

    def invert(self, x0: torch.Tensor, source: Sequence[str], steps: int = 50,
               inversion: str = "fixed-point", iters: int = 5, progress: bool = False) -> torch.Tensor:
        """Step 2: the latent code x_T that regenerates x0 under its own condition."""
        return invert(unet_fn(self.unet), x0.to(self.device), self.labels(source, "--from"), self.scheduler,
                      steps=steps, method=inversion, iters=iters, progress=progress)

    def render(self, xT: torch.Tensor, conditions: Sequence[str], steps: int = 50,
               guidance_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
        """Step 3: the image that x_T becomes under each given condition."""
        return sample(unet_fn(self.unet), xT.to(self.device), self.labels(conditions, "--to"), self.scheduler,
                      steps=steps, progress=progress, guidance_scale=guidance_scale,
                      null_label=len(self.info.conditions))

    def to_model_space(self, raw_images: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalise raw CHW images of one shape to [-1, 1] and reflect-pad them to a size the
        UNet accepts. The network is convolutional, so images are processed at their own
        resolution (no resampling, so reconstructions stay exact in raw units)."""
        shapes = {img.shape for img in raw_images}
        if len(shapes) != 1:
            raise ValueError("to_model_space needs images of one shape; group them first")
        c, h, w = next(iter(shapes))
        if c != self.info.n_channels:
            raise PhenolensError(f"images have {c} channels but the model expects {self.info.n_channels}")
        x = torch.from_numpy(np.stack([self.normalizer.to_model(img) for img in raw_images])).float()
        f = unet_downsample_factor(self.unet)
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
                  iters: int = 5, progress: bool = False) -> Translation:
        """Translate raw CHW images (one shape) from their source condition(s) to each target.

        `source` is one condition for all images or one per image; `targets` defaults to every
        condition of the model. A target equal to an image's source gives its reconstruction.
        """
        sources = [source] * len(images) if isinstance(source, str) else list(source)
        if len(sources) != len(images):
            raise ValueError("give one source condition per image")
        targets = list(targets) if targets is not None else self.conditions
        for t in targets:
            self.info.condition_index(t, "--to")
        x0, hw = self.to_model_space(images)
        x0 = x0.to(self.device)
        xT = self.invert(x0, sources, steps, inversion, iters, progress)
        recon = self.render(xT, sources, steps, progress=progress).clamp(-1, 1)
        src = self.crop_back(x0, hw)
        recon = self.crop_back(recon, hw)
        result = Translation(reconstructions=self._to_raw(recon), translations={},
                             recon_mse=mse_per_image(recon, src))
        for target in targets:
            out = self.render(xT, [target] * len(images), steps, progress=progress).clamp(-1, 1)
            out = self.crop_back(out, hw)
            # an image translated to its own condition is its reconstruction
            own = torch.tensor([s == target for s in sources], device=out.device)
            out = torch.where(own[:, None, None, None], recon, out)
            result.translations[target] = self._to_raw(out)
            result.change_mse[target] = mse_per_image(out, src)
        return result

    def _to_raw(self, x: torch.Tensor) -> list[np.ndarray]:
        raw = self.normalizer.from_model(x.float().cpu().numpy())
        return [np.asarray(r, dtype=np.float32) for r in raw]


def mse_per_image(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).cpu().numpy().astype(np.float64)


# --------------------------------------------------------------------------------- training
@dataclass
class PhenDiffTrainSettings:
    """Everything `phenolens train` decides besides the optimiser loop (see TrainConfig)."""

    preset: str = "tiny"
    size: int = 64
    channels: list[int] | None = None
    conditions: list[str] | None = None  # order to keep (a dose series); default: as found
    prediction_type: str = "v_prediction"
    beta_schedule: str = "linear"
    zero_terminal_snr: bool = False
    timestep_spacing: str = "leading"
    skip_bad: bool = False


def train_phendiff(data: str | Path, model_dir: str | Path, settings: PhenDiffTrainSettings, config,
                   *, resume: bool = False, overwrite: bool = False, command: str = "",
                   progress: bool = True) -> ModelInfo:
    """Train a PhenDiff model on DATA (folder per condition or manifest) into MODEL_DIR."""
    from dataclasses import asdict

    from phenolens import __version__
    from phenolens.data.dataset import ImageSet
    from phenolens.data.records import conditions_in_order, discover, validate_training_conditions
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.models.unet import build_unet
    from phenolens.train.trainer import train

    model_dir = Path(model_dir)
    records = discover(data)
    found = conditions_in_order(records)
    conditions = settings.conditions or found
    unknown = sorted(set(conditions) - set(found))
    if unknown:
        raise PhenolensError(f"--conditions names {', '.join(unknown)}, not found in {data} (found: {', '.join(found)})")
    missing = [c for c in found if c not in conditions]
    if missing:
        raise PhenolensError(f"--conditions leaves out {', '.join(missing)}, found in {data}; list every condition")
    validate_training_conditions(conditions)
    images = ImageSet(records, settings.size, conditions, channels=settings.channels,
                      skip_bad=settings.skip_bad, progress=progress)
    if images.bad:
        report = model_dir / "skipped_files.csv"
        model_dir.mkdir(parents=True, exist_ok=True)
        write_skipped(report, images.bad)
        print(f"skipped {len(images.bad)} unreadable file(s); list in {report}")
    torch.manual_seed(config.seed)  # the initial weights depend on --seed only
    unet = build_unet(settings.preset, channels=images.n_channels, size=settings.size,
                      num_conditions=len(conditions))
    scheduler = make_scheduler(prediction_type=settings.prediction_type, beta_schedule=settings.beta_schedule,
                               zero_terminal_snr=settings.zero_terminal_snr,
                               timestep_spacing=settings.timestep_spacing)
    info = ModelInfo(
        conditions=list(conditions), n_channels=images.n_channels, image_size=settings.size,
        normalization=images.normalizer.to_dict(), method="phendiff", channels=settings.channels,
        preset=settings.preset, prediction_type=settings.prediction_type,
        training=dict(command=command, data=str(Path(data).resolve()), settings=asdict(settings),
                      config=asdict(config), num_processes=int(os.environ.get("WORLD_SIZE", "1"))),
        version=__version__,
    )

    def on_save(trained_unet, step: int) -> None:
        info.training["steps_done"] = step
        save_model(model_dir, trained_unet, scheduler, info)

    def on_sample(trained_unet, step: int) -> None:
        write_sample_grid(trained_unet, scheduler, info, model_dir / "samples" / f"step-{step:07d}.png", step)

    train(unet, scheduler, images, model_dir, config, null_label=len(conditions), resume=resume,
          overwrite=overwrite, on_save=on_save, sample_fn=on_sample, progress=progress)
    return info


@torch.no_grad()
def write_sample_grid(unet, scheduler, info: ModelInfo, path: Path, step: int, per_condition: int = 4,
                      steps: int = 50) -> None:
    """Samples from the same noise under every condition (a row each): how training is going.

    Written as PNG beside the model, and to TensorBoard when it is installed.
    """
    from phenolens.report.grids import composite

    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(0)
    n, size = len(info.conditions), info.image_size
    noise = torch.randn(per_condition, info.n_channels, size, size, generator=gen).repeat(n, 1, 1, 1)
    labels = torch.arange(n).repeat_interleave(per_condition)
    was_training = unet.training
    unet.eval()
    x = sample(unet_fn(unet), noise.to(device), labels.to(device), scheduler, steps=steps).clamp(-1, 1).cpu()
    unet.train(was_training)
    tiles = [composite(img.numpy()) for img in x]
    rows = [np.concatenate(tiles[i * per_condition:(i + 1) * per_condition], axis=1) for i in range(n)]
    grid = np.concatenate(rows, axis=0)
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return
    with SummaryWriter(log_dir=str(path.parent.parent / "tensorboard")) as tb:
        tb.add_image("samples", grid, step, dataformats="HWC")


def write_skipped(path: Path, bad: Sequence[tuple[Path, str]]) -> None:
    """The --skip-bad report: one row per file that could not be used, and why."""
    from phenolens.atomic import write_csv_atomic

    write_csv_atomic(path, [dict(path=str(p), reason=reason) for p, reason in bad], ["path", "reason"])
