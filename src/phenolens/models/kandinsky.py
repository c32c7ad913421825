"""The parts of Kandinsky 2.2 DIFFusion uses (paper 004 §3: "a pre-trained diffusion model (Shakhmatov et
al., 2023) that conditions on CLIP image embeddings"), how they are loaded, and what they compute.

- From the **decoder** repository (kandinsky-community/kandinsky-2-2-decoder's layout): the latent
  `UNet2DConditionModel` conditioned on an image embedding (`added_cond_kwargs={"image_embeds": e}`:
  addition_embed_type "image", encoder_hid_dim_type "image_proj"), whose output holds 2 × latent
  channels (ε and the learned variance; `noise_prediction` keeps ε, as diffusers' decoder pipeline
  splits it), its MoVQ autoencoder (`VQModel`: `movq_encode` / `movq_decode`, unscaled latents, decoded
  without quantisation as the img2img pipeline does) and its scheduler config.
- From the **prior** repository (kandinsky-community/kandinsky-2-2-prior): the CLIP vision tower
  (`CLIPVisionModelWithProjection`, the embedding is `.image_embeds`) and its `CLIPImageProcessor`,
  whose resize / crop / mean / std `ClipInput` applies in torch to [-1, 1] RGB tensors (no PIL round
  trip, so embeddings are differentiable and computed on the GPU).

Both load through `phenolens.models.latent.load_parts` (a local directory or a hub id: the cache, then the
hub, with the same one-line errors as `--base` of Phen-LDiff). `tiny_*_config` build random-weight
stand-ins for tests; `full_*_config` give the published architecture for benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from phenolens.errors import PhenolensError

DECODER_WHAT = ("a Kandinsky 2.2 decoder: a directory with unet/, movq/ and scheduler/, or a hub id such as "
                "kandinsky-community/kandinsky-2-2-decoder")
PRIOR_WHAT = ("a Kandinsky 2.2 prior: a directory with image_encoder/ and image_processor/, or a hub id such as "
              "kandinsky-community/kandinsky-2-2-prior")
# LoRA targets of the decoder (paper §3 "Domain tuning": cross-attention and its projections): the
# attention projections and the added key/value projections that bring the image tokens in
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (CLIPImageProcessor's default)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------- CLIP input
@dataclass(frozen=True)
class ClipInput:
    """What `CLIPImageProcessor` does to an image, done in torch: resize the shortest side to
    `shortest_edge` (bicubic, antialiased), centre-crop to `crop` (h, w), scale to [0, 1], normalise."""

    crop: tuple[int, int]
    shortest_edge: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ClipInput":
        """From a CLIPImageProcessor's preprocessor_config.json (sizes as dicts or, in older files, ints)."""
        def side(value: Any, key: str) -> int:
            return int(value.get(key, value.get("shortest_edge", 224))) if isinstance(value, dict) else int(value)

        size = config.get("size", 224)
        crop = config.get("crop_size", size) if config.get("do_center_crop", True) else size
        edge = size.get("shortest_edge") if isinstance(size, dict) else size
        return cls((side(crop, "height"), side(crop, "width")), int(edge) if edge else None,
                   tuple(float(v) for v in config.get("image_mean", CLIP_MEAN)),
                   tuple(float(v) for v in config.get("image_std", CLIP_STD)))

    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [-1, 1] -> CLIP's normalised (B, 3, crop_h, crop_w) pixel values."""
        x = (rgb.float() + 1) / 2
        ch, cw = self.crop
        h, w = x.shape[-2:]
        if self.shortest_edge:
            s = self.shortest_edge / min(h, w)
            size = (max(ch, round(h * s)), max(cw, round(w * s)))
        else:
            size = (ch, cw)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


