"""The networks of a semantic diffusion autoencoder (Diff-AE, paper 000; DiffEx §3.1, paper 001).

A semantic encoder maps an image to a code z_enc; DiffEx appends the classifier's scores to it,
z_sem = [z_enc, C(x)], and the denoising UNet is conditioned on z_sem (eq. 1).

How z_sem enters the UNet, and why: `UNet2DModel(class_embed_type="identity",
resnet_time_scale_shift="scale_shift")`. The encoder's `embed` projects z_sem to the UNet's timestep
embedding width; diffusers adds it to the timestep embedding and every ResNet block turns the sum into
a per-channel scale and shift of its normalised features (AdaGN). Diff-AE multiplies a z_sem scale
into the timestep's scale-shift instead; diffusers' blocks take one embedding, so the two are summed
first. This keeps the UNet a stock diffusers model (save_pretrained, every scheduler, the core's
inversion) and the conditioning a keyword tensor, `class_labels`, like PhenDiff's.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from phenolens.errors import PhenolensError
from phenolens.models.unet import preset_kwargs


class SemanticEncoder(ModelMixin, ConfigMixin):
    """x (B, C, H, W) in [-1, 1] -> z_enc (B, code_dim); and z_sem -> the UNet's class embedding.

    A small convolutional encoder (halving the resolution `levels` times, then a global average, so it
    reads images of any size), as Diff-AE's semantic encoder is the first half of a UNet."""

    @register_to_config
    def __init__(self, in_channels: int = 4, code_dim: int = 64, n_scores: int = 2, width: int = 32,
                 levels: int = 3, embed_dim: int = 128, norm_groups: int = 8, unit_norm: bool = False):
        # unit_norm: the semantic code is L2-normalised before it conditions the UNet (DIFFusion's image
        # embeddings, paper 004 §3: "we normalize all the image embeddings with L2 norm")
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1)]
        channels = width
        for level in range(levels):
            out = width * 2 ** min(level + 1, 2)
            layers += [nn.GroupNorm(norm_groups, channels), nn.SiLU(), nn.Conv2d(channels, out, 3, stride=2, padding=1)]
            channels = out
        layers += [nn.GroupNorm(norm_groups, channels), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.to_code = nn.Linear(channels, code_dim)
        # z_sem = [z_enc, scores] -> the UNet's timestep-embedding width (eq. 1's conditioning)
        self.embed_net = nn.Sequential(nn.Linear(code_dim + n_scores, embed_dim), nn.SiLU(),
                                       nn.Linear(embed_dim, embed_dim))

    @property
    def unit_norm(self) -> bool:
        return bool(self.config.get("unit_norm", False))  # encoders saved before it: False

    @property
    def sem_dim(self) -> int:
        """Length of z_sem: the code and one score per class (none without a classifier)."""
        return int(self.config.code_dim + self.config.n_scores)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_code(self.features(x).mean(dim=(-2, -1)))

    def embed(self, z_sem: torch.Tensor) -> torch.Tensor:
        if z_sem.shape[-1] != self.sem_dim:
            raise PhenolensError(f"a semantic code has {z_sem.shape[-1]} values; this model's have {self.sem_dim}")
        return self.embed_net(z_sem)


def build_semantic_unet(preset: str, *, channels: int, size: int) -> UNet2DModel:
    """A fresh UNet conditioned through `class_labels` = a float embedding of z_sem (see the module)."""
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, class_embed_type="identity",
                       resnet_time_scale_shift="scale_shift", **preset_kwargs(preset, size))


def embed_dim_of(unet: UNet2DModel) -> int:
    """The width z_sem must be projected to: the UNet's timestep embedding."""
    return int(unet.config.time_embedding_dim or unet.config.block_out_channels[0] * 4)


__all__ = ["SemanticEncoder", "build_semantic_unet", "embed_dim_of"]
