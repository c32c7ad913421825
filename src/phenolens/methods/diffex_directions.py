"""DiffEx §3.2: interpretable directions in the semantic space, found by contrastive learning.

K direction models move a semantic code z (eq. 4):  D_k(z, α) = z + α · MLP_k(z) / ‖MLP_k(z)‖.
A feature network MLP₂ maps codes to features; the edit of direction k on code i is the feature
difference f_i^k = MLP₂(D_k(z_i, α)) − MLP₂(z_i) (eqs. 5-7). Edits of the same direction on different
codes attract, edits of different directions repel (eq. 8, after LatentCLR, with temperature τ), and
the shifts of different directions are decorrelated by a covariance penalty (eq. 9, after VICReg),
L_dir = L_cont + λ₂ L_reg (eq. 10). Only codes are involved (no UNet), so training is cheap.

Eq. 9 writes Cov(D_i(z), D_j(z)) without saying over what; here each direction's unit shifts over a
batch of codes are flattened into one vector, and the penalty is the sum of the squared off-diagonal
covariances between those vectors (directions whose shifts co-vary across codes and coordinates are
one direction twice).

The paper gives K = 10 in its examples and no values for α, τ or λ₂: τ = 0.5 is LatentCLR's, λ₂ = 1
VICReg's covariance weight, and α defaults to the codes' own spread (the RMS distance of a code from
their mean), so a unit of α is one typical difference between two images' codes.

Standardised space (our choice, `standardize`, on by default; the paper does not say): z_sem joins the
encoder's numbers to the classifier's probabilities, and their scales differ by an order of magnitude
(on our simulator one probability spreads ~0.5, one encoder number ~0.06). Eqs. 4-10 are then applied to
z̃ = (z − mean) / std, each number scaled by its spread over the training codes, so that a unit step can
go anywhere in the code instead of mostly along the classifier's opinion, which is one axis for a
two-class classifier and moves every phenotype at once. α is then in units of those spreads.

Whitened space (`whiten`, our option): the standardised codes are further rotated into their principal
components, each scaled to unit spread, z̃ = ((z − mean) / std) U Λ^(-1/2) (PCA whitening). A unit step
is then one standard deviation of the codes along any direction, not only along each number, so a
step cannot go many spreads off the codes along a combination of numbers that barely varies (in the
standardised space it can: the encoder's numbers are correlated). Components whose variance is below
1e-4 of the largest (the probabilities of a two-class classifier sum to 1) are left out: steps stay in
the codes' span. α is then in units of the codes' spread along the direction.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from phenolens.atomic import write_json_atomic
from phenolens.errors import PhenolensError

DIRECTIONS_WEIGHTS = "directions.safetensors"
DIRECTIONS_INFO = "directions.json"
DEFAULT_K = 10
DEFAULT_TAU = 0.5
DEFAULT_LAMBDA_REG = 1.0


class DirectionModels(nn.Module):
    """MLP_1..MLP_K (eq. 4) and the feature network MLP₂ (eq. 6)."""

    def __init__(self, dim: int, k: int = DEFAULT_K, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.dim, self.k = dim, k
        self.directions = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
                                        for _ in range(k))
        self.features = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        # z̃ = ((z − center) / scale) @ basis: the space the directions live in (identity unless
        # `fit_standardization`); a step s in z̃ is (s · mask) @ unbasis · scale in z (mask: the components kept)
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("basis", torch.eye(dim))
        self.register_buffer("unbasis", torch.eye(dim))
        self.register_buffer("mask", torch.ones(dim))

    def fit_standardization(self, z: torch.Tensor, whiten: bool = False) -> None:
        """Centre and scale each number of the code by its mean and spread over the codes Z (N, d); with
        WHITEN, also rotate into the principal components, each scaled to unit spread (module docstring)."""
        std = z.std(dim=0)
        self.center.copy_(z.mean(dim=0))
        self.scale.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))
        if not whiten:
            return
        zs = ((z - self.center) / self.scale).double()
        var, vectors = torch.linalg.eigh(zs.T @ zs / max(len(zs) - 1, 1))
        order = torch.argsort(var, descending=True)
        var, vectors = var[order], vectors[:, order]
        kept = var > 1e-4 * var[0]
        sd = var.clamp_min(1e-12).sqrt()
        self.basis.copy_(torch.where(kept, 1 / sd, 0.0) * vectors)  # column j: component j / its spread
        self.unbasis.copy_((torch.where(kept, sd, 0.0) * vectors).T)
        self.mask.copy_(kept.to(self.mask.dtype))

    def standardized(self, z: torch.Tensor) -> torch.Tensor:
        return ((z - self.center) / self.scale) @ self.basis

    def step(self, zs: torch.Tensor, k: int) -> torch.Tensor:
        """MLP_k(z̃) / ‖MLP_k(z̃)‖ (eq. 4) for standardised codes zs: direction k's unit step in z̃ (within
        the kept components)."""
        return F.normalize(self.directions[k](zs) * self.mask, dim=-1, eps=1e-8)

    def unit_shift(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """Where direction k moves each code z, per unit of α, on the codes' own scale."""
        return self.scale * (self.step(self.standardized(z), k) @ self.unbasis)

    def shift(self, z: torch.Tensor, k: int, alpha: float | torch.Tensor) -> torch.Tensor:
        """D_k(z, α) (eq. 4), applied in z̃ and mapped back."""
        return z + alpha * self.unit_shift(z, k)


