"""Class-conditional pixel UNets (PhenDiff §2.2) built from diffusers' `UNet2DModel`.

The condition is a class label: `UNet2DModel(num_class_embeds=K + 1)` adds a learned embedding of
the label to the timestep embedding. Index K is the "null" condition used by classifier-free
condition dropout, so every model can also run unconditionally.
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DModel

from phenolens.errors import PhenolensError

# Each preset is UNet2DModel keyword arguments. `paper` follows PhenDiff §3 (a U-Net with 3 ResNet
# blocks per level, about 70M parameters; this one has 65M); `tiny` trains in minutes on a 2-core CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=32,
    ),
    "small": dict(
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=32,
    ),
    "paper": dict(
        block_out_channels=(128, 256, 256, 384),
        layers_per_block=3,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=64,
    ),
}


def preset_downsample_factor(preset: str) -> int:
    """Image sides a preset's network takes must be multiples of this."""
    if preset not in PRESETS:
        raise PhenolensError(f"--preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    return downsample_factor_of(PRESETS[preset]["block_out_channels"])


def preset_kwargs(preset: str, size: int) -> dict[str, Any]:
    """PRESET's UNet2DModel keyword arguments, after checking that SIZE suits its downsampling."""
    if preset not in PRESETS:
        raise PhenolensError(f"--preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    factor = downsample_factor_of(kwargs["block_out_channels"])
    if size % factor:
        raise PhenolensError(f"--size {size} must be a multiple of {factor} for preset {preset!r}")
    return kwargs


def build_unet(preset: str, *, channels: int, size: int, num_conditions: int) -> UNet2DModel:
    """A fresh class-conditional UNet; label `num_conditions` is the null (dropped) condition."""
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       num_class_embeds=num_conditions + 1, **preset_kwargs(preset, size))


def downsample_factor_of(block_out_channels: tuple[int, ...] | list[int]) -> int:
    """Images must be a multiple of this: each level but the last halves the resolution."""
    return 2 ** (len(block_out_channels) - 1)


def unet_downsample_factor(unet: UNet2DModel) -> int:
    return downsample_factor_of(unet.config.block_out_channels)
