"""DDIM sampling and inversion (phenolens.diffusion.ddim, .solvers): exactness, trajectories, batching,
zero SNR, the per-image fixed-point solver (safeguard, tolerance, Anderson), warm start, T_skip.

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

from phenolens.diffusion.conditions import network_fn
from phenolens.diffusion.ddim import (
    INVERSION_METHODS,
    invert,
    inversion_schedule,
    make_scheduler,
    render,
    sample,
    to_epsilon,
)
from phenolens.diffusion.solvers import SOLVERS, solve

from conftest import small_class_unet

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA2 = 0.25  # variance of the Gaussian "data" the analytic denoiser is optimal for




@pytest.fixture(scope="module")
def unet():
    return small_class_unet(attention=True)


@pytest.fixture(scope="module")
def x0():
    g = torch.Generator().manual_seed(1)
    return (0.6 * torch.randn(3, 2, 16, 16, generator=g)).clamp(-1, 1)


LABELS = torch.tensor([0, 2, 1])


def labels(*values: int) -> dict:
    """The condition of a class-conditional UNet2DModel for these labels."""
    return {"class_labels": torch.tensor(values)}


COND = {"class_labels": LABELS}


def denoiser(unet, scheduler, strength: float = 0.1):
    """ModelFn: Gaussian-optimal ε / v (per prediction type) + strength · UNet(x, t, label)."""
    f = network_fn(unet)
    abar = scheduler.alphas_cumprod
    pt = scheduler.config.prediction_type

    def fn(x, t, condition):
        a = abar[t].view(-1, 1, 1, 1).to(x.dtype)
        d = a * SIGMA2 + 1 - a
        eps = (1 - a).sqrt() * x / d  # E[ε | x_t]
        x0 = a.sqrt() * SIGMA2 * x / d  # E[x_0 | x_t]
        opt = eps if pt == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return opt + strength * f(x, t, condition)

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
        xT = invert(model, x0, COND, scheduler, steps=steps, method=method, iters=iters).x
        assert torch.isfinite(xT).all()
        err[method] = mse(sample(model, xT, COND, scheduler, steps=steps), x0)
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
                def fn(x, t, condition):
                    assert (t == t[0]).all() and t.shape == (x.shape[0],)
                    seen[key].append(int(t[0]))
                    return torch.zeros_like(x)

                return fn

            x = torch.zeros(2, 1, 4, 4)
            lab = {"class_labels": torch.zeros(2, dtype=torch.long)}
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
    ours = invert(model, x0, COND, scheduler, steps=8, method="ddim").x
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(8)
    x = x0
    with torch.no_grad():
        for t in inverse.timesteps:
            out = model(x, torch.full((x.shape[0],), int(t)), COND)
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
    lab = labels(0, 1)

    def model(x_, t, condition):  # the raw output whose ε is `const`
        if prediction_type == "epsilon":
            return const
        a = abar[t].view(-1, 1, 1, 1)
        return (const - (1 - a).sqrt() * x_) / a.sqrt()  # v with √ᾱ v + √(1-ᾱ) x = const

    for steps in (1, 4, 10):
        xT = invert(model, x, lab, scheduler, steps=steps, method=method, iters=3).x
        torch.testing.assert_close(sample(model, xT, lab, scheduler, steps=steps), x, atol=1e-9, rtol=1e-9)
    # one step, checked against the closed form of the ε-model inverse
    if prediction_type == "epsilon":
        (t, a_t, a_s), *_ = inversion_schedule(scheduler, 1)
        xT = invert(model, x, lab, scheduler, steps=1, method=method).x
        closed = math.sqrt(a_t) * (x - math.sqrt(1 - a_s) * const) / math.sqrt(a_s) + math.sqrt(1 - a_t) * const
        torch.testing.assert_close(xT, closed)


def test_batch_with_mixed_labels_matches_single_images(unet, x0):
    scheduler = make_scheduler("v_prediction", timestep_spacing="trailing")
    model = denoiser(unet, scheduler, strength=0.3)
    xT = invert(model, x0, COND, scheduler, steps=5, method="fixed-point", iters=2).x
    target = torch.tensor([1, 0, 2])
    null = labels(3, 3, 3)
    out = sample(model, xT, {"class_labels": target}, scheduler, steps=5, guidance_scale=2.0, null_condition=null)
    for i in range(len(x0)):
        xi = invert(model, x0[i : i + 1], {"class_labels": LABELS[i : i + 1]}, scheduler, steps=5,
                    method="fixed-point", iters=2).x
        torch.testing.assert_close(xi, xT[i : i + 1], atol=1e-5, rtol=1e-5)
        oi = sample(model, xi, {"class_labels": target[i : i + 1]}, scheduler, steps=5, guidance_scale=2.0,
                    null_condition=labels(3))
        torch.testing.assert_close(oi, out[i : i + 1], atol=1e-5, rtol=1e-5)
    # the label matters (otherwise the test above proves nothing)
    assert mse(sample(model, xT, COND, scheduler, steps=5), out) > 1e-6


def test_classifier_free_guidance_formula(unet, x0):
    scheduler = make_scheduler("epsilon")
    model = denoiser(unet, scheduler, strength=0.3)
    lab, null = labels(0, 1, 2), labels(3, 3, 3)
    s = 3.0
    mixed = lambda x, t, c: model(x, t, null) + s * (model(x, t, c) - model(x, t, null))  # noqa: E731
    torch.testing.assert_close(
        sample(model, x0, lab, scheduler, steps=3, guidance_scale=s, null_condition=null),
        sample(mixed, x0, lab, scheduler, steps=3),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="null_condition"):
        sample(model, x0, lab, scheduler, steps=3, guidance_scale=s)


def test_zero_terminal_snr_v_prediction(unet, x0):
    scheduler = make_scheduler("v_prediction", zero_terminal_snr=True, timestep_spacing="trailing")
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    model = denoiser(unet, scheduler)
    err = {}
    for method, iters in (("ddim", 0), ("fixed-point", 5)):
        xT = invert(model, x0, COND, scheduler, steps=10, method=method, iters=iters).x
        assert torch.isfinite(xT).all()
        rec = sample(model, xT, COND, scheduler, steps=10)
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
    x, lab = torch.zeros(1, 1, 4, 4), labels(0)
    zero = lambda x_, t, c: torch.zeros_like(x_)  # noqa: E731
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


# --------------------------------------------------------------------------------------------------
# The per-image fixed-point solver (phenolens.diffusion.solvers)
# --------------------------------------------------------------------------------------------------


def _affine(slope: torch.Tensor, offset: torch.Tensor, seen: list | None = None):
    """The solver's update for x -> slope·x + offset per image (rows `index` of the batch)."""

    def update(g, index):
        if seen is not None:
            seen.append(index.tolist())
        return slope[index] * g + offset[index]

    return update


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_is_safeguarded_per_image(solver):
    """Where the update map expands (the network is too steep for the iteration) an image keeps its
    best guess instead of running away; where it contracts, it converges to its fixed point.

    (Anderson solves a scalar affine map exactly after two calls, so image 1 converges there; Picard
    must fall back on its first guess. Returning F(best iterate) unconditionally, one unverified Picard
    step past the best guess, moves image 1 twice as far from 1/3 as its first guess.)"""
    x = torch.tensor([0.5, 0.5], dtype=torch.float64).view(2, 1)
    # image 0 contracts to 2/3, image 1 expands from 1/3
    slope = torch.tensor([0.5, -2.0], dtype=torch.float64).view(2, 1)
    offset = torch.tensor([1 / 3, 1.0], dtype=torch.float64).view(2, 1)
    update = _affine(slope, offset)
    out, calls = solve(update, x, iters=6, solver=solver)
    assert calls.tolist() == [6, 6]
    assert abs(out[0].item() - 2 / 3) < 0.01            # converged towards its fixed point
    assert abs(out[1].item() - 1 / 3) <= abs(0.5 - 1 / 3)  # no worse than the starting guess
    # the same, measured as the solver measures it: the residual of what it returns is no larger
    # than the starting guess's
    residual = lambda g: (update(g, torch.arange(2)) - g).abs().view(-1)  # noqa: E731
    assert residual(out)[1] <= residual(x)[1]


