"""Deterministic DDIM sampling and inversion on top of diffusers' `DDIMScheduler` (PhenDiff §2.2–2.3).

PhenDiff inverts a real image x_0 under its own condition y to a code x_T (eq. 6) and regenerates it
under another condition (eq. 5). Eq. 6 evaluates ε at the *old* point x_s, so it only inverts eq. 5
"in the limit of small steps"; at 25–100 steps the reconstruction error is the floor under which no
phenotypic change can be believed. `invert(method="fixed-point")` solves every inversion step
implicitly so that it is the exact inverse of the sampling step (fixed-point inversion as in AIDI,
Pan et al. 2023, and ReNoise, Garibi et al. 2024), up to the convergence of a few iterations.

Notation: ᾱ_t = `scheduler.alphas_cumprod[t]` (PhenDiff's α_t). One sampling step goes from t (more
noise) to s = t - T_train // steps (less noise; ᾱ_s = `final_alpha_cumprod` below 0), exactly as
`DDIMScheduler.step` does. With η = 0 (DDIM eq. 12, PhenDiff eq. 5):

    x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t          x_s = √ᾱ_s x̂_0 + √(1-ᾱ_s) ε          ε = ε_θ(x_t, t, y)

For every prediction type the step is affine in (x_t, model output o):  x_s = A x_t + B o  (see
`_step_coefficients`); inverting it is solving x_t = (x_s - B o(x_t)) / A for x_t.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from phenolens.diffusion.code import Code
from phenolens.diffusion.conditions import Condition, ModelFn, cat, take
from phenolens.diffusion.solvers import solve

INVERSION_METHODS = ("ddim", "fixed-point")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing")


def make_scheduler(
    prediction_type: str = "epsilon",
    beta_schedule: str = "linear",
    zero_terminal_snr: bool = False,
    timestep_spacing: str = "leading",
    num_train_timesteps: int = 1000,
) -> DDIMScheduler:
    """The DDIM scheduler every phenolens pixel model is trained and sampled with.

    Choices that keep sampling invertible and deterministic:
    - `clip_sample=False`, `thresholding=False`: clipping x̂_0 is not invertible.
    - `set_alpha_to_one=True`: the last sampling step lands on the clean image (ᾱ = 1), so the first
      inversion step starts from x_0 itself.
    - `steps_offset=0`: the DDIM paper's grid (…, 2r, r, 0) for "leading"; any offset would be exact too.
    - zero terminal SNR (Lin et al. 2024, "Common diffusion noise schedules are flawed") rescales the
      betas so that ᾱ_{T-1} = 0: sampling then really starts from pure noise. It needs "trailing"
      spacing (otherwise the first timestep never reaches T-1) and a v- (or x_0-) model, since an
      ε-model cannot give x̂_0 = (x_T - ε)/√ᾱ_T at ᾱ_T = 0.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing {timestep_spacing!r} must be one of {', '.join(TIMESTEP_SPACINGS)}")
    if zero_terminal_snr:
        if timestep_spacing != "trailing":
            raise ValueError("zero_terminal_snr needs timestep_spacing='trailing' (Lin et al. 2024, §3.3)")
        if prediction_type == "epsilon":
            raise ValueError(
                "zero_terminal_snr needs prediction_type='v_prediction': at ᾱ_T = 0 an ε-model cannot predict x_0"
            )
    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
        thresholding=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing=timestep_spacing,
        rescale_betas_zero_snr=zero_terminal_snr,
    )


# --------------------------------------------------------------------------------------------------
# Parameterisations
# --------------------------------------------------------------------------------------------------


