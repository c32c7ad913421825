"""Phen-LDiff (Bourou et al. 2024): fine-tune a pretrained latent diffusion model on a small
microscopy dataset, then translate between conditions in its latent space.

Method, as in the paper's §3:

1. **Start from a pretrained LDM** (Stable Diffusion 2, §3.1.1): a VAE E/D that maps images to a
   latent space z = E(x) and back, and a text-conditioned UNet ε_θ(z_t, t, c) that denoises there.
2. **Fine-tune conditionally** (§3.3) on the images of every condition, the condition c being the
   text encoder's embedding of a prompt per condition ("a fluorescence microscopy image of {condition}
   cells") or, optionally, a learned embedding per condition. Only part of the UNet trains (§3.1.2–3):
   LoRA (eq. 4, W' = W + BA^T), SVDiff (shifts of the singular values of W = UΣV^T), the attention
   layers, or everything; `phenolens.models.adapters` implements the four. The loss is the DDPM loss of
   the pixel model (PhenDiff eq. 4) applied to the latents, z_0 = s·E(x) with s the VAE's scaling factor.
3. **Translate** (§3.3): encode the source, DDIM-invert z_0 under the source condition, render the code
   under the target, decode. Inversion and rendering are the shared core (`methods.core`), so
   `translate`, `measure`, `report` and the memorisation check work on these models unchanged.

Channels: the VAE sees RGB. 1 channel -> the same image in R, G and B (decoded back as their mean);
2 channels -> R and G, with B black (-1) (decoded from R and G); 3 channels -> R, G, B in the order the
files (or `--channels`) give them. More than 3 is refused: pick 3 with `--channels`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from phenolens.data.skipped import SKIPPED_FILE, write_skipped
from phenolens.diffusion.conditions import network_fn
from phenolens.errors import PhenolensError
from phenolens.launch import launched_world
from phenolens.methods.core import NamedConditionModel
from phenolens.methods.prompts import CONDITIONINGS, PROMPT_TEMPLATE, prompt_for
from phenolens.models.store import INFO_FILE, ModelInfo, apply_umask, check_info, load_info, save_info
from phenolens.models.unet import unet_downsample_factor
from phenolens.train.inputs import condition_order_line, size_line, training_inputs
from phenolens.train.samples import write_sample_grid

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "condition_embeddings.safetensors"
ADAPTER_DIR = "adapter"
LATENT_MODEL_FILES = (ADAPTER_DIR, "scheduler", EMBEDDINGS_FILE, INFO_FILE)  # phenolens.json last: it marks a model


# ------------------------------------------------------------------------------------- channels
def check_channels(n_channels: int, where: str = "the images") -> None:
    if n_channels > 3:
        raise PhenolensError(f"{where} have {n_channels} channels; a Stable Diffusion VAE takes at most 3 (RGB): "
                             "pick 3 with --channels, e.g. --channels 0,1,2")
    if n_channels < 1:
        raise PhenolensError(f"{where} have no channels")


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, C ≤ 3, H, W) in [-1, 1] -> (B, 3, H, W) by the rule in the module docstring."""
    c = x.shape[1]
    check_channels(c)
    if c == 3:
        return x
    if c == 1:
        return x.repeat(1, 3, 1, 1)
    return torch.cat([x, torch.full_like(x[:, :1], -1.0)], dim=1)


def from_rgb(y: torch.Tensor, n_channels: int) -> torch.Tensor:
    """Inverse of `to_rgb` for decoded images."""
    if n_channels == 3:
        return y
    if n_channels == 1:
        return y.mean(dim=1, keepdim=True)
    return y[:, :2]


