"""Solving one implicit inversion step x = F(x), image by image, with as few network calls as possible.

Fixed-point inversion (AIDI, Pan et al. 2023; ReNoise, Garibi et al. 2024) finds, for every step, the
x_t that the sampling step maps exactly onto the known x_s: a fixed point of
F(x) = √(ᾱ_t/ᾱ_s)(x_s − √(1−ᾱ_s) ε_θ(x, t)) + √(1−ᾱ_t) ε_θ(x, t). Each evaluation of F costs one
network call. Two savings, both per image:

- stop when the residual ‖F(x) − x‖ (root mean square over the image) falls below `tol`, and stop
  evaluating the network for that image (most low-noise steps converge after one call);
- `solver="anderson"`: Anderson acceleration (Anderson 1965; Walker & Ni 2011, type II) mixes the last
  `depth` iterates so that the residual falls faster on the stiff steps where plain (Picard) iteration
  contracts slowly.

A safeguard keeps, per image, the iterate with the smallest residual: an iteration that stops
contracting can never make the inversion worse than its best guess.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

SOLVERS = ("picard", "anderson")

Update = Callable[[Tensor, Tensor], Tensor]
"""(x, index) -> F(x) for the images `index` of the batch (one network call for those rows)."""


def _rms(a: Tensor) -> Tensor:
    return a.double().flatten(1).pow(2).mean(1).sqrt()


def solve(update: Update, x: Tensor, *, iters: int, tol: float = 0.0, solver: str = "picard",
          depth: int = 2) -> tuple[Tensor, Tensor]:
    """Iterate x <- F(x) at most `iters` times per image; returns (solution, network calls per image).

    An image stops as soon as its residual ‖F(x) − x‖_rms < tol (tol = 0: always `iters` calls). The
    returned solution is F of the last iterate when that iterate had the smallest residual (the usual,
    contracting case: one Picard step further), else the best iterate itself (the map stopped
    contracting there, so a further step could only make it worse).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} must be one of {', '.join(SOLVERS)}")
    n = x.shape[0]
    calls = torch.zeros(n, dtype=torch.long)
    if iters <= 0:
        return x, calls
    best_g, best_x = x.clone(), x.clone()
    last_best = torch.zeros(n, dtype=torch.bool, device=x.device)
    best_r = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
    active = torch.arange(n, device=x.device)
    history: list[tuple[Tensor, Tensor]] = []  # (x_k, g_k) of the active images, newest last
    for _ in range(iters):
        g = update(x[active], active)
        calls[active.cpu()] += 1
        r = _rms(g - x[active])
        better = r < best_r[active]
        best_r[active] = torch.where(better, r, best_r[active])
        shaped = better.view(-1, *[1] * (x.dim() - 1))
        best_g[active] = torch.where(shaped, g, best_g[active])
        best_x[active] = torch.where(shaped, x[active], best_x[active])
        last_best[active] = better
        keep = r >= tol if tol > 0 else torch.ones_like(better)
        nxt = _anderson(history, x[active], g, depth) if solver == "anderson" else g
        x = x.clone()
        x[active] = nxt
        if not bool(keep.all()):
            history = [(hx[keep], hg[keep]) for hx, hg in history]
            active = active[keep]
            if active.numel() == 0:
                break
    return torch.where(last_best.view(-1, *[1] * (x.dim() - 1)), best_g, best_x), calls


def _anderson(history: list[tuple[Tensor, Tensor]], x: Tensor, g: Tensor, depth: int) -> Tensor:
    """Type-II Anderson mixing per image: x_next = g − ΔG γ with γ = argmin ‖f − ΔF γ‖, f = g − x.

    HISTORY holds earlier (x, g) pairs of the same images and is extended in place (newest last).
    """
    history.append((x, g))
    del history[:-(depth + 1)]
    if len(history) < 2:
        return g
    xs = torch.stack([h[0] for h in history], 1).double().flatten(2)  # (B, m+1, n)
    gs = torch.stack([h[1] for h in history], 1).double().flatten(2)
    fs = gs - xs
    dF = (fs[:, 1:] - fs[:, :-1]).transpose(1, 2)  # (B, n, m)
    dG = (gs[:, 1:] - gs[:, :-1]).transpose(1, 2)
    f = fs[:, -1].unsqueeze(-1)  # (B, n, 1)
    gram = dF.transpose(1, 2) @ dF
    ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)
    gram = gram + ridge.view(-1, 1, 1) * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gamma = torch.linalg.solve(gram, dF.transpose(1, 2) @ f)
    mixed = gs[:, -1] - (dG @ gamma).squeeze(-1)
    return mixed.view_as(g).to(g.dtype)
