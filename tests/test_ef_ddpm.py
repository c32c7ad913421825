"""Edit-friendly DDPM inversion and rendering with noise maps (phenolens.diffusion.ef_ddpm, ddim.render),
and the condition dicts every sampler batches (phenolens.diffusion.conditions).

Exactness of EF-DDPM holds by construction (eq. 5 solves eq. 2 for the map), whatever the network, so a
tiny class-conditional UNet2DModel with random weights is enough here; what is tested is that the maps,
the start step and `DDIMScheduler.step(eta=1, variance_noise=z)` fit together.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import DDIMScheduler

from phenolens.diffusion.code import Code
from phenolens.diffusion.conditions import cat, network_fn, take, to_device
from phenolens.diffusion.ddim import ddpm_sigma, make_scheduler, render, sample
from phenolens.diffusion.ef_ddpm import invert_ef_ddpm
from phenolens.diffusion.inversion import InversionSettings, invert_image

from conftest import small_class_unet

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 50




@pytest.fixture(scope="module")
def unet():
    return small_class_unet(attention=False)


@pytest.fixture(scope="module")
def unet64(unet):
    return copy.deepcopy(unet).double()


@pytest.fixture(scope="module")
def x0():
    g = torch.Generator().manual_seed(1)
    return (0.6 * torch.randn(3, 2, 16, 16, generator=g)).clamp(-1, 1)


def labels(*values: int) -> dict:
    return {"class_labels": torch.tensor(values)}


COND = labels(0, 2, 1)
NULL = labels(3, 3, 3)


def counting(fn, seen: list):
    """FN, recording (batch size, t, condition) of every call."""

    def wrapped(x, t, condition):
        seen.append((x.shape[0], int(t[0]), condition))
        return fn(x, t, condition)

    return wrapped


def same_code(a: Code, b: Code, atol: float = 0.0) -> bool:
    close = lambda u, v: torch.allclose(u, v, atol=atol, rtol=0.0)  # noqa: E731
    return close(a.x, b.x) and len(a.noise) == len(b.noise) and all(close(u, v) for u, v in zip(a.noise, b.noise))


# --------------------------------------------------------------------------------------------------
# Exact reconstruction (DIFFusion eq. 5 and 8)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type, dtype, tol, skip", [
    *[(pt, torch.float64, 1e-10, skip) for pt in ("epsilon", "v_prediction") for skip in (0, 10, 25, 40)],
    # float32: exact to rounding. Not for a *random* ε-network from skip < 25: there its ε, far from the
    # ≈ √(1-ᾱ) x of a trained one at high noise, amplifies the rounding of each step's x by the 1/√ᾱ_t of
    # x̂_0, to ~3e-4 at skip 0 (float64 shows the same amplification at ~6e-13: no error in the method)
    *[("v_prediction", torch.float32, 1e-5, skip) for skip in (0, 25)],
    ("epsilon", torch.float32, 1e-5, 40),
])
def test_ef_ddpm_reconstruction_is_exact(unet, unet64, x0, prediction_type, dtype, tol, skip):
    scheduler = make_scheduler(prediction_type)
    seen: list = []
    model = counting(network_fn(unet64 if dtype == torch.float64 else unet), seen)
    x0 = x0.to(dtype)
    code = invert_ef_ddpm(model, x0, COND, scheduler, steps=STEPS, skip=skip,
                          generator=torch.Generator().manual_seed(5))
    assert code.x.dtype == dtype and all(z.dtype == dtype for z in code.noise)
    assert (code.start, code.steps, code.stochastic) == (skip, STEPS, True)
    assert len(code.noise) == STEPS - skip and code.forwards.tolist() == [STEPS - skip] * 3
    assert len(seen) == STEPS - skip
    seen.clear()
    rec = render(model, code, COND, scheduler)
    assert len(seen) == STEPS - skip  # rendering starts at step `skip`
    assert float((rec - x0).abs().max()) < tol
    if skip == 0 and dtype == torch.float64:
        # the code is not a trivial replay: another condition renders another image
        other = render(model, code, labels(1, 0, 2), scheduler)
        assert float((other - x0).abs().max()) > 1e-3


def test_ef_ddpm_exact_with_zero_terminal_snr_and_through_invert_image(unet, x0):
    scheduler = make_scheduler("v_prediction", zero_terminal_snr=True, timestep_spacing="trailing")
    model = network_fn(unet)
    settings = InversionSettings(method="ef-ddpm", steps=20, skip=0)
    code = invert_image(model, x0, COND, scheduler, settings, generator=torch.Generator().manual_seed(0))
    assert code.stochastic and code.start == 0 and len(code.noise) == 20
    assert float((render(model, code, COND, scheduler) - x0).abs().max()) < 1e-5
    # the deterministic methods return codes without maps, at the settings' start step
    det = invert_image(model, x0, COND, scheduler, InversionSettings(method="ddim", steps=20, skip=5))
    assert not det.stochastic and det.start == 5 and det.forwards.tolist() == [15] * 3


# --------------------------------------------------------------------------------------------------
# Randomness: generators
# --------------------------------------------------------------------------------------------------


def test_generators_make_codes_reproducible_and_batch_independent(unet, x0):
    scheduler = make_scheduler("epsilon")
    model = network_fn(unet)
    steps = 10

    def code(gen, images=x0, cond=COND):
        return invert_ef_ddpm(model, images, cond, scheduler, steps=steps, skip=2, generator=gen)

    a = code(torch.Generator().manual_seed(7))
    assert same_code(a, code(torch.Generator().manual_seed(7)))
    b = code(torch.Generator().manual_seed(8))
    assert not torch.allclose(a.x, b.x, atol=1e-3) and not torch.allclose(a.noise[0], b.noise[0], atol=1e-3)

    # one generator per image: an image's code does not depend on the batch it is inverted in
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    full = code(gens([10, 11, 12]))
    order = [2, 0]
    part = code(gens([12, 10]), x0[order], take(COND, order))
    assert torch.equal(part.x, full.take(order).x)  # the noisy images do not involve the network
    assert same_code(part, full.take(order), atol=1e-4)
    single = code(gens([11]), x0[1:2], take(COND, [1]))
    assert same_code(single, full.take([1]), atol=1e-4)
    # distinct generators per image do give distinct noise
    assert not torch.allclose(full.noise[0][0], full.noise[0][1], atol=1e-3)
    with pytest.raises(ValueError, match="one generator per image"):
        code(gens([1, 2]))


# --------------------------------------------------------------------------------------------------
# render with noise maps = the DDPM posterior step (σ from ddpm_sigma)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_render_with_noise_maps_is_the_ddpm_posterior_step(prediction_type):
    scheduler = make_scheduler(prediction_type)
    steps = 10
    abar = scheduler.alphas_cumprod.double()
    grid = DDIMScheduler.from_config(scheduler.config)
    grid.set_timesteps(steps)
    t1, t2 = (int(t) for t in grid.timesteps[-2:])  # the last two sampling steps: σ > 0, then σ = 0
    assert t2 == t1 - 1000 // steps == 0
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    z1, z2 = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))

    def model(x_, t, condition):  # any smooth, label-dependent raw output
        return 0.5 * torch.sin(3 * x_) + 0.1 * condition["class_labels"].to(x_.dtype).view(-1, 1, 1, 1)

    def x0_hat(x_, t, cond):
        a, o = float(abar[t]), model(x_, None, cond)
        if prediction_type == "epsilon":
            return (x_ - math.sqrt(1 - a) * o) / math.sqrt(a)
        return math.sqrt(a) * x_ - math.sqrt(1 - a) * o

    cond = labels(0, 1)
    out = render(model, Code(x=x, steps=steps, start=steps - 2, noise=[z1, z2]), cond, scheduler)

    # step t1 -> s = t2: DDPM's posterior q(x_s | x_t, x̂_0) on the strided schedule
    a_t, a_s = float(abar[t1]), float(abar[t2])
    sigma = math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    assert sigma > 0 and sigma == pytest.approx(ddpm_sigma(a_t, a_s), rel=1e-12)
    mean = (math.sqrt(a_s) * (1 - a_t / a_s) / (1 - a_t)) * x0_hat(x, t1, cond) \
        + (math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t)) * x
    x1 = mean + sigma * z1
    # step t2 -> ᾱ = 1: σ = 0, the mean is x̂_0 and the map is added as a residual
    assert ddpm_sigma(float(abar[t2]), 1.0) == 0.0
    expected = x0_hat(x1, t2, cond) + z2
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    # and the maps matter: other maps, another image
    other = render(model, Code(x=x, steps=steps, start=steps - 2, noise=[z2, z1]), cond, scheduler)
    assert float((other - out).abs().max()) > 1e-3


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance in render
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stochastic", [False, True])
def test_render_guidance_uses_null_condition(unet, x0, stochastic):
    scheduler = make_scheduler("v_prediction", timestep_spacing="trailing")
    base = network_fn(unet)
    steps = 5
    if stochastic:
        code = invert_ef_ddpm(base, x0, COND, scheduler, steps=steps, skip=1,
                              generator=torch.Generator().manual_seed(3))
    else:
        code = Code(x=x0, steps=steps, start=1)
    target = labels(1, 0, 2)
    seen: list = []
    model = counting(base, seen)

    # guidance 1 is unguided: the null condition is not even evaluated
    plain = render(model, code, target, scheduler)
    assert [n for n, _, _ in seen] == [3] * (steps - 1)
    seen.clear()
    torch.testing.assert_close(render(model, code, target, scheduler, guidance_scale=1.0, null_condition=NULL), plain,
                               atol=0.0, rtol=0.0)
    assert [n for n, _, _ in seen] == [3] * (steps - 1)

    # s != 1: o_u + s (o_c - o_u), o_u under the null condition, in one batch of [conditional, null]
    s = 2.5
    seen.clear()
    guided = render(model, code, target, scheduler, guidance_scale=s, null_condition=NULL)
    assert [n for n, _, _ in seen] == [6] * (steps - 1)
    assert all(torch.equal(c["class_labels"], torch.tensor([1, 0, 2, 3, 3, 3])) for _, _, c in seen)
    mixed = lambda x, t, c: base(x, t, NULL) + s * (base(x, t, c) - base(x, t, NULL))  # noqa: E731
    torch.testing.assert_close(guided, render(mixed, code, target, scheduler), atol=1e-5, rtol=1e-5)
    assert float((guided - plain).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="null_condition"):
        render(model, code, target, scheduler, guidance_scale=s)
    if not stochastic:  # sample is render of a full deterministic code
        torch.testing.assert_close(sample(base, x0, target, scheduler, steps=steps, guidance_scale=s,
                                          null_condition=NULL),
                                   render(mixed, Code(x=x0, steps=steps), target, scheduler), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Conditions and codes
# --------------------------------------------------------------------------------------------------


def test_conditions_take_and_cat_nested_dicts():
    hidden = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    embeds = torch.arange(3 * 5, dtype=torch.float32).view(3, 5)
    scale = torch.tensor(0.5)  # 0-dim: not per image
    cond = {"encoder_hidden_states": hidden, "added_cond_kwargs": {"image_embeds": embeds, "note": "keep"},
            "cross_attention_kwargs": None, "guidance": scale}

    part = take(cond, [2, 0])
    assert torch.equal(part["encoder_hidden_states"], hidden[[2, 0]])
    assert torch.equal(part["added_cond_kwargs"]["image_embeds"], embeds[[2, 0]])
    assert part["added_cond_kwargs"]["note"] == "keep" and part["cross_attention_kwargs"] is None
    assert part["guidance"] is scale
    assert torch.equal(take(cond, torch.tensor([1]))["added_cond_kwargs"]["image_embeds"], embeds[1:2])

    both = cat([cond, part])
    assert torch.equal(both["encoder_hidden_states"], torch.cat([hidden, hidden[[2, 0]]]))
    assert torch.equal(both["added_cond_kwargs"]["image_embeds"], torch.cat([embeds, embeds[[2, 0]]]))
    assert both["added_cond_kwargs"]["note"] == "keep" and both["cross_attention_kwargs"] is None
    assert both["guidance"] is scale
    assert cond["encoder_hidden_states"] is hidden  # inputs untouched

    moved = to_device(cond, "cpu")
    assert torch.equal(moved["added_cond_kwargs"]["image_embeds"], embeds)
    assert moved["added_cond_kwargs"]["note"] == "keep"


def test_network_fn_reads_diffusers_outputs(unet):
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([10, 10])
    out = network_fn(unet)(x, t, labels(0, 1))
    torch.testing.assert_close(out, unet(x, t, class_labels=torch.tensor([0, 1])).sample)
    assert not torch.allclose(out, network_fn(unet)(x, t, labels(1, 0)))  # the condition reaches the network
    seen: dict = {}

    def as_tuple(x_, t_, **kw):
        seen.update(kw)
        return (x_ + 1, "ignored")

    torch.testing.assert_close(network_fn(as_tuple)(x, t, {"encoder_hidden_states": x}), x + 1)
    assert set(seen) == {"encoder_hidden_states"}
    torch.testing.assert_close(network_fn(lambda x_, t_: 2 * x_)(x, t, {}), 2 * x)


def test_code_take_and_checks():
    x = torch.arange(3.0).view(3, 1)
    maps = [x + 10, x + 20]
    code = Code(x=x, steps=5, start=3, noise=maps, forwards=torch.tensor([2, 2, 2]))
    part = code.take([2, 0])
    assert torch.equal(part.x, x[[2, 0]]) and torch.equal(part.noise[1], maps[1][[2, 0]])
    assert (part.steps, part.start, len(part)) == (5, 3, 2) and part.forwards.tolist() == [2, 2]
    assert Code(x=x, steps=5).forwards.tolist() == [0, 0, 0] and not Code(x=x, steps=5).stochastic
    with pytest.raises(ValueError, match="needs 2 noise maps"):
        Code(x=x, steps=5, start=3, noise=maps[:1])
    with pytest.raises(ValueError, match="skip"):
        invert_ef_ddpm(lambda *a: x, x.view(3, 1, 1, 1), {}, make_scheduler(), steps=5, skip=5)