# -------------------------------------------------------------------------------- the network
class ConditionedUNet(nn.Module):
    """The base's UNet2DConditionModel with one embedding sequence per condition (and a null one).

    It holds what fine-tuning trains besides the UNet (the condition embeddings, learned or not) and is
    called like the UNet itself, `model(z_t, t, encoder_hidden_states=...)`: `context(labels)` gives
    the embedding sequences (condition i, or the null one for label n), so the shared trainer, loss
    and DDIM code drive it unchanged: label i selects condition i's embedding as the cross-attention
    context, label n (= number of conditions) the empty prompt's (classifier-free guidance).
    """

    def __init__(self, unet, embeddings: torch.Tensor, learn_embeddings: bool = False):
        super().__init__()
        self.unet = unet
        conditions, null = embeddings[:-1].detach().clone(), embeddings[-1:].detach().clone()
        if learn_embeddings:
            self.embeddings = nn.Parameter(conditions)
        else:
            self.register_buffer("embeddings", conditions)
        self.register_buffer("null_embedding", null)

    @property
    def config(self) -> dict:
        """What the trainer's resume fingerprint compares (the frozen base counts by its shape)."""
        return dict(unet=dict(self.unet.config), embeddings=list(self.embeddings.shape),
                    trainable=sum(p.numel() for p in self.parameters() if p.requires_grad))

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.embeddings, self.null_embedding], dim=0)
        return table[labels.long()].to(dtype=next(self.unet.parameters()).dtype)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs):
        return self.unet(z_t, t, encoder_hidden_states=encoder_hidden_states, **kwargs)


def image_factor(vae, unet) -> int:
    """Image sides must be a multiple of this: the VAE's downsampling times the UNet's."""
    return unet_downsample_factor(vae) * unet_downsample_factor(unet)