def test_solver_stops_each_image_at_its_tolerance():
    # image 0 starts at its fixed point, image 1 one unit away from its own, contracting by 1/2 per call:
    # its residual after k calls is 0.5^k, first below 1e-3 at the 10th call
    slope = torch.tensor([0.5, 0.5], dtype=torch.float64).view(2, 1)
    offset = torch.tensor([1.0, 1.0], dtype=torch.float64).view(2, 1)  # fixed point 2
    x = torch.tensor([2.0, 3.0], dtype=torch.float64).view(2, 1)
    seen: list = []
    out, calls = solve(_affine(slope, offset, seen), x, iters=20, tol=1e-3)
    assert calls.tolist() == [1, 10]
    assert seen[0] == [0, 1] and all(rows == [1] for rows in seen[1:])  # image 0 no longer evaluated
    assert abs(out[1].item() - 2.0) < 1e-3 and out[0].item() == 2.0
    # tol = 0: every image gets every call
    _, calls = solve(_affine(slope, offset), x, iters=20)
    assert calls.tolist() == [20, 20]
    _, calls = solve(_affine(slope, offset), x, iters=0, tol=1e-3)
    assert calls.tolist() == [0, 0]
    with pytest.raises(ValueError, match="solver"):
        solve(_affine(slope, offset), x, iters=2, solver="newton")


