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

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from phenolens.data.skipped import SKIPPED_FILE, write_skipped
from phenolens.diffusion.conditions import network_fn
from phenolens.errors import PhenolensError
from phenolens.launch import launched_world
from phenolens.methods.core import NamedConditionModel
from phenolens.models.store import MODEL_FILES, ModelInfo, apply_umask, load_model, save_model
from phenolens.models.unet import preset_downsample_factor, unet_downsample_factor
from phenolens.train.inputs import condition_order_line, size_line, training_inputs
from phenolens.train.recipe import RECIPE_PREDICTION_TYPE
from phenolens.train.samples import write_sample_grid

logger = logging.getLogger(__name__)


class PhenDiff(NamedConditionModel):
    """A trained PhenDiff model: conditions, normalisation and the class-conditional pixel UNet.

    Invert / edit / render / translate come from the core; the diffusion runs on the normalised pixels
    themselves (encode and decode are the identity).
    """

    def __init__(self, unet, scheduler, info: ModelInfo, device: str | None = None):
        super().__init__(info, scheduler, device)
        self.unet = unet.to(self.device).eval()

    # ----------------------------------------------------------------------------- persistence
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | None = None) -> "PhenDiff":
        unet, scheduler, info = load_model(Path(model_dir), device="cpu")
        if info.method != "phendiff":
            raise PhenolensError(f"{model_dir}: is a {info.method!r} model, not a PhenDiff model")
        return cls(unet, scheduler, info, device=device)

    def save_pretrained(self, model_dir: str | Path) -> None:
        save_model(Path(model_dir), self.unet, self.scheduler, self.info)

    # ------------------------------------------------------------------------------ the method
    def network(self):
        """ε_θ(x_t, t, y) (§2.2): the UNet2DModel itself, called with its own keyword arguments."""
        return network_fn(self.unet)

    def label_condition(self, labels: torch.Tensor) -> dict:
        """The class label y is the condition: the UNet's `class_labels` (label n = the null condition)."""
        return {"class_labels": labels}

    def spatial_factor(self) -> int:
        return unet_downsample_factor(self.unet)


# --------------------------------------------------------------------------------- training
@dataclass
class PhenDiffTrainSettings:
    """Everything `phenolens train` decides besides the optimiser loop (see TrainConfig)."""

    preset: str = "tiny"
    size: int | None = None  # training crop side; None = the data's own size (no image is resized)
    channels: list[int] | None = None
    conditions: list[str] | None = None  # order to keep (a dose series); default: as found
    prediction_type: str = RECIPE_PREDICTION_TYPE  # models trained before the recipe: v_prediction
    beta_schedule: str = "linear"
    zero_terminal_snr: bool = False
    timestep_spacing: str = "leading"
    skip_bad: bool = False


def train_phendiff(data: str | Path, model_dir: str | Path, settings: PhenDiffTrainSettings, config,
                   *, resume: bool = False, overwrite: bool = False, command: str = "",
                   progress: bool = True) -> ModelInfo:
    """Train a PhenDiff model on DATA (folder per condition or manifest) into MODEL_DIR.

    Every option and MODEL_DIR are checked before an image is read, and nothing in MODEL_DIR is
    replaced (--overwrite) before the images have been read and checked.
    """
    from dataclasses import asdict

    from phenolens import __version__
    from phenolens.data.dataset import ImageSet
    from phenolens.data.records import training_records
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.models.unet import build_unet
    from phenolens.train.trainer import check_config, is_main_process, open_model_folder, train

    model_dir = Path(model_dir)
    check_config(config)
    records, conditions = training_records(data, settings.conditions)
    folder = open_model_folder(model_dir, inputs=training_inputs(data, records), resume=resume, overwrite=overwrite)
    main = is_main_process()
    if main:
        logger.info(condition_order_line(data, conditions, settings.conditions))
    images = ImageSet(records, settings.size, conditions, channels=settings.channels,
                      skip_bad=settings.skip_bad, augment=getattr(config, "augment", True), progress=progress,
                      size_multiple=preset_downsample_factor(settings.preset))
    if main:
        (logger.warning if images.resized_up else logger.info)(size_line(images, settings.size))
    if overwrite:
        folder.clear()  # the data are read and fine: now the old run may go (only what phenolens wrote)
    if images.bad and main:
        report = model_dir / SKIPPED_FILE
        folder.record(report)
        write_skipped(report, images.bad)
        logger.warning(f"skipped {len(images.bad)} unreadable file(s); list in {report}")
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on --seed only; the caller's RNG is untouched
        torch.random.default_generator.manual_seed(config.seed)
        unet = build_unet(settings.preset, channels=images.n_channels, size=images.size,
                          num_conditions=len(conditions))
    scheduler = make_scheduler(prediction_type=settings.prediction_type, beta_schedule=settings.beta_schedule,
                               zero_terminal_snr=settings.zero_terminal_snr,
                               timestep_spacing=settings.timestep_spacing)
    info = ModelInfo(
        conditions=list(conditions), n_channels=images.n_channels, image_size=images.size,
        normalization=images.normalizer.to_dict(), method="phendiff", channels=settings.channels,
        preset=settings.preset, prediction_type=settings.prediction_type,
        training=dict(command=command, data=str(Path(data).resolve()), settings=asdict(settings),
                      config=asdict(config), num_processes=launched_world()),
        version=__version__, input_stats=dict(images.input_stats), cond_dropout=float(config.cond_dropout),
        size_rule="resize-up" if images.resized_up else "own",
    )

    def on_save(trained_unet, step: int) -> None:
        info.training["steps_done"] = step
        folder.record(*MODEL_FILES)
        save_model(model_dir, trained_unet, scheduler, info)

    def on_sample(trained_unet, step: int) -> None:
        device = str(next(trained_unet.parameters()).device)
        path = model_dir / "samples" / f"step-{step:07d}.png"
        folder.record(path)  # the file, not samples/: a picture the user adds there stays
        write_sample_grid(PhenDiff(trained_unet, scheduler, info, device=device), path, step)
        apply_umask(path)

    train(unet, scheduler, images, model_dir, config, null_label=len(conditions), resume=resume,
          overwrite=overwrite, on_save=on_save, sample_fn=on_sample, progress=progress, out_folder=folder)
    return info