# ------------------------------------------------------------------------------ computations
def clip_embeds(image_encoder, clip_input: ClipInput, rgb: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings (`.image_embeds`, at CLIP's own scale) of [-1, 1] RGB images, in float32."""
    pixels = clip_input(rgb).to(next(image_encoder.parameters()).dtype)
    return image_encoder(pixel_values=pixels).image_embeds.float()


def zero_embed(image_encoder) -> torch.Tensor:
    """(1, D) embedding of an all-zero CLIP input: the unconditional embedding, as diffusers' prior pipeline
    makes it (`get_zero_embed`), which the decoder was trained to read as "no image"."""
    size = int(image_encoder.config.image_size)
    p = next(image_encoder.parameters())
    zero = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
    return image_encoder(pixel_values=zero).image_embeds.float()


def noise_prediction(unet, z_t: torch.Tensor, t: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """ε_θ(z_t, t, e): the decoder's output without its learned-variance half (its first C channels; the
    samplers here use the scheduler's fixed σ_t, EF-DDPM eq. 8)."""
    dtype = next(unet.parameters()).dtype
    out = unet(z_t.to(dtype), t, encoder_hidden_states=None,
               added_cond_kwargs={"image_embeds": image_embeds.to(dtype)}).sample
    return out[:, : z_t.shape[1]].to(z_t.dtype)


def movq_encode(movq, rgb: torch.Tensor) -> torch.Tensor:
    """z_0 = E(x): MoVQ's pre-quantisation latents of [-1, 1] RGB images (unscaled, as Kandinsky's img2img
    pipeline uses them), in float32."""
    return movq.encode(rgb.to(next(movq.parameters()).dtype)).latents.float()


def movq_decode(movq, z: torch.Tensor) -> torch.Tensor:
    """D(z): RGB in about [-1, 1], decoded without quantising (`force_not_quantize`, as the pipelines do)."""
    return movq.decode(z.to(next(movq.parameters()).dtype), force_not_quantize=True).sample.float()


def movq_factor(movq) -> int:
    """Pixels per latent pixel along each side (8 for Kandinsky 2.2's MoVQ)."""
    return 2 ** (len(movq.config.block_out_channels) - 1)


# ------------------------------------------------------------------------------------ loading
@dataclass
class KandinskyParts:
    """The loaded components, and where they came from."""

    unet: Any
    movq: Any
    scheduler: Any  # a DDIMScheduler with the decoder's noise schedule
    image_encoder: Any
    clip_input: ClipInput
    decoder: str = ""
    prior: str = ""

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def spatial_factor(self) -> int:
        """Image sides must be a multiple of this: MoVQ's downsampling times the UNet's."""
        return movq_factor(self.movq) * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The image side the decoder was trained at (its sample size × MoVQ's factor: 512 for Kandinsky 2.2)."""
        return int(self.unet.config.sample_size) * movq_factor(self.movq)


def _dtype_key() -> str:
    import transformers

    # transformers 5 renamed `torch_dtype` to `dtype` (the old name still works, with a warning)
    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def load_kandinsky(decoder: str | Path, prior: str | Path, dtype: torch.dtype = torch.float32) -> KandinskyParts:
    """The decoder's unet/, movq/ and scheduler/ and the prior's image_encoder/ and image_processor/
    (each repository a local directory or a hub id). One-line PhenolensError naming --base or --prior
    for a missing folder, a model of another kind, an unreachable hub or an uncached model offline."""
    from diffusers import UNet2DConditionModel, VQModel
    from transformers import CLIPVisionModelWithProjection
    from transformers.image_processing_base import ImageProcessingMixin

    from phenolens.models.latent import ddim_scheduler, load_parts

    def unet(source: str, local_only: bool):
        config = UNet2DConditionModel.load_config(source, subfolder="unet", local_files_only=local_only)
        if config.get("addition_embed_type") != "image" or config.get("encoder_hid_dim_type") != "image_proj":
            raise PhenolensError(f"--base {decoder}: unet/ is not conditioned on image embeddings (addition_embed_type "
                                 f"{config.get('addition_embed_type')!r}); pass {DECODER_WHAT}")
        return UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype,
                                                    local_files_only=local_only)

    def movq(source: str, local_only: bool):
        config = VQModel.load_config(source, subfolder="movq", local_files_only=local_only)
        if config.get("_class_name") != "VQModel":
            raise PhenolensError(f"--base {decoder}: movq/ holds {config.get('_class_name')!r}, not a MoVQ "
                                 f"autoencoder (VQModel); pass {DECODER_WHAT}")
        return VQModel.from_pretrained(source, subfolder="movq", torch_dtype=dtype, local_files_only=local_only)

    def encoder(source: str, local_only: bool):
        return CLIPVisionModelWithProjection.from_pretrained(source, subfolder="image_encoder",
                                                             local_files_only=local_only, **{_dtype_key(): dtype})

    def processor(source: str, local_only: bool):  # its settings only: no image-processing backend needed
        config, _ = ImageProcessingMixin.get_image_processor_dict(source, subfolder="image_processor",
                                                                   local_files_only=local_only)
        return ClipInput.from_config(config)

    dec = load_parts(decoder, "--base", {"unet": unet, "movq": movq, "scheduler": ddim_scheduler}, what=DECODER_WHAT)
    pri = load_parts(prior, "--prior", {"image_encoder": encoder, "image_processor": processor}, what=PRIOR_WHAT)
    parts = KandinskyParts(dec["unet"], dec["movq"], dec["scheduler"], pri["image_encoder"],
                           pri["image_processor"], str(decoder), str(prior))
    check_parts(parts)
    return parts


def check_parts(parts: KandinskyParts) -> None:
    """The decoder and the prior must fit together: the UNet reads embeddings of the encoder's size and
    denoises latents of MoVQ's channels."""
    cfg = parts.unet.config
    dim = int(parts.image_encoder.config.projection_dim)
    if int(cfg.encoder_hid_dim) != dim:
        raise PhenolensError(f"--prior {parts.prior}: makes {dim}-dimensional image embeddings, but the decoder "
                             f"--base {parts.decoder} reads {cfg.encoder_hid_dim}-dimensional ones")
    latent = int(parts.movq.config.vq_embed_dim or parts.movq.config.latent_channels)
    if int(cfg.in_channels) != latent or int(cfg.out_channels) not in (latent, 2 * latent):
        raise PhenolensError(f"--base {parts.decoder}: unet/ takes {cfg.in_channels} and gives {cfg.out_channels} "
                             f"channels but movq/ makes {latent}-channel latents (an inpainting decoder?)")


# ------------------------------------------------------------------------------ configurations
def tiny_unet_config(embed_dim: int = 16, latent_channels: int = 4) -> dict[str, Any]:
    """A Kandinsky-2.2-shaped decoder UNet small enough for tests (the same block types as `full_unet_config`)."""
    return dict(
        sample_size=8, in_channels=latent_channels, out_channels=2 * latent_channels,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=16, cross_attention_dim=32,
        encoder_hid_dim=embed_dim, encoder_hid_dim_type="image_proj", addition_embed_type="image",
        addition_embed_type_num_heads=16, resnet_time_scale_shift="scale_shift", norm_num_groups=8,
    )


def tiny_movq_config(latent_channels: int = 4) -> dict[str, Any]:
    """A MoVQ-shaped VQModel (spatial norm) that halves the resolution once."""
    return dict(
        in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,  # SpatialNorm: 32 groups
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels, vq_embed_dim=latent_channels, num_vq_embeddings=64, norm_num_groups=8,
        norm_type="spatial", sample_size=16,
    )


def tiny_clip_config(embed_dim: int = 16, image_size: int = 32) -> dict[str, Any]:
    """CLIPVisionConfig kwargs of a tiny vision tower whose projection fits `tiny_unet_config(embed_dim)`."""
    return dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                image_size=image_size, patch_size=8, projection_dim=embed_dim)


def full_unet_config() -> dict[str, Any]:
    """UNet2DConditionModel kwargs of the published Kandinsky 2.2 decoder UNet (~1.2B parameters), as
    kandinsky-community/kandinsky-2-2-decoder's unet/config.json gives it (from memory of that file):
    4 levels of 384·(1, 2, 3, 4) channels, 3 ResNets per level, SimpleCrossAttn blocks (image tokens as
    added key/values) at the three lower levels, 64-channel heads, scale-shift time conditioning; image
    embeddings of 1280 (CLIP ViT-bigG/14's projection) enter as 32 tokens of 768 (diffusers' ImageProjection)
    and as a time-embedding addition; 8 output channels (ε and the learned variance); 64×64 latents = 512 px.
    Built on the meta device it counts 1253M parameters (the published decoder: about 1.2B)."""
    return dict(
        sample_size=64, in_channels=4, out_channels=8, act_fn="silu",
        block_out_channels=(384, 768, 1152, 1536), layers_per_block=3,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                          "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                        "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=64, cross_attention_dim=768,
        encoder_hid_dim=1280, encoder_hid_dim_type="image_proj", addition_embed_type="image",
        addition_embed_type_num_heads=64, resnet_time_scale_shift="scale_shift", norm_num_groups=32,
        norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, use_linear_projection=False,
    )


def full_movq_config() -> dict[str, Any]:
    """VQModel kwargs of Kandinsky 2.2's MoVQ (67.8M parameters; movq/config.json of the decoder repository,
    from memory): 128·(1, 2, 2, 4) channels, attention in the lowest level, spatially conditioned norms in
    the decoder, 4-channel latents at 1/8 of the image side, a 16384-entry codebook."""
    return dict(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4, vq_embed_dim=4, num_vq_embeddings=16384, norm_num_groups=32, norm_type="spatial",
        act_fn="silu", sample_size=32,
    )


def full_clip_config() -> dict[str, Any]:
    """CLIPVisionConfig kwargs of OpenCLIP ViT-bigG/14 (laion2B-39B-b160k), the prior's image_encoder/
    (1845M parameters; the OpenCLIP model card / transformers config): width 1664, 48 layers, 16 heads,
    MLP 8192, 14-px patches on 224 px, projection to 1280, GELU."""
    return dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=1280, hidden_act="gelu", layer_norm_eps=1e-5)


def kandinsky_scheduler_config() -> dict[str, Any]:
    """Kandinsky 2.2 decoder's scheduler/scheduler_config.json (DDPM, linear β from 0.00085 to 0.012,
    ε-prediction, leading spacing with offset 1; from memory of the published file)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                clip_sample=False, steps_offset=1, timestep_spacing="leading",
                prediction_type="epsilon", thresholding=False)


def build_parts(unet_config: dict, movq_config: dict, clip_config: dict, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str = "cpu") -> KandinskyParts:
    """Random-weight components from configs (tests, benchmarks), initialised on DEVICE (fast for full-size
    models on a GPU; SEED fixes the weights on the CPU only); the CPU random state is kept."""
    from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    gen = torch.random.default_generator
    with torch.random.fork_rng(devices=[]), torch.device(device):
        gen.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        gen.manual_seed(seed + 1)
        movq = VQModel(**movq_config)
        gen.manual_seed(seed + 2)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_config))
    size = int(clip_config["image_size"])
    clip_input = ClipInput((size, size), size, CLIP_MEAN, CLIP_STD)
    def place(module):  # a float32 model is only moved (diffusers warns about any .to(dtype))
        return (module.to(device) if dtype == torch.float32 else module.to(device, dtype)).eval()

    parts = KandinskyParts(place(unet), place(movq), DDIMScheduler(**kandinsky_scheduler_config()), place(encoder),
                           clip_input, "random", "random")
    check_parts(parts)
    return parts


def save_tiny_repositories(root: str | Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Write tiny random decoder and prior repositories (the hub layouts) under ROOT; returns their paths."""
    from diffusers import DDPMScheduler

    root = Path(root)
    parts = build_parts(tiny_unet_config(), tiny_movq_config(), tiny_clip_config(), seed=seed)
    decoder, prior = root / "decoder", root / "prior"
    parts.unet.save_pretrained(decoder / "unet", safe_serialization=True)
    parts.movq.save_pretrained(decoder / "movq", safe_serialization=True)
    DDPMScheduler(**kandinsky_scheduler_config(), variance_type="learned_range").save_pretrained(decoder / "scheduler")
    parts.image_encoder.save_pretrained(prior / "image_encoder", safe_serialization=True)
    size = parts.clip_input.crop[0]
    (prior / "image_processor").mkdir(parents=True, exist_ok=True)
    processor = dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": size},
                     resample=3, do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
                     rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                     do_convert_rgb=True)
    (prior / "image_processor" / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    (decoder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}) + "\n")
    (prior / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22PriorPipeline"}) + "\n")
    return decoder, prior


__all__ = ["ClipInput", "KandinskyParts", "LORA_TARGETS", "build_parts", "check_parts", "clip_embeds",
           "full_clip_config", "full_movq_config", "full_unet_config", "load_kandinsky", "movq_decode",
           "movq_encode", "movq_factor", "noise_prediction", "save_tiny_repositories", "tiny_clip_config",
           "tiny_movq_config", "tiny_unet_config", "zero_embed"]