def _decompose(alpha_bar: float, prediction_type: str) -> tuple[float, float, float, float]:
    """(a, b, c, d) with x̂_0 = a·x_t + b·o and ε̂ = c·x_t + d·o for a model output o at ᾱ_t.

    epsilon:      ε̂ = o,                   x̂_0 = (x_t - √(1-ᾱ) o) / √ᾱ
    v_prediction: ε̂ = √ᾱ o + √(1-ᾱ) x_t,   x̂_0 = √ᾱ x_t - √(1-ᾱ) o     (Salimans & Ho 2022, v = √ᾱ ε - √(1-ᾱ) x_0)
    sample:       x̂_0 = o,                 ε̂ = (x_t - √ᾱ o) / √(1-ᾱ)
    Undefined entries (ε-model at ᾱ = 0, x_0-model at ᾱ = 1) are NaN; callers check before use.
    """
    sa, sb = math.sqrt(alpha_bar), math.sqrt(max(1.0 - alpha_bar, 0.0))
    if prediction_type == "epsilon":
        return (1 / sa if sa > 0 else math.nan), (-sb / sa if sa > 0 else math.nan), 0.0, 1.0
    if prediction_type == "v_prediction":
        return sa, -sb, sb, sa
    if prediction_type == "sample":
        return 0.0, 1.0, (1 / sb if sb > 0 else math.nan), (-sa / sb if sb > 0 else math.nan)
    raise ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")


def to_epsilon(output: Tensor, x_t: Tensor, alpha_bar_t: float, prediction_type: str) -> Tensor:
    """The noise estimate ε̂ implied by a raw model output at x_t (see `_decompose`).

    For a v-model at ᾱ_t = 0, ε̂ = x_t whatever the network says: pure noise *is* the noise.
    """
    _, _, c, d = _decompose(float(alpha_bar_t), prediction_type)
    if math.isnan(c) or math.isnan(d):
        raise ValueError(f"ε is undefined for a {prediction_type!r} model at ᾱ = {float(alpha_bar_t)}")
    return c * x_t + d * output


def to_x0(output: Tensor, x_t: Tensor, alpha_bar_t: float, prediction_type: str) -> Tensor:
    """The clean-image estimate x̂_0 implied by a raw model output at x_t (DDIM eq. 12's "predicted x_0")."""
    a, b, _, _ = _decompose(float(alpha_bar_t), prediction_type)
    if math.isnan(a) or math.isnan(b):
        raise ValueError(f"x_0 is undefined for a {prediction_type!r} model at ᾱ = {float(alpha_bar_t)}")
    return a * x_t + b * output


def _step_coefficients(alpha_bar_t: float, alpha_bar_s: float, prediction_type: str) -> tuple[float, float]:
    """(A, B) such that one η=0 DDIM step from t to s is x_s = A·x_t + B·o(x_t).

    x_s = √ᾱ_s x̂_0 + √(1-ᾱ_s) ε̂ with the affine x̂_0, ε̂ of `_decompose`. For an ε-model this is
    A = √(ᾱ_s/ᾱ_t), B = √(1-ᾱ_s) - √(ᾱ_s/ᾱ_t)·√(1-ᾱ_t) (PhenDiff eq. 5: B = √ᾱ_s·γ_t up to sign);
    for a v-model, with ᾱ = cos²φ, A = cos(φ_t - φ_s) and B = -sin(φ_t - φ_s): finite even at ᾱ_t = 0.
    """
    a, b, c, d = _decompose(alpha_bar_t, prediction_type)
    ss, sn = math.sqrt(alpha_bar_s), math.sqrt(max(1.0 - alpha_bar_s, 0.0))
    return ss * a + sn * c, ss * b + sn * d


# --------------------------------------------------------------------------------------------------
# Timesteps
# --------------------------------------------------------------------------------------------------


def _working_scheduler(scheduler, steps: int) -> DDIMScheduler:
    """A private DDIMScheduler with the caller's noise schedule, its timesteps set for `steps`.

    A copy, so that the caller's scheduler is never mutated (it may be shared between threads or
    methods). x̂_0 clipping/thresholding is switched off: it would make the sampler non-invertible.
    """
    work = DDIMScheduler.from_config(scheduler.config, clip_sample=False, thresholding=False)
    # ᾱ in float64 (same values as trained with): step()'s √ᾱ coefficients are then computed in double,
    # like the inverse's, instead of in float32 where the 1/√ᾱ_T ≈ 150 of the top step turns their
    # rounding into ~1e-5 errors. Images stay in their own dtype (0-dim tensors do not promote).
    work.alphas_cumprod = work.alphas_cumprod.double()
    work.final_alpha_cumprod = work.final_alpha_cumprod.double()
    work.set_timesteps(steps)
    return work


