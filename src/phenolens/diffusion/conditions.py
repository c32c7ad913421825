"""Conditions are keyword tensors for the network call, in diffusers' own names.

A class-conditional `UNet2DModel` takes `class_labels`, a text- or embedding-conditioned
`UNet2DConditionModel` takes `encoder_hidden_states` and/or `added_cond_kwargs={"image_embeds": ...}`.
A method builds the dict for a batch; the samplers only batch it (concatenate it with the null
condition for classifier-free guidance, take the rows of the images still being solved), so no network
needs to pretend to be class-conditional.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

Condition = Mapping[str, Any]
"""Keyword arguments of the network call; tensors (and nested dicts of tensors) carry one row per image."""

ModelFn = Callable[[Tensor, Tensor, Condition], Tensor]
"""(x, t, condition) -> raw model output (ε, v or x_0, following `scheduler.config.prediction_type`).
`t` is a long tensor of shape (B,) (one value for every image)."""


def network_fn(net: Callable[..., Any]) -> ModelFn:
    """The `ModelFn` of a diffusers network: `net(x, t, **condition)`, its `.sample` (or first item)."""

    def fn(x: Tensor, t: Tensor, condition: Condition) -> Tensor:
        out = net(x, t, **condition)
        if hasattr(out, "sample"):
            return out.sample
        return out[0] if isinstance(out, (tuple, list)) else out

    return fn


def take(condition: Condition, index: Tensor | Sequence[int]) -> dict:
    """The rows `index` of every per-image tensor of CONDITION (nested dicts included)."""
    out: dict = {}
    for key, value in condition.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            idx = torch.as_tensor(index, dtype=torch.long, device=value.device)
            out[key] = value.index_select(0, idx)
        elif isinstance(value, Mapping):
            out[key] = take(value, index)
        else:
            out[key] = value
    return out


def cat(conditions: Sequence[Condition]) -> dict:
    """Concatenate conditions of the same keys along the batch (e.g. [conditional, null] for guidance)."""
    first = conditions[0]
    out: dict = {}
    for key, value in first.items():
        values = [c[key] for c in conditions]
        if isinstance(value, Tensor) and value.dim() > 0:
            out[key] = torch.cat(values, dim=0)
        elif isinstance(value, Mapping):
            out[key] = cat(values)
        else:
            out[key] = value
    return out


def to_device(condition: Condition, device) -> dict:
    out: dict = {}
    for key, value in condition.items():
        if isinstance(value, Tensor):
            out[key] = value.to(device)
        elif isinstance(value, Mapping):
            out[key] = to_device(value, device)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------ guidance inside the condition
GUIDED = "guided"
"""The key of a condition that carries its own classifier-free guidance (`guided_condition`)."""


def guided_condition(condition: Condition, null: Condition, scale: float) -> dict:
    """CONDITION with classifier-free guidance of SCALE against NULL folded in, so that inversion and
    rendering alike call the guided network (`guidance_aware`). Why: DIFFusion (paper 004, App. B.3)
    inverts and generates under the same guidance; with edit-friendly inversion the reconstruction then
    stays exact and an edit that leaves the embedding as it is leaves the image as it is, while the edit
    is amplified by the scale. Rows are taken and concatenated like any condition (nested dicts)."""
    return {GUIDED: {"cond": dict(condition), "null": dict(null), "scale": float(scale)}}


def guidance_aware(model: ModelFn) -> ModelFn:
    """MODEL, also accepting a `guided_condition`: o = o_u + s·(o_c − o_u) in one batched call."""

    def fn(x: Tensor, t: Tensor, condition: Condition) -> Tensor:
        if GUIDED not in condition:
            return model(x, t, condition)
        g = condition[GUIDED]
        both = model(torch.cat([x, x]), torch.cat([t, t]), cat([g["cond"], g["null"]]))
        cond, uncond = both.chunk(2)
        return uncond + g["scale"] * (cond - uncond)

    return fn
