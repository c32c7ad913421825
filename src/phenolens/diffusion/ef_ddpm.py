"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024; DIFFusion §3.2).

Instead of one deterministic code x_T, a real image x_0 becomes the noisy images x_t of every step,
each drawn *independently* from x_0 (DIFFusion eq. 1, x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε_t), and the noise
maps that make the stochastic (η = 1) sampler pass exactly through them:

    z_t = (x_{t−1} − μ_θ(x_t, c)) / σ_t                                          (eq. 5)

Rendering from step T − T_skip with the same maps under another condition ĉ,
x̂_{t−1} = μ_θ(x̂_t, ĉ) + σ_t z_t (eq. 8), keeps the image's structure (the maps carry it) while the
condition changes what the network predicts. Under c itself it returns x_0 exactly, by construction.
μ_θ and σ_t are those of `DDIMScheduler.step(eta=1)`: on a strided schedule DDPM's posterior.
Noise maps are per batch, in memory (steps × the batch's size); nothing is written to disk.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from phenolens.diffusion.code import Code
from phenolens.diffusion.conditions import Condition, ModelFn
from phenolens.diffusion.ddim import (_alpha_bar, _check, _previous_timestep, _progress, _timestep, _working_scheduler,
                                      check_skip, ddpm_sigma, sampling_schedule)

Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(shape: Sequence[int], n: int, generator: Generators, device) -> Tensor:
    """N(0, I) of shape (n, *shape): one generator per image (results then do not depend on how images
    are batched), one for the batch, or torch's global generator when None."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(n, *shape, generator=generator).to(device)
    if len(generator) != n:
        raise ValueError(f"give one generator per image ({n}), got {len(generator)}")
    return torch.stack([torch.randn(*shape, generator=g) for g in generator]).to(device)


@torch.no_grad()
def invert_ef_ddpm(model: ModelFn, x0: Tensor, condition: Condition, scheduler, steps: int = 50, skip: int = 0,
                   generator: Generators = None, progress: bool = False) -> Code:
    """The edit-friendly code of x0 under CONDITION: x at step `skip` and the maps of the remaining steps."""
    check_skip(steps, skip)
    work = _working_scheduler(scheduler, steps)
    _check(sampling_schedule(scheduler, steps), work.config.prediction_type)
    timesteps = [int(t) for t in work.timesteps][skip:]
    n = x0.shape[0]
    # x_t for every step, each from its own noise (eq. 1); x_0 itself below the last step
    noisy = []
    for t in timesteps:
        a = _alpha_bar(work, t)
        eps = draw_noise(x0.shape[1:], n, generator, x0.device).to(x0.dtype)
        noisy.append(math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps)
    targets = noisy[1:] + [x0]
    maps: list[Tensor] = []
    for t, x_t, x_prev in _progress(list(zip(timesteps, noisy, targets)), progress, "invert (ef-ddpm)", len(timesteps)):
        out = model(x_t, _timestep(t, x_t), condition)
        mu = work.step(out, t, x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample  # μ_θ(x_t, c)
        sigma = ddpm_sigma(_alpha_bar(work, t), _alpha_bar(work, _previous_timestep(work, t)))
        maps.append((x_prev - mu) / sigma if sigma > 0.0 else x_prev - mu)  # eq. 5 (residual where σ = 0)
    return Code(x=noisy[0], steps=steps, start=skip, noise=maps,
                forwards=torch.full((n,), len(timesteps), dtype=torch.long))