def _previous_timestep(work: DDIMScheduler, t: int) -> int:
    # exactly DDIMScheduler.step's choice (diffusers 0.42, step 1): s = t - T_train // steps; s < 0 means
    # "final_alpha_cumprod". With "trailing" and a step count that does not divide T_train, this is NOT
    # the next entry of `timesteps` (diffusers' own inconsistency); mirroring step() keeps the inverse exact.
    return t - work.config.num_train_timesteps // work.num_inference_steps


def _alpha_bar(work: DDIMScheduler, t: int) -> float:
    return float(work.alphas_cumprod[t]) if t >= 0 else float(work.final_alpha_cumprod)


def sampling_schedule(scheduler, steps: int) -> list[tuple[int, float, float]]:
    """[(t, ᾱ_t, ᾱ_s)] for each sampling step, high noise first, as `DDIMScheduler.step` takes them."""
    work = _working_scheduler(scheduler, steps)
    return [(t, _alpha_bar(work, t), _alpha_bar(work, _previous_timestep(work, t))) for t in map(int, work.timesteps)]


def check_skip(steps: int, skip: int) -> None:
    if not 0 <= skip < steps:
        raise ValueError(f"skip must be in [0, {steps - 1}] for {steps} steps, got {skip}")


def inversion_schedule(scheduler, steps: int, skip: int = 0) -> list[tuple[int, float, float]]:
    """The sampling steps from `skip` on, in reverse order: inversion step k undoes sampling step steps-1-k.

    Why not `DDIMInverseScheduler`: in diffusers 0.42 its `set_timesteps` ("leading"/"trailing") and
    `step` do give the reversed trajectory when `steps` divides T_train, and `invert(method="ddim")`
    is tested to match it; but fixed-point inversion needs ᾱ at both ends of each step, and deriving
    both directions from one `DDIMScheduler` guarantees the same grid even where the two classes
    would differ (e.g. "linspace" spacing, which DDIMInverseScheduler does not implement).
    """
    return sampling_schedule(scheduler, steps)[skip:][::-1]