def test_anderson_beats_picard_on_a_slow_linear_contraction():
    """x -> A x + b, A symmetric with eigenvalues spread over [0, 0.9] (spectral radius 0.9): Picard's
    residual falls by at most 0.9 per call; Anderson mixing gets there in far fewer calls."""
    g = torch.Generator().manual_seed(0)
    n = 16
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(0.0, 0.9, n, dtype=torch.float64)) @ q.T
    b = torch.randn(2, n, generator=g, dtype=torch.float64)
    update = lambda x, index: (x.view(len(index), n) @ A.T + b[index]).view(len(index), 1, 4, 4)  # noqa: E731
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A, b.T).T.reshape(2, 1, 4, 4)
    residual = lambda y: (update(y, torch.arange(2)) - y).flatten(1).pow(2).mean(1).sqrt()  # noqa: E731

    res, calls = {}, {}
    for solver in SOLVERS:
        out, _ = solve(update, x, iters=20, solver=solver)
        res[solver] = residual(out)
        sol, calls[solver] = solve(update, x, iters=400, tol=1e-8, solver=solver)
        assert (residual(sol) < 1e-8).all() and torch.allclose(sol, exact, atol=1e-6)
    assert (res["anderson"] * 10 < res["picard"]).all(), res
    assert (calls["anderson"] * 2 < calls["picard"]).all(), calls


def _smooth_model(scheduler, strength: float = 0.1):
    """ModelFn: the Gaussian-optimal output plus a smooth, x-dependent, label-dependent perturbation."""
    abar = scheduler.alphas_cumprod
    pt = scheduler.config.prediction_type

    def fn(x, t, condition):
        a = abar[t].view(-1, 1, 1, 1).to(x.dtype)
        d = a * SIGMA2 + 1 - a
        eps = (1 - a).sqrt() * x / d
        x0 = a.sqrt() * SIGMA2 * x / d
        opt = eps if pt == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        shift = condition["class_labels"].to(x.dtype).view(-1, 1, 1, 1)
        return opt + strength * torch.tanh(x + 0.3 * shift)

    return fn


@pytest.mark.parametrize("solver", SOLVERS)
def test_warm_start_and_tolerance_save_network_calls(x0, solver):
    scheduler = make_scheduler("v_prediction", timestep_spacing="trailing")
    model = _smooth_model(scheduler)
    steps, iters = 20, 5
    fixed = invert(model, x0, COND, scheduler, steps=steps, iters=iters, tol=0.0, solver=solver)
    adaptive = invert(model, x0, COND, scheduler, steps=steps, iters=iters, tol=1e-5, solver=solver,
                      warm_start=True)
    warm = invert(model, x0, COND, scheduler, steps=steps, iters=iters, tol=0.0, solver=solver, warm_start=True)
    assert fixed.forwards.tolist() == [steps * (1 + iters)] * len(x0)  # one plain step + iters per step
    assert warm.forwards.tolist() == [1 + steps * iters] * len(x0)  # the plain step only before the first
    assert (adaptive.forwards * 4 <= fixed.forwards * 3).all(), adaptive.forwards
    err = {name: mse(sample(model, code.x, COND, scheduler, steps=steps), x0)
           for name, code in (("fixed", fixed), ("adaptive", adaptive))}
    plain = mse(sample(model, invert(model, x0, COND, scheduler, steps=steps, method="ddim").x, COND, scheduler,
                       steps=steps), x0)
    assert err["adaptive"] < 1e-8 and err["fixed"] < 1e-8 and err["adaptive"] * 1e5 < plain, (err, plain)


# --------------------------------------------------------------------------------------------------
# Codes that start later in the schedule (T_skip)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("method", INVERSION_METHODS)
@pytest.mark.parametrize("skip", [0, 20])
def test_deterministic_code_with_skip_starts_at_its_step(prediction_type, method, skip):
    # ε independent of x: the DDIM trajectory is x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε at every step, so both the
    # code (at step `skip`) and its rendering are known in closed form
    scheduler = make_scheduler(prediction_type, timestep_spacing="trailing")
    abar = scheduler.alphas_cumprod.double()
    g = torch.Generator().manual_seed(4)
    const = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    x = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64) * 0.5
    calls: list[int] = []

    def model(x_, t, condition):
        calls.append(int(t[0]))
        if prediction_type == "epsilon":
            return const
        a = abar[t].view(-1, 1, 1, 1)
        return (const - (1 - a).sqrt() * x_) / a.sqrt()

    steps = 50
    code = invert(model, x, labels(0, 1), scheduler, steps=steps, method=method, iters=2, skip=skip)
    assert (code.start, code.steps, code.noise) == (skip, steps, None)
    t_start = [t for t, _, _ in inversion_schedule(scheduler, steps)][::-1][skip]
    a = float(abar[t_start])
    torch.testing.assert_close(code.x, math.sqrt(a) * x + math.sqrt(1 - a) * const, atol=1e-9, rtol=1e-9)
    per_step = 1 if method == "ddim" else 3
    assert code.forwards.tolist() == [(steps - skip) * per_step] * 2
    calls.clear()
    rec = render(model, code, labels(0, 1), scheduler)
    assert len(calls) == steps - skip and calls[0] == t_start
    torch.testing.assert_close(rec, x, atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="skip"):
        invert(model, x, labels(0, 1), scheduler, steps=steps, skip=steps)
