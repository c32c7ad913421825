"""DDIM sampling and inversion (phenolens.diffusion.ddim): exactness, trajectories, batching, zero SNR.

A randomly initialised UNet is not a denoiser: an ε it predicts at high noise gets amplified by
1/√ᾱ_t ≈ 60 in x̂_0, and every reconstruction diverges. The model functions below are therefore the
*optimal* denoiser for Gaussian data (x_0 ~ N(0, σ²)) plus a small random-UNet perturbation: they
behave like a trained network (smooth in x, self-consistent across t) yet depend on x and on the label
in a non-trivial way, which is what makes plain DDIM inversion inexact.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMInverseScheduler

from phenolens.diffusion.ddim import (
    INVERSION_METHODS,
    invert,
    inversion_schedule,
    make_scheduler,
    sample,
    to_epsilon,
    unet_fn,
)
from phenolens.models.unet import build_unet

SIGMA2 = 0.25  # variance of the Gaussian "data" the analytic denoiser is optimal for


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny 16-px UNet: intra-op threads buy nothing, and on a loaded 2-core machine oversubscription
    # makes a forward pass ~50x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet("tiny", channels=2, size=16, num_conditions=3).eval()


@pytest.fixture(scope="module")
def x0():
    g = torch.Generator().manual_seed(1)
    return (0.6 * torch.randn(3, 2, 16, 16, generator=g)).clamp(-1, 1)


LABELS = torch.tensor([0, 2, 1])


def denoiser(unet, scheduler, strength: float = 0.1):
    """ModelFn: Gaussian-optimal ε / v (per prediction type) + strength · UNet(x, t, label)."""
    f = unet_fn(unet)
    abar = scheduler.alphas_cumprod
    pt = scheduler.config.prediction_type

    def fn(x, t, labels):
        a = abar[t].view(-1, 1, 1, 1).to(x.dtype)
        d = a * SIGMA2 + 1 - a
        eps = (1 - a).sqrt() * x / d  # E[ε | x_t]
        x0 = a.sqrt() * SIGMA2 * x / d  # E[x_0 | x_t]
        opt = eps if pt == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return opt + strength * f(x, t, labels)

    return fn


def mse(a, b) -> float:
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_fixed_point_reconstructs_much_better_than_ddim(unet, x0, prediction_type, spacing):
    scheduler = make_scheduler(prediction_type, timestep_spacing=spacing)
    model = denoiser(unet, scheduler)
    steps = 10
    err = {}
    for method, iters in (("ddim", 0), ("fixed-point", 5)):
        xT = invert(model, x0, LABELS, scheduler, steps=steps, method=method, iters=iters)
        assert torch.isfinite(xT).all()
        err[method] = mse(sample(model, xT, LABELS, scheduler, steps=steps), x0)
    assert err["fixed-point"] < 2e-5, err
    assert err["fixed-point"] * 10 <= err["ddim"], err


def test_inversion_trajectory_is_reverse_of_sampling(unet):
    for spacing in ("leading", "trailing"):
        scheduler = make_scheduler("epsilon", timestep_spacing=spacing)
        for steps in (10, 25, 50):
            scheduler.set_timesteps(steps)
            expected = [int(t) for t in scheduler.timesteps.flip(0)]
            seen: dict[str, list[int]] = {"invert": [], "sample": []}

            def recorder(key):
                def fn(x, t, labels):
                    assert (t == t[0]).all() and t.shape == (x.shape[0],)
                    seen[key].append(int(t[0]))
                    return torch.zeros_like(x)

                return fn

            x = torch.zeros(2, 1, 4, 4)
            lab = torch.zeros(2, dtype=torch.long)
            invert(recorder("invert"), x, lab, scheduler, steps=steps, method="ddim")
            sample(recorder("sample"), x, lab, scheduler, steps=steps)
            assert seen["invert"] == expected == seen["sample"][::-1]
            assert [t for t, _, _ in inversion_schedule(scheduler, steps)] == expected
            # diffusers' own inverse scheduler visits the same timesteps
            inverse = DDIMInverseScheduler.from_config(scheduler.config)
            inverse.set_timesteps(steps)
            assert [int(t) for t in inverse.timesteps] == expected
        # the caller's scheduler is not mutated by invert/sample
        scheduler = make_scheduler("epsilon", timestep_spacing=spacing)
        scheduler.set_timesteps(7)
        invert(recorder("invert"), x, lab, scheduler, steps=5)
        assert len(scheduler.timesteps) == 7


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_plain_ddim_matches_diffusers_inverse_scheduler(unet, x0, spacing):
    # ε-models only: for v-models diffusers reads v at ᾱ_s, we read it at ᾱ_t (see invert's comment)
    scheduler = make_scheduler("epsilon", timestep_spacing=spacing)
    model = denoiser(unet, scheduler)
    ours = invert(model, x0, LABELS, scheduler, steps=8, method="ddim")
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(8)
    x = x0
    with torch.no_grad():
        for t in inverse.timesteps:
            out = model(x, torch.full((x.shape[0],), int(t)), LABELS)
            x = inverse.step(out, int(t), x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("method", INVERSION_METHODS)
def test_constant_output_step_is_exactly_invertible(prediction_type, method):
    # ε independent of x: eq. 6 evaluated at the old point is then the exact inverse of eq. 5.
    # float64, so that "exact" can be checked to 1e-9 (the 1/√ᾱ_t ≈ 150 of the top step amplifies
    # float32 rounding to ~5e-5).
    scheduler = make_scheduler(prediction_type, timestep_spacing="trailing")
    abar = scheduler.alphas_cumprod.double()
    g = torch.Generator().manual_seed(3)
    const = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) * 0.5
    lab = torch.tensor([0, 1])

    def model(x_, t, labels):  # the raw output whose ε is `const`
        if prediction_type == "epsilon":
            return const
        a = abar[t].view(-1, 1, 1, 1)
        return (const - (1 - a).sqrt() * x_) / a.sqrt()  # v with √ᾱ v + √(1-ᾱ) x = const

    for steps in (1, 4, 10):
        xT = invert(model, x, lab, scheduler, steps=steps, method=method, iters=3)
        torch.testing.assert_close(sample(model, xT, lab, scheduler, steps=steps), x, atol=1e-9, rtol=1e-9)
    # one step, checked against the closed form of the ε-model inverse
    if prediction_type == "epsilon":
        (t, a_t, a_s), *_ = inversion_schedule(scheduler, 1)
        xT = invert(model, x, lab, scheduler, steps=1, method=method)
        closed = math.sqrt(a_t) * (x - math.sqrt(1 - a_s) * const) / math.sqrt(a_s) + math.sqrt(1 - a_t) * const
        torch.testing.assert_close(xT, closed)


def test_batch_with_mixed_labels_matches_single_images(unet, x0):
    scheduler = make_scheduler("v_prediction", timestep_spacing="trailing")
    model = denoiser(unet, scheduler, strength=0.3)
    xT = invert(model, x0, LABELS, scheduler, steps=5, method="fixed-point", iters=2)
    target = torch.tensor([1, 0, 2])
    out = sample(model, xT, target, scheduler, steps=5, guidance_scale=2.0, null_label=3)
    for i in range(len(x0)):
        xi = invert(model, x0[i : i + 1], LABELS[i : i + 1], scheduler, steps=5, method="fixed-point", iters=2)
        torch.testing.assert_close(xi, xT[i : i + 1], atol=1e-5, rtol=1e-5)
        oi = sample(model, xi, target[i : i + 1], scheduler, steps=5, guidance_scale=2.0, null_label=3)
        torch.testing.assert_close(oi, out[i : i + 1], atol=1e-5, rtol=1e-5)
    # the label matters (otherwise the test above proves nothing)
    assert mse(sample(model, xT, LABELS, scheduler, steps=5), out) > 1e-6


def test_classifier_free_guidance_formula(unet, x0):
    scheduler = make_scheduler("epsilon")
    model = denoiser(unet, scheduler, strength=0.3)
    lab, null = torch.tensor([0, 1, 2]), torch.full((3,), 3)
    s = 3.0
    mixed = lambda x, t, labels: model(x, t, null) + s * (model(x, t, labels) - model(x, t, null))  # noqa: E731
    torch.testing.assert_close(
        sample(model, x0, lab, scheduler, steps=3, guidance_scale=s, null_label=3),
        sample(mixed, x0, lab, scheduler, steps=3),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="null_label"):
        sample(model, x0, lab, scheduler, steps=3, guidance_scale=s)


def test_zero_terminal_snr_v_prediction(unet, x0):
    scheduler = make_scheduler("v_prediction", zero_terminal_snr=True, timestep_spacing="trailing")
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    model = denoiser(unet, scheduler)
    err = {}
    for method, iters in (("ddim", 0), ("fixed-point", 5)):
        xT = invert(model, x0, LABELS, scheduler, steps=10, method=method, iters=iters)
        assert torch.isfinite(xT).all()
        rec = sample(model, xT, LABELS, scheduler, steps=10)
        assert torch.isfinite(rec).all()
        err[method] = mse(rec, x0)
    assert err["fixed-point"] < 2e-5 and err["fixed-point"] * 10 <= err["ddim"], err


def test_invalid_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="trailing"):
        make_scheduler("v_prediction", zero_terminal_snr=True, timestep_spacing="leading")
    with pytest.raises(ValueError, match="v_prediction"):
        make_scheduler("epsilon", zero_terminal_snr=True, timestep_spacing="trailing")
    # an ε-model scheduler with zero terminal SNR built by hand is refused where it would give NaN
    from diffusers import DDIMScheduler

    bad = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    x, lab = torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long)
    zero = lambda x_, t, labels: torch.zeros_like(x_)  # noqa: E731
    with pytest.raises(ValueError, match="v_prediction"):
        sample(zero, x, lab, bad, steps=5)
    with pytest.raises(ValueError, match="v_prediction"):
        invert(zero, x, lab, bad, steps=5)
    with pytest.raises(ValueError, match="method"):
        invert(zero, x, lab, make_scheduler(), steps=5, method="renoise")


def test_to_epsilon():
    x, o = torch.randn(4), torch.randn(4)
    assert torch.equal(to_epsilon(o, x, 0.3, "epsilon"), o)
    torch.testing.assert_close(to_epsilon(o, x, 0.0, "v_prediction"), x)  # pure noise is the noise
    a = 0.3
    torch.testing.assert_close(to_epsilon(o, x, a, "v_prediction"), math.sqrt(a) * o + math.sqrt(1 - a) * x)
    torch.testing.assert_close(to_epsilon(o, x, a, "sample"), (x - math.sqrt(a) * o) / math.sqrt(1 - a))
    with pytest.raises(ValueError):
        to_epsilon(o, x, 1.0, "sample")



def test_fixed_point_iteration_is_safeguarded_per_image():
    """Where the update map expands (the network is too steep for the iteration) an image keeps its
    best guess instead of running away; where it contracts, the last iterate is returned."""
    from phenolens.diffusion.ddim import _fixed_point

    x = torch.tensor([0.5, 0.5]).view(2, 1)
    slope = torch.tensor([0.5, -2.0]).view(2, 1)  # image 0 contracts to 2/3, image 1 expands from 1/3
    out = _fixed_point(lambda g: slope * g + torch.tensor([1 / 3, 1.0]).view(2, 1), x, iters=6)
    assert abs(out[0].item() - 2 / 3) < 0.01            # converged towards its fixed point
    assert abs(out[1].item() - 1 / 3) <= abs(0.5 - 1 / 3)  # no worse than the starting guess