def _check(schedule: list[tuple[int, float, float]], prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")
    if prediction_type == "epsilon" and any(a_t <= 0.0 for _, a_t, _ in schedule):
        raise ValueError(
            "this schedule reaches ᾱ_t = 0 (zero terminal SNR): an ε-model cannot predict x_0 there; "
            "use prediction_type='v_prediction'"
        )


def _progress(it, progress: bool, desc: str, total: int):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


def _timestep(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


# --------------------------------------------------------------------------------------------------
# Inversion and rendering
# --------------------------------------------------------------------------------------------------


def _ddim_update(x_s: Tensor, eps: Tensor, a_t: float, a_s: float) -> Tensor:
    """x_t from x_s and a noise estimate: PhenDiff eq. 6, x_t = √ᾱ_t (x_s − √(1−ᾱ_s) ε)/√ᾱ_s + √(1−ᾱ_t) ε."""
    return math.sqrt(a_t / a_s) * (x_s - math.sqrt(1.0 - a_s) * eps) + math.sqrt(1.0 - a_t) * eps


@torch.no_grad()
def invert(
    model: ModelFn,
    x0: Tensor,
    condition: Condition,
    scheduler,
    steps: int = 50,
    method: str = "fixed-point",
    iters: int = 5,
    progress: bool = False,
    *,
    tol: float = 0.0,
    solver: str = "picard",
    warm_start: bool = False,
    skip: int = 0,
) -> Code:
    """The code that `render(model, code, condition, scheduler)` regenerates x0 from (PhenDiff §2.3).

    method="ddim": PhenDiff eq. 6 (= `DDIMInverseScheduler` for ε-models): the step s -> t uses
        ε = ε_θ(x_s, t) at the old point:  x_t = √ᾱ_t (x_s - √(1-ᾱ_s) ε)/√ᾱ_s + √(1-ᾱ_t) ε.
        One network call per step; exact only in the limit of small steps.
    method="fixed-point": each step is solved implicitly, x_t = F(x_t) with ε = ε_θ(x_t, t, y) at the
        *new* point, whose solution is the exact inverse of the sampling step (AIDI / ReNoise); see
        `phenolens.diffusion.solvers`. The first guess is plain eq. 6 (one call), or with
        `warm_start` the ε the previous step converged to (no call); then at most `iters` calls per step,
        fewer where the residual falls below `tol`. At ᾱ_t = 0 (zero terminal SNR, v-model) ε̂ = x_t
        whatever the network says, so that map is the identity; that one step solves the affine
        sampling step x_s = A x_t + B v(x_t) for x_t instead (`_step_coefficients`).
    skip: stop at sampling step `skip` (T_skip): rendering then runs only the last steps - skip steps.
    Inversion is unguided, under each image's own condition. Deterministic: no noise is drawn.
    """
    if method not in INVERSION_METHODS:
        raise ValueError(f"inversion method {method!r} must be one of {', '.join(INVERSION_METHODS)}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    check_skip(steps, skip)
    prediction_type = scheduler.config.prediction_type
    schedule = inversion_schedule(scheduler, steps, skip)
    _check(schedule, prediction_type)
    if prediction_type == "sample":
        # its ε̂ = (x - √ᾱ o)/√(1-ᾱ) is undefined at the clean image, where inversion starts
        raise ValueError("DDIM inversion needs an 'epsilon' or 'v_prediction' model, not 'sample'")
    if any(a_s <= 0.0 for _, _, a_s in schedule):
        raise ValueError("cannot invert a step that starts from ᾱ = 0")

    n = x0.shape[0]
    forwards = torch.zeros(n, dtype=torch.long)
    x = x0
    eps_prev: Tensor | None = None  # ε_θ at the previous step's solution (warm start)
    for t, a_t, a_s in _progress(schedule, progress, f"invert ({method})", len(schedule)):
        tt = _timestep(t, x)
        x_s = x
        if method == "fixed-point" and warm_start and eps_prev is not None and a_t > 0.0:
            x = _ddim_update(x_s, eps_prev, a_t, a_s)
        else:
            # plain DDIM inversion (PhenDiff eq. 6): ε = ε_θ(x_s, t, y), the model at the *old* point but
            # told the *new* timestep, read as an output at noise level t. For ε-models this is
            # DDIMInverseScheduler.step. For v-models diffusers converts v to ε at ᾱ_s instead; reading
            # it at ᾱ_t (the level the network was told) keeps the step exact for any model whose ε does
            # not depend on x, as eq. 6 intends (see the tests).
            eps = to_epsilon(model(x_s, tt, condition), x_s, a_t, prediction_type)
            forwards += 1
            x = _ddim_update(x_s, eps, a_t, a_s)
            eps_prev = eps
        if method == "fixed-point":
            A, B = _step_coefficients(a_t, a_s, prediction_type)
            if not abs(A) > 1e-12:
                raise ValueError(f"the DDIM step {t} -> s is not invertible for a {prediction_type!r} model (A = 0)")
            eps_last = eps_prev.clone() if eps_prev is not None else torch.zeros_like(x)

            def update(guess: Tensor, index: Tensor, t=t, a_t=a_t, a_s=a_s, A=A, B=B, x_s=x_s, eps_last=eps_last):
                cond = take(condition, index) if len(index) < n else condition
                out = model(guess, _timestep(t, guess), cond)
                if a_t > 0.0:
                    eps = to_epsilon(out, guess, a_t, prediction_type)
                    eps_last[index] = eps
                    return _ddim_update(x_s[index], eps, a_t, a_s)
                # ᾱ_t = 0: solve the affine step x_s = A·x_t + B·v(x_t) (A = √(1-ᾱ_s), B = -√ᾱ_s)
                return (x_s[index] - B * out) / A

            x, calls = solve(update, x, iters=iters, tol=tol, solver=solver)
            forwards += calls
            eps_prev = eps_last
    return Code(x=x, steps=steps, start=skip, noise=None, forwards=forwards)


def ddpm_sigma(a_t: float, a_s: float) -> float:
    """σ_t of the η = 1 step from t to s (DDIM eq. 16 = the DDPM posterior's standard deviation on the
    strided schedule): √((1−ᾱ_s)/(1−ᾱ_t)) · √(1 − ᾱ_t/ᾱ_s), exactly what `DDIMScheduler.step` uses."""
    if a_t >= 1.0:
        return 0.0
    return math.sqrt(max((1.0 - a_s) / (1.0 - a_t), 0.0) * max(1.0 - a_t / a_s, 0.0))


@torch.no_grad()
def render(
    model: ModelFn,
    code: Code,
    condition: Condition,
    scheduler,
    *,
    guidance_scale: float = 1.0,
    null_condition: Condition | None = None,
    progress: bool = False,
    trajectory: dict[int, Tensor] | None = None,
) -> Tensor:
    """x_0 from a code under CONDITION, starting at the code's step, with `DDIMScheduler.step`.

    TRAJECTORY, when given, receives x before each sampling step (key: the step's index in the schedule):
    under the inversion's own condition these are the points every shorter code restarts from
    (`Code.restart`), so one inversion serves a whole sweep of T_skip.

    A deterministic code runs DDIM (η = 0, PhenDiff eq. 5). A code with noise maps runs DDPM (η = 1)
    with those maps as `variance_noise` (DIFFusion eq. 8); on the last step, where σ = 0, the map is the
    residual that inversion measured and is added to the step's mean.
    guidance_scale != 1: classifier-free guidance, o = o_u + s·(o_c - o_u) with o_u under NULL_CONDITION.
    Mixing raw outputs is the same as mixing ε (ε̂ is affine in o at a fixed x_t), for any prediction type.
    """
    guided = guidance_scale != 1.0
    if guided and null_condition is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs null_condition")
    work = _working_scheduler(scheduler, code.steps)
    _check(sampling_schedule(scheduler, code.steps), work.config.prediction_type)
    both = cat([condition, null_condition]) if guided else None
    x = code.x
    timesteps = [int(t) for t in work.timesteps][code.start:]
    for k, t in enumerate(_progress(timesteps, progress, "render", len(timesteps))):
        if trajectory is not None:
            trajectory[code.start + k] = x
        if guided:
            out = model(torch.cat([x, x]), _timestep(t, torch.cat([x, x])), both)
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        else:
            out = model(x, _timestep(t, x), condition)
        if code.noise is None:
            x = work.step(out, t, x, eta=0.0).prev_sample
            continue
        z = code.noise[k].to(x.device, x.dtype)
        sigma = ddpm_sigma(_alpha_bar(work, t), _alpha_bar(work, _previous_timestep(work, t)))
        if sigma > 0.0:
            x = work.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        else:  # σ = 0: the mean, plus the residual inversion stored for this step
            x = work.step(out, t, x, eta=0.0).prev_sample + z
    return x


@torch.no_grad()
def sample(
    model: ModelFn,
    xT: Tensor,
    condition: Condition,
    scheduler,
    steps: int = 50,
    progress: bool = False,
    guidance_scale: float = 1.0,
    null_condition: Condition | None = None,
) -> Tensor:
    """x_0 from x_T by deterministic DDIM over the whole schedule (PhenDiff eq. 5): `render` of a full code."""
    return render(model, Code(x=xT, steps=steps), condition, scheduler, guidance_scale=guidance_scale,
                  null_condition=null_condition, progress=progress)