def vae_encode(vae, x: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_0 = s·E(x) (LDM §3): a posterior sample when training (generator given), its mean otherwise."""
    dist = vae.encode(to_rgb(x).to(vae.dtype)).latent_dist
    z = dist.sample(generator=generator) if generator is not None else dist.mode()
    return z.float() * scaling_factor


def vae_decode(vae, z: torch.Tensor, scaling_factor: float, n_channels: int) -> torch.Tensor:
    return from_rgb(vae.decode((z / scaling_factor).to(vae.dtype)).sample.float(), n_channels)


def latent_loss(vae, scaling_factor: float):
    """The trainer's loss for a latent model: PhenDiff eq. 4 on z_0 = s·E(x) with the frozen VAE."""
    from phenolens.train.trainer import diffusion_loss

    def loss(model, noise_scheduler, x0, labels, generator):
        if next(vae.parameters()).device != x0.device:
            vae.to(x0.device)
        with torch.no_grad():
            z0 = vae_encode(vae, x0, scaling_factor, generator)
        return diffusion_loss(model, noise_scheduler, z0, labels, generator, condition=_context)

    return loss


def _context(model, labels: torch.Tensor) -> dict:
    """The network's keyword condition for LABELS: the embedding sequences of a ConditionedUNet (also
    when Accelerate has wrapped it for several processes)."""
    return {"encoder_hidden_states": getattr(model, "module", model).context(labels)}


# ---------------------------------------------------------------------------------- the model
class PhenLDiff(NamedConditionModel):
    """A fine-tuned latent model: base VAE + adapted UNet + condition embeddings."""

    latent = True

    def __init__(self, model: ConditionedUNet, vae, scheduler, info: ModelInfo, device: str | None = None):
        super().__init__(info, scheduler, device)
        self.model = model.to(self.device).eval()
        self.vae = vae.to(self.device).eval()
        self.scaling_factor = float(vae.config.scaling_factor)

    # ------------------------------------------------------------------------------ the method
    def network(self):
        """ε_θ(z_t, t, c) (§3.3): the UNet2DConditionModel, c its cross-attention context."""
        return network_fn(self.model.unet)

    def label_condition(self, labels: torch.Tensor) -> dict:
        """The condition's embedding sequence (its prompt's, or a learned one) as `encoder_hidden_states`."""
        return {"encoder_hidden_states": self.model.context(labels)}

    def inference(self):
        """SVDiff weights are U·diag(ReLU(σ+δ))·V^T: computed once per pass instead of once per step."""
        from phenolens.models.adapters import frozen_weights

        return frozen_weights(self.model.unet)

    def spatial_factor(self) -> int:
        return image_factor(self.vae, self.model.unet)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return vae_encode(self.vae, x, self.scaling_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, z, self.scaling_factor, self.info.n_channels)

    def code_shape(self, n_channels: int, height: int, width: int) -> tuple[int, int, int]:
        f = unet_downsample_factor(self.vae)
        return (int(self.vae.config.latent_channels), height // f, width // f)

    # ----------------------------------------------------------------------------- persistence
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | None = None,
                        base: str | None = None) -> "PhenLDiff":
        """Base (as phenolens.json names it, or BASE if it has moved) + what fine-tuning saved."""
        from diffusers import DDIMScheduler
        from safetensors.torch import load_file

        from phenolens.models.adapters import load_adaptation
        from phenolens.models.latent import load_base

        model_dir = Path(model_dir)
        info = load_info(model_dir)
        if info.method != "phenldiff":
            raise PhenolensError(f"{model_dir}: is a {info.method!r} model, not a Phen-LDiff model")
        check_info(model_dir, info)
        if not 1 <= int(info.n_channels) <= 3:  # the VAE maps 1-3 channels to RGB (see to_rgb)
            raise PhenolensError(f"{model_dir / INFO_FILE}: says n_channels {info.n_channels}, but a Phen-LDiff "
                                 "model's VAE takes 1 to 3; this phenolens.json does not belong to this model "
                                 "(restore the model's own phenolens.json)")
        if not (base or info.base):
            raise PhenolensError(f"{model_dir / INFO_FILE}: names no base pipeline; pass base= (the directory or "
                                 "hub id it was fine-tuned from)")
        lb = load_base(base or info.base, components=("vae", "unet"))
        load_adaptation(model_dir / ADAPTER_DIR, lb.unet)
        emb = load_file(str(model_dir / EMBEDDINGS_FILE))
        table = torch.cat([emb["conditions"], emb["null"]], dim=0)
        if table.shape[0] != len(info.conditions) + 1:
            raise PhenolensError(f"{model_dir / EMBEDDINGS_FILE}: holds {table.shape[0] - 1} condition embeddings, "
                                 f"phenolens.json lists {len(info.conditions)} conditions")
        model = ConditionedUNet(lb.unet, table, learn_embeddings=False)
        scheduler = DDIMScheduler.from_pretrained(str(model_dir / "scheduler"))
        return cls(model, lb.vae, scheduler, info, device=device)

    def save_pretrained(self, model_dir: str | Path) -> None:
        save_latent_model(Path(model_dir), self.model, self.scheduler, self.info)


def save_latent_model(model_dir: Path, model: ConditionedUNet, scheduler, info: ModelInfo) -> None:
    """Only what was trained: adapter/ (adapters, spectral shifts or trained weights), the condition
    embeddings, the scheduler and phenolens.json naming the base. The model files go into a
    temporary folder first and replace the old ones together (checkpoints beside them stay)."""
    from safetensors.torch import save_file

    from phenolens.models.adapters import save_adaptation

    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_adaptation(tmp / ADAPTER_DIR, model.unet, info.adaptation)
    save_file({"conditions": model.embeddings.detach().float().cpu().contiguous(),
               "null": model.null_embedding.detach().float().cpu().contiguous()}, str(tmp / EMBEDDINGS_FILE))
    scheduler.save_pretrained(str(tmp / "scheduler"))
    save_info(tmp, info)
    apply_umask(tmp)  # safetensors come out 0600
    if (model_dir / INFO_FILE).is_file():  # first out, last in: a half-replaced model never looks complete
        (model_dir / INFO_FILE).unlink()
    for name in LATENT_MODEL_FILES:
        dest = model_dir / name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp / name, dest)
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------- training
@dataclass
class FinetuneSettings:
    """What `phenolens finetune` decides besides the optimiser loop (see TrainConfig)."""

    base: str
    mode: str = "lora"
    rank: int = 4
    lora_alpha: float | None = None  # LoRA scale alpha/rank; default alpha = rank
    size: int | None = None  # training crop side; default: the base's native resolution
    channels: list[int] | None = None
    conditions: list[str] | None = None
    conditioning: str = "prompt"
    prompt_template: str = PROMPT_TEMPLATE
    prompts: dict[str, str] = field(default_factory=dict)  # per-condition overrides of the template
    skip_bad: bool = False

    def prompt_for(self, condition: str) -> str:
        return prompt_for(condition, self.prompt_template, self.prompts)


