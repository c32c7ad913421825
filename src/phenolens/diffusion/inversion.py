"""One front for every inversion: which one, its options, and the code it returns.

`InversionSettings` is what a user chooses (`phenolens translate --inversion ... --skip ...`);
`invert_image` dispatches to deterministic DDIM inversion (`ddim.invert`: plain or fixed-point) or to
edit-friendly DDPM inversion (`ef_ddpm.invert_ef_ddpm`). Every method's translation goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from phenolens.diffusion.code import Code
from phenolens.diffusion.conditions import Condition, ModelFn
from phenolens.diffusion.ddim import check_skip, invert
from phenolens.diffusion.ef_ddpm import Generators, invert_ef_ddpm
from phenolens.diffusion.solvers import SOLVERS

INVERSIONS = ("fixed-point", "ddim", "ef-ddpm")
# defaults chosen by bench/inversion.py on 32 held-out images of the demo model (README, "Inversion"):
# Anderson with tolerance 5e-5 spent 2.27 network calls per step (today's 6.0) for 80.3 dB mean, 67.3 dB
# min; 1e-4 spent 2.11 but its worst image fell to 60.8 dB, too close to the 60 dB bar
DEFAULT_TOL = 5e-5
DEFAULT_ITERS = 8
DEFAULT_SOLVER = "anderson"


@dataclass(frozen=True)
class InversionSettings:
    """How images are inverted.

    method      "fixed-point" (exact deterministic DDIM), "ddim" (PhenDiff eq. 6, one call per step)
                or "ef-ddpm" (edit-friendly DDPM: per-step noise maps, exact by construction)
    steps       sampling steps of the schedule
    skip        T_skip: rendering starts at this step (0 = the whole schedule; larger = closer to the source)
    iters       fixed-point: at most this many network calls per step after the first guess
    tol         fixed-point: stop an image's iteration when its residual (rms) is below this (0 = never)
    solver      fixed-point: "picard" (plain iteration) or "anderson" (accelerated)
    warm_start  fixed-point: first guess from the ε the previous step converged to (saves one call per step)
    """

    method: str = "fixed-point"
    steps: int = 50
    skip: int = 0
    iters: int = DEFAULT_ITERS
    tol: float = DEFAULT_TOL
    solver: str = DEFAULT_SOLVER
    warm_start: bool = True

    def check(self) -> None:
        if self.method not in INVERSIONS:
            raise ValueError(f"inversion {self.method!r} must be one of {', '.join(INVERSIONS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        check_skip(self.steps, self.skip)
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver {self.solver!r} must be one of {', '.join(SOLVERS)}")

    @classmethod
    def legacy(cls, steps: int = 50, iters: int = 5) -> "InversionSettings":
        """Fixed-point inversion as phenolens ran it before the adaptive solver: 1 + ITERS calls per step."""
        return cls(method="fixed-point", steps=steps, iters=iters, tol=0.0, solver="picard", warm_start=False)


def invert_image(model: ModelFn, z0: Tensor, condition: Condition, scheduler, settings: InversionSettings,
                 generator: Generators = None, progress: bool = False) -> Code:
    """The code of z0 under CONDITION (its own condition: the reconstruction is then exact)."""
    settings.check()
    if settings.method == "ef-ddpm":
        return invert_ef_ddpm(model, z0, condition, scheduler, settings.steps, settings.skip, generator, progress)
    return invert(model, z0, condition, scheduler, steps=settings.steps, method=settings.method,
                  iters=settings.iters, progress=progress, tol=settings.tol, solver=settings.solver,
                  warm_start=settings.warm_start, skip=settings.skip)
