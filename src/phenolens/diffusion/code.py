"""What inversion returns: a code is more than x_T.

Deterministic DDIM inversion gives the noisy image at the step where rendering starts; edit-friendly
DDPM inversion (DIFFusion §3.2) gives that image *and* one noise map per remaining step. Both start at
an index into the sampling schedule (0 = the full schedule, T_skip > 0 = fewer steps under the edited
condition, closer to the source), so `render(code, condition)` needs nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class Code:
    """An inverted batch of images.

    x        the noisy images at sampling step `start` (x_T for a full DDIM inversion)
    steps    the number of sampling steps of the schedule the code was made on
    start    index of the first sampling step rendering runs (T_skip)
    noise    None: deterministic DDIM (η = 0). Else one map per step from `start` on (η = 1): z_t of
             DIFFusion eq. 5 where σ_t > 0, and the residual x_{t-1} - μ_θ where σ_t = 0 (the last step),
             so that rendering under the inversion's condition returns the images exactly (eq. 8)
    forwards per image: network evaluations spent on inverting it
    """

    x: Tensor
    steps: int
    start: int = 0
    noise: list[Tensor] | None = None
    forwards: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.forwards is None:
            self.forwards = torch.zeros(self.x.shape[0], dtype=torch.long)
        if self.noise is not None and len(self.noise) != self.steps - self.start:
            raise ValueError(f"a code starting at step {self.start} of {self.steps} needs "
                             f"{self.steps - self.start} noise maps, got {len(self.noise)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def stochastic(self) -> bool:
        return self.noise is not None

    def restart(self, start: int, x: Tensor) -> "Code":
        """The code that starts later, at sampling step START (a larger T_skip), from X: the images at that
        step on this code's path under the inversion's condition (`render(..., trajectory=...)`). The
        noise maps of the steps left are this code's own, so rendering it under that condition still
        returns the images exactly."""
        if not self.start <= start < self.steps:
            raise ValueError(f"a code starting at step {self.start} of {self.steps} can restart at steps "
                             f"{self.start} to {self.steps - 1}, not {start}")
        noise = None if self.noise is None else self.noise[start - self.start:]
        return Code(x, self.steps, start, noise, self.forwards.clone())

    def take(self, index: Tensor | Sequence[int]) -> "Code":
        """The codes of images `index` (e.g. those an edit changes)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: t.index_select(0, idx.to(t.device))  # noqa: E731
        return Code(pick(self.x), self.steps, self.start, None if self.noise is None else [pick(z) for z in self.noise],
                    pick(self.forwards))