def adapted_training_images(records, conditions, data, settings, config, size: int, factor: int, downsampling: str,
                            check, folder, model_dir: Path, *, main: bool, overwrite: bool, progress: bool):
    """The training images of a model adapted from a pretrained base (Phen-LDiff, DIFFusion's Kandinsky), at
    SIZE px, a multiple of FACTOR (DOWNSAMPLING says why); CHECK(n_channels, where) refuses channels the base
    cannot take. Only once the data are read and fine does --overwrite clear the old model (only what
    phenolens wrote); unreadable files skipped under --skip-bad are listed in MODEL_DIR."""
    from phenolens.data.dataset import ImageSet

    if size % factor:
        raise PhenolensError(f"--size {size} must be a multiple of {factor} ({downsampling})")
    images = ImageSet(records, size, conditions, channels=settings.channels, skip_bad=settings.skip_bad,
                      augment=config.augment, progress=progress)
    check(images.n_channels, f"the images of {data}")
    if main and images.resized_up:
        logger.warning(size_line(images, size))
    if overwrite:
        folder.clear()
    if images.bad and main:
        folder.record(SKIPPED_FILE)
        write_skipped(model_dir / SKIPPED_FILE, images.bad)
        logger.warning(f"skipped {len(images.bad)} unreadable file(s); list in {model_dir / SKIPPED_FILE}")
    return images


def adapted_model_info(images, conditions, size: int, settings, config, *, data, command, method: str, preset: str,
                       prediction_type: str, adaptation: dict, trainable: int, total: int) -> ModelInfo:
    """phenolens.json of a model adapted from a pretrained base (Phen-LDiff, DIFFusion's Kandinsky): the
    data, normalisation, what trained (ADAPTATION) and how; SETTINGS names the base (`settings.base`)."""
    from phenolens import __version__

    return ModelInfo(
        conditions=list(conditions), n_channels=images.n_channels, image_size=size,
        normalization=images.normalizer.to_dict(), method=method, channels=settings.channels, preset=preset,
        prediction_type=prediction_type, base=str(settings.base), adaptation=adaptation,
        training=dict(command=command, data=str(Path(data).resolve()), settings=asdict(settings),
                      config=asdict(config), trainable_parameters=trainable, total_parameters=total,
                      num_processes=launched_world()),
        version=__version__, input_stats=dict(images.input_stats), cond_dropout=float(config.cond_dropout),
        size_rule="resize-up" if images.resized_up else "own",
    )