def contrastive_loss(f: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 8 over edits f of shape (K, N, d): f[k, i] = f_i^k.

    ℓ(i, k) = −log Σ_{j≠i} exp(sim(f_i^k, f_j^k)/τ) / Σ_j Σ_{l≠k} exp(sim(f_i^k, f_j^l)/τ), averaged over
    i and k; sim is the cosine similarity."""
    k, n, d = f.shape
    flat = F.normalize(f.reshape(k * n, d), dim=-1)
    sim = flat @ flat.T / tau  # (K·N) x (K·N)
    direction = torch.arange(k, device=f.device).repeat_interleave(n)
    same = direction[:, None] == direction[None, :]
    itself = torch.eye(k * n, dtype=torch.bool, device=f.device)
    positives = torch.logsumexp(sim.masked_fill(~same | itself, -math.inf), dim=1)
    negatives = torch.logsumexp(sim.masked_fill(same, -math.inf), dim=1)
    return (negatives - positives).mean()


def covariance_penalty(shifts: torch.Tensor) -> torch.Tensor:
    """Eq. 9: Σ_{i≠j} Cov(D_i, D_j)², the shifts (K, N, d) of each direction flattened to one vector."""
    v = shifts.reshape(shifts.shape[0], -1)
    v = v - v.mean(dim=1, keepdim=True)
    cov = v @ v.T / max(v.shape[1] - 1, 1)
    off = cov - torch.diag(torch.diag(cov))
    return off.pow(2).sum()


def direction_loss(models: DirectionModels, z: torch.Tensor, alpha: float, tau: float,
                   lambda_reg: float) -> torch.Tensor:
    """L_dir = L_cont + λ₂ L_reg (eq. 10) on a batch of codes z (N, d), in the models' space z̃."""
    zs = models.standardized(z)
    base = models.features(zs)
    steps = torch.stack([models.step(zs, k) for k in range(models.k)])  # (K, N, d)
    f = models.features(zs[None] + alpha * steps) - base[None]  # eqs. 5-7
    return contrastive_loss(f, tau) + lambda_reg * covariance_penalty(steps)


def code_spread(z: torch.Tensor) -> float:
    """RMS distance of codes from their mean: the default unit of α (√d for standardised codes)."""
    return float((z - z.mean(0)).pow(2).sum(-1).mean().sqrt())


@dataclass
class DirectionSettings:
    k: int = DEFAULT_K
    alpha: float | None = None  # None = the codes' spread (`code_spread`)
    tau: float = DEFAULT_TAU
    lambda_reg: float = DEFAULT_LAMBDA_REG
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    standardize: bool = True  # learn in z̃ = (z − mean) / std (module docstring)
    whiten: bool = False  # learn in the whitened space (module docstring)

    def check(self) -> None:
        if self.whiten and not self.standardize:
            raise PhenolensError("--whiten with --no-standardize: whitening standardises first; choose one")
        if self.k < 2:
            raise PhenolensError(f"-k {self.k}: contrastive learning needs at least 2 directions")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise PhenolensError(f"--alpha {self.alpha}: must be a number above 0 (a shift of 0 moves nothing)")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise PhenolensError(f"--tau {self.tau}: must be above 0")
        if not (math.isfinite(self.lambda_reg) and self.lambda_reg >= 0):
            raise PhenolensError(f"--lambda-reg {self.lambda_reg}: must be 0 or more")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise PhenolensError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.batch_size < 2:
            raise PhenolensError("--batch-size: the contrastive loss needs at least 2 codes per batch")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise PhenolensError(f"--lr {self.lr}: must be above 0")


@dataclass
class DirectionsInfo:
    """directions.json: what the directions belong to and how they were learnt."""

    model: str  # the DiffEx model folder
    model_id: str  # `model_identity` of that model: a directions file fits one model only
    dim: int
    settings: dict
    alpha: float  # α used in training (and the default step of explain and the ranking)
    steps_done: int = 0
    loss: list[float] = field(default_factory=list)  # mean loss per 100 steps


def model_identity(model_dir: Path) -> str:
    """A digest of the model's semantic encoder weights: directions learnt in one model's z_sem space mean
    nothing in another's."""
    path = Path(model_dir) / "encoder" / "diffusion_pytorch_model.safetensors"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def save_directions(out: Path, models: DirectionModels, info: DirectionsInfo, optimizer=None) -> list[str]:
    """Weights (and the optimiser state, for resuming) as safetensors, then directions.json last."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in models.state_dict().items()}
    if optimizer is not None:
        for i, state in optimizer.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"adam.{i}.{name}"] = torch.as_tensor(value).detach().contiguous()
    tmp = out / f".{DIRECTIONS_WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out / DIRECTIONS_WEIGHTS)
    write_json_atomic(out / DIRECTIONS_INFO, asdict(info))
    return [DIRECTIONS_WEIGHTS, DIRECTIONS_INFO]


def load_directions(path: Path, optimizer_for: bool = False):
    """(DirectionModels, DirectionsInfo[, saved optimiser tensors]) from a directions folder."""
    from safetensors.torch import load_file

    path = Path(path)
    info_file = path / DIRECTIONS_INFO
    if not info_file.is_file() or not (path / DIRECTIONS_WEIGHTS).is_file():
        raise PhenolensError(f"{path}: not a directions folder (no {DIRECTIONS_INFO} / {DIRECTIONS_WEIGHTS}); make one "
                             "with `phenolens directions MODEL DATA OUT`")
    try:
        info = DirectionsInfo(**json.loads(info_file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
        raise PhenolensError(f"{info_file}: not a valid directions description ({err})") from None
    tensors = load_file(str(path / DIRECTIONS_WEIGHTS))
    models = DirectionModels(info.dim, int(info.settings["k"]))
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for name in ("center", "scale", "basis", "unbasis", "mask"):  # saved before these existed: the identity
        state.setdefault(name, getattr(models, name))
    models.load_state_dict(state)
    if optimizer_for:
        return models, info, {k: v for k, v in tensors.items() if k.startswith("adam.")}
    return models, info


# --------------------------------------------------------------------------------- §3.3 ranking
DEFAULT_THRESHOLD = 0.1  # mean rise of the target-class probability a direction must exceed (paper: none given)


@dataclass
class RankedDirection:
    """One kept direction of Algorithm 1: which, which sign, how much it moved the target class."""

    rank: int
    direction: int
    sign: int  # +1 or -1: the edit is D_k(z, sign · α)
    mean_change: float  # mean rise of p(target) over the images still unexplained when it was chosen
    explained: list[int]  # indices of the images it explained (their rise passed the threshold)


def rank_directions(change, threshold: float = DEFAULT_THRESHOLD, max_directions: int | None = None,
                    remove_explained: bool = True) -> list[RankedDirection]:
    """Algorithm 1 (supplementary B) on precomputed changes.

    change[i, k, s] = p(target | render(x_T_i, D_k(z_i, ±α))) − p(target | x_i), s = 0 for +α and 1
    for −α. Repeatedly: among directions not yet chosen, take the (k, sign) with the largest mean change
    over the images not yet explained; keep it if that mean exceeds THRESHOLD (§3.3: "if the average
    change in classification scores exceeds a predefined threshold, we retain that direction"), and
    remove the images whose own change exceeds it (they are explained). Stops at MAX_DIRECTIONS, when no
    image is left, or when no direction passes. Renders are deterministic given x_T, so the changes are
    computed once instead of once per round, with the same result as the pseudo-code's loop. (Its
    τ ← min(τ, max_effect) never lowers τ once a kept direction must exceed τ, so it is left out.)

    With `remove_explained=False` every direction is scored on the whole sample (not Algorithm 1): when
    one direction explains most images, the others are still ranked by what they do to all of them.
    """
    import numpy as np

    change = np.asarray(change, dtype=np.float64)
    n, k, _ = change.shape
    remaining = np.ones(n, dtype=bool)
    used: set[int] = set()
    ranked: list[RankedDirection] = []
    while remaining.any() and len(used) < k and (max_directions is None or len(ranked) < max_directions):
        means = change[remaining].mean(axis=0)  # (K, 2)
        means[list(used)] = -np.inf
        kd, s = np.unravel_index(int(np.argmax(means)), means.shape)
        best = float(means[kd, s])
        if not best > threshold:
            break
        explained = np.flatnonzero(remaining & (change[:, kd, s] > threshold))
        ranked.append(RankedDirection(rank=len(ranked) + 1, direction=int(kd), sign=1 if s == 0 else -1,
                                      mean_change=best, explained=[int(i) for i in explained]))
        used.add(int(kd))
        if remove_explained:
            remaining[explained] = False
    return ranked
