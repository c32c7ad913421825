"""DIFFusion on its paper's own decoder, Kandinsky 2.2 (paper 004 §3), with optional domain tuning.

Method, as in the paper's §3 (the parts: `phenolens.models.kandinsky`):

1. **Embedding.** c = E(x)/‖E(x)‖: the CLIP ViT-bigG/14 image embedding of the image (the prior's
   image encoder), L2-normalised ("We normalize all the image embeddings with L2 norm prior to the
   arithmetic"). Microscopy images enter as RGB by Phen-LDiff's channel rule (`to_rgb`: 1 channel copied
   to R, G, B; 2 fill R and G; more than 3 refused, naming --channels), and CLIP's input is computed in
   torch from the [-1, 1] RGB tensor (`ClipInput`).
2. **Inversion** of the MoVQ latents z_0 = E_movq(x) into per-step noise maps (edit-friendly DDPM,
   `--inversion ef-ddpm`), under the image's own embedding, with classifier-free guidance in inversion and
   generation alike (App. B.3; `guide_inversion`), so the reconstruction stays exact at any guidance scale.
3. **Arithmetic** (eqs. 6-7, `EmbeddingArithmetic`, shared with the embedded DIFFusion): ĉ = c + ω·Δc on
   unit vectors, Δc the difference of the class means of unit embeddings.
4. **Decoding the edit.** The decoder was trained on CLIP embeddings at CLIP's own scale (not unit
   vectors), so the embedding it is fed is ĉ·‖E(x)‖: ĉ, not normalised again (as in the embedded model),
   scaled back by the length of the image's own embedding. Why this scale: with ω = 0 it is exactly the
   image's own embedding (the one the inversion used), so the edit moves the direction of the embedding and
   nothing else; a common scale (e.g. the mean length) would change every image's condition even at ω = 0.
   The null condition of guidance is the embedding of an all-zero CLIP input (diffusers' prior pipeline's
   `get_zero_embed`, what Kandinsky's decoder reads as "no image"; fine-tuning drops to it as well).
5. **Domain tuning** (§3 "Domain Tuning"): `phenolens finetune --method kandinsky` trains LoRA adapters on
   the decoder's attention projections and its added key/value projections (the image tokens' way in)
   with the ε loss on MoVQ latents under each image's own embedding, dropped to the zero-image embedding
   with p = --cond-dropout, through the shared trainer (resumable, EMA); only the adapter is saved.

A model folder holds phenolens.json (naming the decoder as `base` and the prior as `adaptation.prior`),
scheduler/ and adapter/; the pretrained weights stay where they were.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from phenolens.errors import PhenolensError
from phenolens.methods.core import CounterfactualModel
from phenolens.methods.diffusion_embedding import DEFAULT_OMEGA, ClassMeans, EmbeddingArithmetic
from phenolens.methods.phenldiff import adapted_model_info, adapted_training_images, from_rgb, to_rgb
from phenolens.models.kandinsky import (LORA_TARGETS, ClipInput, KandinskyParts, clip_embeds, load_kandinsky,
                                        movq_decode, movq_encode, movq_factor, noise_prediction, zero_embed)
from phenolens.models.store import INFO_FILE, ModelInfo, apply_umask, check_info, load_info, save_info
from phenolens.train.inputs import condition_order_line, training_inputs

logger = logging.getLogger(__name__)

METHOD = "kandinsky"
ADAPTER_DIR = "adapter"
MODEL_FILES = (ADAPTER_DIR, "scheduler", INFO_FILE)  # phenolens.json last: it marks a model


def check_channels(n_channels: int, where: str) -> None:
    """MoVQ and CLIP see RGB: 1 to 3 channels (Phen-LDiff's `to_rgb` rule), more must be picked."""
    if n_channels > 3:
        raise PhenolensError(f"{where} have {n_channels} channels; Kandinsky's MoVQ and CLIP take at most 3 (RGB): "
                             "pick 3 with --channels, e.g. --channels 0,1,2")
    if n_channels < 1:
        raise PhenolensError(f"{where} have no channels")


class Kandinsky(EmbeddingArithmetic, CounterfactualModel):
    """Kandinsky 2.2's decoder UNet + MoVQ + the prior's CLIP image encoder, as a DIFFusion model."""

    latent = True
    guide_inversion = True

    def __init__(self, unet, movq, image_encoder, clip_input: ClipInput, scheduler, info: ModelInfo,
                 device: str | None = None):
        super().__init__(info, scheduler, device)
        self.unet = unet.to(self.device).eval()
        self.movq = movq.to(self.device).eval()
        self.image_encoder = image_encoder.to(self.device).eval()
        self.clip_input = clip_input
        self.omega = DEFAULT_OMEGA
        self.class_means: ClassMeans | None = None
        self._zero: torch.Tensor | None = None

    @classmethod
    def from_parts(cls, parts: KandinskyParts, info: ModelInfo, device: str | None = None) -> "Kandinsky":
        return cls(parts.unet, parts.movq, parts.image_encoder, parts.clip_input, parts.scheduler, info, device)

    # ------------------------------------------------------------------------------ the method
    def clip_embedding(self, x0: torch.Tensor) -> torch.Tensor:
        """E(x): the CLIP image embeddings of images in [-1, 1], at CLIP's own scale (what the decoder reads)."""
        return clip_embeds(self.image_encoder, self.clip_input, to_rgb(x0.to(self.device)))

    def embedding(self, x0: torch.Tensor) -> torch.Tensor:
        """c = E(x)/‖E(x)‖ (§3.2: every embedding L2-normalised before the arithmetic)."""
        return nn.functional.normalize(self.clip_embedding(x0), dim=-1)

    def embedding_condition(self, c: torch.Tensor, reference: Mapping | None = None) -> dict:
        """ĉ (not normalised again) times the length of each image's own embedding (REFERENCE, its own
        condition): the decoder's input at CLIP's scale, equal to the image's own embedding when ω = 0."""
        if reference is None:
            raise PhenolensError("a Kandinsky edit needs the images' own condition (the length of their embedding)")
        scale = reference["image_embeds"].float().norm(dim=-1, keepdim=True)
        return {"image_embeds": c.float() * scale.to(c.device)}

    def condition(self, x0: torch.Tensor | None, source: Sequence[str]) -> dict:
        """An image's own condition is its CLIP embedding; there is none without an image (no prior here)."""
        if x0 is None:
            raise PhenolensError("a Kandinsky DIFFusion model renders embeddings of real images; it does not "
                                 "generate from noise alone (give images to translate)")
        return {"image_embeds": self.clip_embedding(x0)}

    def zero_embedding(self) -> torch.Tensor:
        """(1, D) embedding of an all-zero CLIP input (computed once)."""
        if self._zero is None:
            with torch.no_grad():
                self._zero = zero_embed(self.image_encoder)
        return self._zero

    def null_condition(self, n: int) -> dict:
        """The unconditional condition of classifier-free guidance: the zero-image embedding."""
        return {"image_embeds": self.zero_embedding().repeat(n, 1)}

    def network(self):
        """ε_θ(z_t, t, e): the decoder, its learned-variance half dropped (`noise_prediction`)."""
        unet = self.unet

        def fn(x: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
            return noise_prediction(unet, x, t, condition["image_embeds"])

        return fn

    def spatial_factor(self) -> int:
        return movq_factor(self.movq) * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return movq_encode(self.movq, to_rgb(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return from_rgb(movq_decode(self.movq, z), self.info.n_channels)

    def code_shape(self, n_channels: int, height: int, width: int) -> tuple[int, int, int]:
        f = movq_factor(self.movq)
        return (int(self.unet.config.in_channels), height // f, width // f)

    # ----------------------------------------------------------------------------- persistence
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | None = None, base: str | None = None,
                        prior: str | None = None, dtype: torch.dtype = torch.float32) -> "Kandinsky":
        """Decoder and prior (as phenolens.json names them, or BASE / PRIOR if they have moved) + the adapter."""
        from diffusers import DDIMScheduler

        from phenolens.models.adapters import load_adaptation

        model_dir = Path(model_dir)
        info = load_info(model_dir)
        if info.method != METHOD:
            raise PhenolensError(f"{model_dir}: is a {info.method!r} model, not a Kandinsky model")
        check_info(model_dir, info)
        if not 1 <= int(info.n_channels) <= 3:
            raise PhenolensError(f"{model_dir / INFO_FILE}: says n_channels {info.n_channels}, but a Kandinsky "
                                 "model's MoVQ and CLIP take 1 to 3 (restore the model's own phenolens.json)")
        decoder, prior = base or info.base, prior or (info.adaptation or {}).get("prior")
        if not decoder or not prior:
            raise PhenolensError(f"{model_dir / INFO_FILE}: does not name its decoder (base) and prior "
                                 "(adaptation.prior); pass base= and prior=")
        parts = load_kandinsky(decoder, prior, dtype=dtype)
        load_adaptation(model_dir / ADAPTER_DIR, parts.unet)
        scheduler = DDIMScheduler.from_pretrained(str(model_dir / "scheduler"))
        return cls(parts.unet, parts.movq, parts.image_encoder, parts.clip_input, scheduler, info, device=device)

    def save_pretrained(self, model_dir: str | Path) -> None:
        save_kandinsky_model(Path(model_dir), self.unet, self.scheduler, self.info)


def save_kandinsky_model(model_dir: Path, unet, scheduler, info: ModelInfo) -> None:
    """Only what was trained: adapter/ (the LoRA weights alone), scheduler/ and phenolens.json naming the
    decoder and the prior. Written into a temporary folder first; phenolens.json goes out first and back in
    last, so a half-replaced model never looks complete (checkpoints beside them stay)."""
    from phenolens.models.adapters import save_adaptation

    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    description = {k: v for k, v in info.adaptation.items() if k != "prior"}
    save_adaptation(tmp / ADAPTER_DIR, unet, description)
    scheduler.save_pretrained(str(tmp / "scheduler"))
    save_info(tmp, info)
    apply_umask(tmp)  # safetensors come out 0600
    if (model_dir / INFO_FILE).is_file():
        (model_dir / INFO_FILE).unlink()
    for name in MODEL_FILES:
        dest = model_dir / name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp / name, dest)
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------- training
class TrainedDecoder(nn.Module):
    """The decoder UNet as the shared trainer drives it: `model(z_t, t, image_embeds=e)` -> ε (the
    learned-variance half dropped). It holds nothing but the UNet (the frozen MoVQ and CLIP stay outside,
    in the loss), so checkpoints and the EMA cover the UNet and its adapters only."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    @property
    def config(self) -> dict:
        """What the trainer's resume fingerprint compares."""
        return dict(unet=dict(self.unet.config), trainable=sum(p.numel() for p in self.parameters() if p.requires_grad))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return noise_prediction(self.unet, z_t, t, image_embeds)


def kandinsky_loss(parts: KandinskyParts, null_label: int):
    """The trainer's loss: the ε loss (PhenDiff eq. 4) on MoVQ latents z_0 under each image's own CLIP
    embedding, the zero-image embedding where condition dropout set the null label (so guidance works)."""
    from phenolens.train.trainer import diffusion_loss

    def loss(model, noise_scheduler, x0, labels, generator):
        if next(parts.movq.parameters()).device != x0.device:
            parts.movq.to(x0.device)
            parts.image_encoder.to(x0.device)
        with torch.no_grad():
            rgb = to_rgb(x0)
            z0 = movq_encode(parts.movq, rgb)
            e = clip_embeds(parts.image_encoder, parts.clip_input, rgb)
            dropped = (labels == null_label).to(e.device)[:, None]
            e = torch.where(dropped, zero_embed(parts.image_encoder).expand_as(e), e)
        return diffusion_loss(model, noise_scheduler, z0, labels, generator,
                              condition=lambda _model, _labels: {"image_embeds": e})

    return loss


@dataclass
class KandinskyFinetuneSettings:
    """What `phenolens finetune --method kandinsky` decides besides the optimiser loop (see TrainConfig)."""

    base: str  # the decoder: a local directory or hub id
    prior: str  # the prior (its CLIP image encoder and processor)
    mode: str = "lora"
    rank: int = 4
    lora_alpha: float | None = None  # LoRA scale alpha/rank; default alpha = rank
    size: int | None = None  # training crop side; default: the decoder's native resolution
    channels: list[int] | None = None
    conditions: list[str] | None = None
    skip_bad: bool = False


def finetune_kandinsky(data: str | Path, model_dir: str | Path, settings: KandinskyFinetuneSettings, config, *,
                       resume: bool = False, overwrite: bool = False, command: str = "",
                       progress: bool = True) -> Kandinsky:
    """Domain-tune the decoder on DATA (folder per condition or manifest) into MODEL_DIR (paper §3).

    Returns the model with its final raw weights; MODEL_DIR holds their EMA (the raw ones with --no-ema).
    """
    from phenolens.data.io import read_image
    from phenolens.data.records import training_records
    from phenolens.models.adapters import count_parameters, prepare_unet
    from phenolens.train.trainer import check_config, is_main_process, open_model_folder, train

    if settings.mode != "lora":
        raise PhenolensError(f"--mode {settings.mode}: --method kandinsky fine-tunes with LoRA only (--mode lora)")
    if config.sample_every:
        raise PhenolensError("--sample-every: a Kandinsky model renders embeddings of real images and has no "
                             "samples from noise; leave --sample-every at 0")
    model_dir = Path(model_dir)
    check_config(config)
    records, conditions = training_records(data, settings.conditions)
    folder = open_model_folder(model_dir, inputs=training_inputs(data, records), resume=resume, overwrite=overwrite)
    main = is_main_process()
    if main:
        logger.info(condition_order_line(data, conditions, settings.conditions))

    first, _ = read_image(records[0].path, channels=settings.channels)  # fail before loading large models
    check_channels(first.shape[0], f"the images of {data}")
    parts = load_kandinsky(settings.base, settings.prior)
    factor = parts.spatial_factor()
    size = settings.size or parts.native_size
    images = adapted_training_images(records, conditions, data, settings, config, size, factor,
                                     "MoVQ's and the UNet's downsampling", check_channels, folder, model_dir,
                                     main=main, overwrite=overwrite, progress=progress)

    parts.movq.requires_grad_(False)
    parts.image_encoder.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # LoRA's init depends on --seed only; the caller's RNG is untouched
        torch.random.default_generator.manual_seed(config.seed)
        description = prepare_unet(parts.unet, "lora", rank=settings.rank, alpha=settings.lora_alpha,
                                   targets=LORA_TARGETS)
    model = TrainedDecoder(parts.unet)
    trainable, total = count_parameters(model)
    logger.info(f"lora: training {trainable:,} of {total:,} decoder parameters ({100 * trainable / total:.3g} %)")

    info = adapted_model_info(
        images, conditions, size, settings, config, data=data, command=command, method=METHOD, preset="lora",
        prediction_type=str(parts.scheduler.config.prediction_type), trainable=trainable, total=total,
        adaptation=dict(description, prior=str(settings.prior)))

    def on_save(trained: TrainedDecoder, step: int) -> None:
        info.training["steps_done"] = step
        folder.record(*MODEL_FILES)
        save_kandinsky_model(model_dir, trained.unet, parts.scheduler, info)

    trained = train(model, parts.scheduler, images, model_dir, config, null_label=len(conditions), resume=resume,
                    overwrite=overwrite, loss_fn=kandinsky_loss(parts, len(conditions)), on_save=on_save,
                    progress=progress, out_folder=folder)
    device = str(next(trained.parameters()).device)
    return Kandinsky(trained.unet, parts.movq, parts.image_encoder, parts.clip_input, parts.scheduler, info,
                     device=device)


__all__ = ["Kandinsky", "KandinskyFinetuneSettings", "TrainedDecoder", "finetune_kandinsky", "kandinsky_loss",
           "save_kandinsky_model"]