def finetune(data: str | Path, model_dir: str | Path, settings: FinetuneSettings, config, *,
             resume: bool = False, overwrite: bool = False, command: str = "", progress: bool = True) -> "PhenLDiff":
    """Fine-tune BASE on DATA (folder per condition or manifest) into MODEL_DIR (Phen-LDiff §3.3).

    Returns the model with its final raw weights; MODEL_DIR holds their EMA (the raw ones with --no-ema).
    """
    from phenolens.data.io import read_image
    from phenolens.data.records import training_records
    from phenolens.models.adapters import MODES, count_parameters, prepare_unet
    from phenolens.models.latent import encode_prompts, load_base
    from phenolens.train.trainer import check_config, is_main_process, open_model_folder, train

    if settings.mode not in MODES:
        raise PhenolensError(f"--mode {settings.mode!r}: choose one of {', '.join(MODES)}")
    if settings.conditioning not in CONDITIONINGS:
        raise PhenolensError(f"--conditioning {settings.conditioning!r}: choose prompt or learned")
    try:
        filled = settings.prompt_template.format(condition="x")
    except (KeyError, IndexError, ValueError):
        filled = settings.prompt_template
    if "{condition}" not in settings.prompt_template or filled == settings.prompt_template:
        raise PhenolensError(f"--prompt-template {settings.prompt_template!r} must contain {{condition}} and no "
                             "other {...} field")
    model_dir = Path(model_dir)
    check_config(config)
    records, conditions = training_records(data, settings.conditions)
    unknown = sorted(set(settings.prompts) - set(conditions))
    if unknown:
        raise PhenolensError(f"--prompt names {', '.join(unknown)}, not a condition of {data} ({', '.join(conditions)})")
    folder = open_model_folder(model_dir, inputs=training_inputs(data, records), resume=resume, overwrite=overwrite)
    main = is_main_process()
    if main:
        logger.info(condition_order_line(data, conditions, settings.conditions))

    first, _ = read_image(records[0].path, channels=settings.channels)  # fail before loading a large base
    check_channels(first.shape[0], f"the images of {data}")
    lb = load_base(settings.base)
    factor = image_factor(lb.vae, lb.unet)
    size = settings.size or int(lb.unet.config.sample_size) * lb.vae_scale_factor
    images = adapted_training_images(records, conditions, data, settings, config, size, factor,
                                     "the VAE's and the UNet's downsampling", check_channels, folder, model_dir,
                                     main=main, overwrite=overwrite, progress=progress)

    prompts = [settings.prompt_for(c) for c in conditions]
    embeddings = encode_prompts(lb.text_encoder, lb.tokenizer, prompts + [""])
    lb.text_encoder = None  # not needed any more: the conditions are embeddings from here on
    svd_device = "cuda" if settings.mode == "svdiff" and torch.cuda.is_available() else None
    with torch.random.fork_rng(devices=[]):  # LoRA's random init depends on --seed only; the caller's RNG is untouched
        torch.random.default_generator.manual_seed(config.seed)
        description = prepare_unet(lb.unet, settings.mode, rank=settings.rank, alpha=settings.lora_alpha,
                                   svd_device=svd_device)
    model = ConditionedUNet(lb.unet, embeddings, learn_embeddings=settings.conditioning == "learned")
    trainable, total = count_parameters(model)
    logger.info(f"{settings.mode}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3g} %)")

    info = adapted_model_info(
        images, conditions, size, settings, config, data=data, command=command, method="phenldiff",
        preset=settings.mode, prediction_type=lb.prediction_type, trainable=trainable, total=total,
        adaptation=dict(description, conditioning=settings.conditioning, prompts=dict(zip(conditions, prompts))))

    def on_save(trained: ConditionedUNet, step: int) -> None:
        info.training["steps_done"] = step
        folder.record(*LATENT_MODEL_FILES)
        save_latent_model(model_dir, trained, lb.scheduler, info)

    def on_sample(trained: ConditionedUNet, step: int) -> None:
        device = str(next(trained.parameters()).device)
        path = model_dir / "samples" / f"step-{step:07d}.png"
        folder.record(path)  # the file, not samples/: a picture the user adds there stays
        write_sample_grid(PhenLDiff(trained, lb.vae, lb.scheduler, info, device=device), path, step)
        apply_umask(path)

    trained = train(model, lb.scheduler, images, model_dir, config, null_label=len(conditions), resume=resume,
                    overwrite=overwrite, loss_fn=latent_loss(lb.vae, float(lb.vae.config.scaling_factor)),
                    on_save=on_save, sample_fn=on_sample, progress=progress, out_folder=folder)
    return PhenLDiff(trained, lb.vae, lb.scheduler, info, device=str(next(trained.parameters()).device))


__all__ = ["PhenLDiff", "FinetuneSettings", "finetune", "ConditionedUNet", "to_rgb", "from_rgb",
           "PROMPT_TEMPLATE"]
