"""The one idea every method shares (DESIGN.md): invert -> edit the condition -> render.

A method says how an image enters the diffusion space (`encode`: identity for a pixel model, the VAE
for a latent one) and how it leaves (`decode`), which network predicts the noise (`network`: called
with the condition as diffusers keyword tensors), how an image gets its condition
(`condition(x0, source)`), what the unconditional condition is (`null_condition`), and how an edit
changes a condition (`edited`). This module does the rest once: normalise raw images, pad them to a
size the networks accept, invert under the source condition (`phenolens.diffusion.inversion`: exact
DDIM or edit-friendly DDPM), render the code under the source (the reconstruction, whose error is the
floor under which no change can be believed) and under every edit (never rendering an edit that leaves
an image as it is: that is its reconstruction), and return the images in the files' raw units.
`translate`, `measure`, `report` and the memorisation check consume this interface and never ask which
method made the images. Which class loads a model folder is `phenolens.methods.registry`'s business.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from phenolens.data.dataset import upscaled_shape
from phenolens.data.normalize import Normalizer
from phenolens.diffusion.code import Code
from phenolens.diffusion.conditions import Condition, ModelFn, guidance_aware, guided_condition, take
from phenolens.diffusion.ddim import render
from phenolens.diffusion.ef_ddpm import Generators
from phenolens.diffusion.inversion import InversionSettings, invert_image
from phenolens.errors import PhenolensError
from phenolens.methods.edits import Edit, ToCondition
from phenolens.models.store import ModelInfo


# Precisions the target renders may run at (`translate(render_precision=...)`). Inversion and the
# reconstruction always run in fp32: bf16 breaks the exactness the reconstruction error measures.
RENDER_PRECISIONS = ("fp32", "bf16")


def check_render_precision(precision: str) -> None:
    if precision not in RENDER_PRECISIONS:
        raise ValueError(f"render precision {precision!r} must be one of {', '.join(RENDER_PRECISIONS)}")


def at_precision(model: ModelFn, precision: str, device: str) -> ModelFn:
    """MODEL as is for "fp32"; for "bf16" each network call runs under `torch.autocast` (bfloat16) on
    DEVICE's type and its output comes back as float32, so the sampler's own arithmetic (the DDIM step,
    the guidance mix) stays in fp32."""
    check_render_precision(precision)
    if precision == "fp32":
        return model
    device_type = torch.device(device).type

    def fn(x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            out = model(x, t, condition)
        return out.float()

    return fn


def pick_device(device: str | None = None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def mse_per_image(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).cpu().numpy().astype(np.float64)


# ------------------------------------------------------------------ per-image statistics in raw units
# Why: the [-1, 1] errors above are measured after normalisation, which clips whatever lies outside the
# training range; an 8-bit image fed to a 16-bit model is mostly clipped and still reconstructs
# "perfectly" there. These say how much of an image the model could not see, and the error in the
# file's own units.

def clipped_fraction(raw: np.ndarray, normalizer: Normalizer) -> float:
    """Fraction of the pixel values of a raw CHW image outside the normaliser's per-channel range
    (values the model sees clipped to -1 or +1; NaN counts as outside)."""
    raw = np.asarray(raw, dtype=np.float32)
    low = np.asarray(normalizer.low, dtype=np.float32).reshape(-1, 1, 1)
    high = np.asarray(normalizer.high, dtype=np.float32).reshape(-1, 1, 1)
    if raw.ndim != 3 or raw.shape[0] != low.shape[0] or raw.size == 0:
        raise ValueError(f"expected a CHW image with {low.shape[0]} channel(s), got shape {raw.shape}")
    inside = (raw >= low) & (raw <= high)
    return float(1.0 - inside.mean())


def raw_errors(source: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean absolute error, mean squared error) between two raw CHW images, in raw units."""
    diff = np.asarray(source, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    return float(np.abs(diff).mean()), float((diff * diff).mean())


@dataclass
class Translation:
    """What `translate` returns for a batch of source images.

    Images are in the files' raw intensity units (float32 CHW). `translations` and the change MSEs are
    keyed by the edits as the caller gave them (a condition's name, or an Edit's label). The MSEs are
    per image in the model's [-1, 1] image units. For a latent model `latent_recon_mse` /
    `latent_change_mse` give the same in the diffusion space (scaled VAE latents), where inversion
    itself is judged, and `autoencoder_mse` the error of encoding and decoding alone (the floor a
    latent model cannot go under). `inversion_forwards` counts the network calls inversion spent on
    each image; `render_forwards` those of rendering its reconstruction and edits.
    """

    reconstructions: list[np.ndarray]
    translations: dict[str, list[np.ndarray]]
    recon_mse: np.ndarray
    change_mse: dict[str, np.ndarray] = field(default_factory=dict)
    latent_recon_mse: np.ndarray | None = None
    latent_change_mse: dict[str, np.ndarray] = field(default_factory=dict)
    autoencoder_mse: np.ndarray | None = None
    inversion_forwards: np.ndarray | None = None
    render_forwards: np.ndarray | None = None


EditLike = Union[Edit, str]


@dataclass
class SkipSweep:
    """What `sweep_skip` returns: one edit of a batch from each T_skip (highest first), in raw units, with
    the reconstruction and the per-image MSEs ([-1, 1] units) against the sources."""

    skips: list[int]
    reconstructions: list[np.ndarray]
    recon_mse: np.ndarray
    outputs: dict[int, list[np.ndarray]] = field(default_factory=dict)
    change_mse: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Frame:
    """Where a batch of images sits in the tensor the networks see. Why: networks take sides that are
    multiples of their downsampling (the images are padded), and a model trained on images resized up
    (`--size` above the data's own) must see its inputs resized the same way. `size` is the images'
    own (h, w); `scaled` the (h, w) they were resized to (equal when nothing was resized)."""

    size: tuple[int, int]
    scaled: tuple[int, int]

    @property
    def resized(self) -> bool:
        return self.size != self.scaled


class CounterfactualModel:
    """Base of every method: normalisation and the invert / edit / render loop around `network`."""

    info: ModelInfo
    scheduler: object
    device: str
    latent: bool = False  # True when encode/decode leave pixel space
    # True: classifier-free guidance applies to inversion and to every rendering, the reconstruction
    # included (DIFFusion, paper 004 App. B.3), instead of to the edits only; see `guided`
    guide_inversion: bool = False

    def __init__(self, info: ModelInfo, scheduler, device: str | None = None):
        self.info = info
        self.scheduler = scheduler
        self.device = pick_device(device)
        self.normalizer = Normalizer.from_dict(info.normalization)

    # ------------------------------------------------------------------ what a method provides
    def network(self) -> ModelFn:
        """(x_t, t, condition) -> the network's raw output; `diffusion.conditions.network_fn` wraps a
        diffusers network whose keyword arguments the condition dict holds."""
        raise NotImplementedError

    def condition(self, x0: torch.Tensor | None, source: Sequence[str]) -> Condition:
        """The condition an image is generated under: from its source condition (and, for methods that
        condition on the image itself, from the images x0 in [-1, 1]; None when generating from noise)."""
        raise NotImplementedError

    def null_condition(self, n: int) -> Condition:
        """The unconditional condition of n images (classifier-free guidance)."""
        raise NotImplementedError

    def parse_edit(self, text: str) -> Edit:
        """An edit as the command line writes it (`to=high`, or a bare condition name)."""
        raise NotImplementedError

    def edited(self, condition: Condition, edit: Edit, source: Sequence[str], x0: torch.Tensor) -> Condition:
        """CONDITION (of images x0 in [-1, 1], of conditions SOURCE) changed by EDIT."""
        raise NotImplementedError

    def spatial_factor(self) -> int:
        """Image sides must be a multiple of this (the networks' total downsampling)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the space the diffusion runs in (identity for a pixel model)."""
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def inference(self) -> contextlib.AbstractContextManager:
        """Context for a whole invert/render pass (a method may cache derived weights in it)."""
        return contextlib.nullcontext()

    def code_shape(self, n_channels: int, height: int, width: int) -> tuple[int, int, int]:
        """Shape of one diffusion-space code for an image of this shape (what generation starts from)."""
        return (n_channels, height, width)

    # -------------------------------------------------------------------------------- common
    @property
    def conditions(self) -> list[str]:
        return list(self.info.conditions)

    def as_edit(self, edit: EditLike) -> Edit:
        """A condition's name (what `--to` takes) or an Edit, as an Edit of this method."""
        if isinstance(edit, str):
            return self.parse_edit(edit)
        return edit

    def invert(self, z0: torch.Tensor, condition: Condition, settings: InversionSettings,
               generator: Generators = None, progress: bool = False) -> Code:
        """The code of diffusion-space images z0 under their own CONDITION (the reconstruction is exact
        when rendered under the same condition, guided or not: `guided`)."""
        return invert_image(guidance_aware(self.network()), z0.to(self.device), condition, self.scheduler,
                            settings, generator=generator, progress=progress)

    def render(self, code: Code, condition: Condition, guidance_scale: float = 1.0,
               progress: bool = False, trajectory: dict | None = None, precision: str = "fp32") -> torch.Tensor:
        """The diffusion-space images a code becomes under CONDITION, from the code's own step (TRAJECTORY:
        see `diffusion.ddim.render`). PRECISION "bf16" runs the network calls under bfloat16 autocast
        (`at_precision`); the result is float32 either way."""
        null = self.null_condition(len(code)) if guidance_scale != 1.0 else None
        network = at_precision(self.network(), precision, self.device)
        return render(guidance_aware(network), code, condition, self.scheduler,
                      guidance_scale=guidance_scale, null_condition=null, progress=progress, trajectory=trajectory)

    def guided(self, condition: Condition, guidance_scale: float) -> tuple[Condition, float]:
        """(condition, scale) to invert or render with. For a `guide_inversion` method the guidance goes
        into the condition itself (`diffusion.conditions.guided_condition`), so inversion, reconstruction
        and edits all run the same guided network and the returned scale is 1; otherwise unchanged."""
        if not self.guide_inversion or guidance_scale == 1.0:
            return condition, guidance_scale
        n = len(next(iter(_tensors(condition))))
        return guided_condition(condition, self.null_condition(n), guidance_scale), 1.0

    def model_scale(self, h: int, w: int) -> tuple[int, int]:
        """The (h, w) an image of (h, w) pixels is processed at: its own, unless the model was trained on
        images resized up (`ModelInfo.size_rule == "resize-up"`), when the same rule as training applies."""
        if getattr(self.info, "size_rule", None) == "resize-up":
            return upscaled_shape(h, w, int(self.info.image_size))
        return h, w

    def normalized(self, raw_images: Sequence[np.ndarray]) -> torch.Tensor:
        """Raw CHW images of one shape -> (B, C, H, W) in [-1, 1], at their own size."""
        shapes = {img.shape for img in raw_images}
        if len(shapes) != 1:
            raise ValueError("to_model_space needs images of one shape; group them first")
        c = next(iter(shapes))[0]
        if c != self.info.n_channels:
            raise PhenolensError(f"images have {c} channels but the model expects {self.info.n_channels}")
        return torch.from_numpy(np.stack([self.normalizer.to_model(img) for img in raw_images])).float()

    def to_model_space(self, raw_images: Sequence[np.ndarray]) -> tuple[torch.Tensor, Frame]:
        """Normalise raw CHW images of one shape to [-1, 1] and reflect-pad them to a size the networks
        accept. They are convolutional, so images are processed at their own resolution (no resampling,
        so reconstructions stay exact in raw units), unless the model learnt cells resized up
        (`model_scale`): then they are resized the same way, and `crop_back` resizes the results back."""
        x = self.normalized(raw_images)
        h, w = x.shape[-2:]
        scaled = self.model_scale(h, w)
        if scaled != (h, w):
            x = F.interpolate(x, size=scaled, mode="bilinear", align_corners=False).clamp_(-1, 1)
        f = self.spatial_factor()
        sh, sw = scaled
        ph, pw = (-sh) % f, (-sw) % f
        if ph or pw:
            mode = "reflect" if ph < sh and pw < sw else "replicate"
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode=mode)
        return x, Frame((int(h), int(w)), (int(sh), int(sw)))

    @staticmethod
    def crop_back(x: torch.Tensor, frame: Frame | tuple[int, int]) -> torch.Tensor:
        """The images' own pixels out of the padded (and possibly resized) network tensor."""
        if not isinstance(frame, Frame):
            frame = Frame(tuple(frame), tuple(frame))
        h, w = frame.scaled
        top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
        x = x[..., top:top + h, left:left + w]
        if frame.resized:
            x = F.interpolate(x, size=frame.size, mode="bilinear", align_corners=False, antialias=True)
        return x

    @torch.no_grad()
    def translate(self, images: Sequence[np.ndarray], source: str | Sequence[str],
                  edits: Sequence[EditLike] | None = None, *, inversion: InversionSettings | None = None,
                  guidance_scale: float = 1.0, generator: Generators = None, progress: bool = False,
                  render_precision: str = "fp32", **legacy) -> Translation:
        """Translate raw CHW images (one shape) from their source condition(s) under each edit.

        `source` is one condition for all images or one per image; `edits` are condition names (as
        `--to` takes them) or Edit values, by default every condition of the model. An edit that leaves
        an image as it is (a target equal to its source) gives its reconstruction and is not rendered.
        Inversion (`InversionSettings`, default: exact fixed-point DDIM) is unguided; `guidance_scale`
        != 1 applies classifier-free guidance to the edits only (the reconstruction stays exact), except
        for a `guide_inversion` method, whose inversion, reconstruction and edits are all guided.
        `generator` draws EF-DDPM's noise (one per image makes results independent of batching).
        `render_precision` "bf16" renders the edits (only: never the inversion nor the reconstruction, which
        stay fp32 so that `recon_mse` still measures the exactness floor) with the network under bfloat16
        autocast on the model's device; outputs are float32 either way. "fp32" (default) is exact fp32.
        """
        check_render_precision(render_precision)
        sources = [source] * len(images) if isinstance(source, str) else list(source)
        if len(sources) != len(images):
            raise ValueError("give one source condition per image")
        for s in sources:
            self.info.condition_index(s, "--from")
        if edits is None and legacy.get("targets") is not None:  # the earlier keyword for condition names
            edits = legacy["targets"]
        inversion = _inversion_from(inversion, legacy)
        given = list(edits) if edits is not None else self.conditions
        keys = [e if isinstance(e, str) else e.label for e in given]
        resolved = [self.as_edit(e) for e in given]
        with self.inference():
            return self._translate(images, sources, dict(zip(keys, resolved)), inversion, guidance_scale,
                                   generator, progress, render_precision=render_precision)

    def _invert_and_reconstruct(self, images, sources: list[str], inversion: InversionSettings,
                                generator: Generators, progress: bool, trajectory: dict | None = None,
                                guidance_scale: float = 1.0):
        """Normalise, invert under the sources' own condition and render the reconstruction: what every
        translation starts from. Returns (x0, frame, src, z0, cond, code, z_recon, recon); COND is the
        images' own condition, unguided (what an edit changes)."""
        x0, frame = self.to_model_space(images)
        x0 = x0.to(self.device)
        # the sources at their own size: the yardstick of every error (equal to crop_back(x0) unless resized)
        src = self.normalized(images).to(self.device) if frame.resized else self.crop_back(x0, frame)
        z0 = self.encode(x0)
        cond = self.condition(x0, sources)
        own, _ = self.guided(cond, guidance_scale)  # a guide_inversion method: guided here too
        code = self.invert(z0, own, inversion, generator=generator, progress=progress)
        z_recon = self.render(code, own, progress=progress, trajectory=trajectory)
        recon = self.crop_back(self.decode(z_recon).clamp(-1, 1), frame)
        return x0, frame, src, z0, cond, code, z_recon, recon

    def _translate(self, images, sources: list[str], edits: dict[str, Edit], inversion: InversionSettings,
                   guidance_scale: float, generator: Generators, progress: bool,
                   render_precision: str = "fp32") -> Translation:
        x0, frame, src, z0, cond, code, z_recon, recon = self._invert_and_reconstruct(
            images, sources, inversion, generator, progress, guidance_scale=guidance_scale)
        steps_rendered = inversion.steps - inversion.skip
        guided_calls = 2 if self.guide_inversion and guidance_scale != 1.0 else 1  # a guided step: 2 network calls
        render_forwards = np.full(len(images), steps_rendered * guided_calls, dtype=np.int64)
        result = Translation(reconstructions=self._to_raw(recon), translations={},
                             recon_mse=mse_per_image(recon, src),
                             inversion_forwards=code.forwards.cpu().numpy().astype(np.int64) * guided_calls)
        if self.latent:
            result.latent_recon_mse = mse_per_image(z_recon, z0)
            result.autoencoder_mse = mse_per_image(self.crop_back(self.decode(z0).clamp(-1, 1), frame), src)
        per_call = 2 if guidance_scale != 1.0 else 1
        for key, edit in edits.items():
            changed = [i for i, s in enumerate(sources) if not edit.is_identity(s)]
            z_out, out = z_recon.clone(), recon.clone()
            if changed:
                idx = torch.tensor(changed, device=z0.device)
                cond_e, scale = self.guided(self.edited(take(cond, changed), edit, [sources[i] for i in changed],
                                                        x0[idx]), guidance_scale)
                z_new = self.render(code.take(changed), cond_e, guidance_scale=scale, progress=progress,
                                    precision=render_precision)
                z_out[idx] = z_new
                out[idx] = self.crop_back(self.decode(z_new).clamp(-1, 1), frame)
                render_forwards[changed] += steps_rendered * per_call
            result.translations[key] = self._to_raw(out)
            result.change_mse[key] = mse_per_image(out, src)
            if self.latent:
                result.latent_change_mse[key] = mse_per_image(z_out, z0)
        result.render_forwards = render_forwards
        return result

    @torch.no_grad()
    def sweep_skip(self, images: Sequence[np.ndarray], source: str | Sequence[str], edit: EditLike,
                   skips: Sequence[int], *, inversion: InversionSettings | None = None, guidance_scale: float = 1.0,
                   generator: Generators = None, progress: bool = False, render_precision: str = "fp32") -> SkipSweep:
        """One edit rendered from several T_skip (DIFFusion §4.2: edits of decreasing strength, from the
        highest T_skip down), all from one inversion: the images are inverted from the smallest T_skip, the
        reconstruction's path under their own condition gives the point each later start restarts from
        (`Code.restart`), and the edited condition is rendered from each. `inversion.skip` is ignored.
        `render_precision`: as in `translate` (the edits only; inversion and reconstruction stay fp32)."""
        from dataclasses import replace

        check_render_precision(render_precision)
        sources = [source] * len(images) if isinstance(source, str) else list(source)
        skips = sorted(set(int(k) for k in skips), reverse=True)
        if not skips:
            raise PhenolensError("a T_skip sweep needs at least one T_skip")
        inversion = replace(inversion or InversionSettings(), skip=min(skips))
        inversion.check()
        edit = self.as_edit(edit)
        with self.inference():
            path: dict[int, torch.Tensor] = {}
            x0, frame, src, _, cond, code, _, recon = self._invert_and_reconstruct(
                images, sources, inversion, generator, progress, trajectory=path, guidance_scale=guidance_scale)
            sweep = SkipSweep(skips=skips, reconstructions=self._to_raw(recon), recon_mse=mse_per_image(recon, src))
            changed = [i for i, s in enumerate(sources) if not edit.is_identity(s)]
            idx = torch.tensor(changed, dtype=torch.long, device=x0.device)
            cond_e, scale = self.guided(self.edited(take(cond, changed), edit, [sources[i] for i in changed],
                                                    x0[idx]), guidance_scale) if changed else (None, guidance_scale)
            for k in skips:
                out = recon.clone()
                if changed:
                    z = self.render(code.restart(k, path[k]).take(changed), cond_e, guidance_scale=scale,
                                    progress=progress, precision=render_precision)
                    out[idx] = self.crop_back(self.decode(z).clamp(-1, 1), frame)
                sweep.outputs[k] = self._to_raw(out)
                sweep.change_mse[k] = mse_per_image(out, src)
            return sweep

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, conditions: Sequence[str], steps: int = 50,
                 guidance_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
        """Images in [-1, 1] rendered from diffusion-space noise (shape from `code_shape`) by DDIM."""
        with self.inference():
            code = Code(x=noise.to(self.device), steps=steps)
            z = self.render(code, self.condition(None, conditions), guidance_scale, progress)
            return self.decode(z).clamp(-1, 1)

    def _to_raw(self, x: torch.Tensor) -> list[np.ndarray]:
        raw = self.normalizer.from_model(x.float().cpu().numpy())
        return [np.asarray(r, dtype=np.float32) for r in raw]


def _tensors(condition: Condition):
    """The per-image tensors of a condition (nested dicts included), to count its rows."""
    for value in condition.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            yield value
        elif isinstance(value, dict):
            yield from _tensors(value)


def _inversion_from(inversion: InversionSettings | None, legacy: dict) -> InversionSettings:
    """The inversion settings, also from the keyword arguments of the earlier API (steps=, inversion=,
    iters=), which scripts may still pass."""
    legacy.pop("targets", None)  # the earlier name of `edits`, handled by the caller
    unknown = set(legacy) - {"steps", "iters", "inversion", "skip", "tol", "solver", "warm_start"}
    if unknown:
        raise TypeError(f"translate() got unexpected keyword argument(s) {', '.join(sorted(unknown))}")
    if inversion is not None and not isinstance(inversion, InversionSettings):
        legacy = dict(legacy, inversion=inversion)
        inversion = None
    base = inversion or InversionSettings()
    if not legacy:
        return base
    from dataclasses import replace

    fields = {("method" if k == "inversion" else k): v for k, v in legacy.items()}
    return replace(base, **fields)


class NamedConditionModel(CounterfactualModel):
    """A method conditioned on the condition's name alone (PhenDiff, Phen-LDiff): label i is the i-th
    condition of phenolens.json, label n (= number of conditions) the null condition, and an edit renders
    under another condition. A subclass says how labels enter its network (`label_condition`)."""

    def label_condition(self, labels: torch.Tensor) -> Condition:
        raise NotImplementedError

    @property
    def null_label(self) -> int:
        return len(self.info.conditions)

    def labels(self, conditions: Sequence[str], option: str = "condition") -> torch.Tensor:
        return torch.tensor([self.info.condition_index(c, option) for c in conditions], device=self.device)

    def condition(self, x0, source):
        return self.label_condition(self.labels(source, "--from"))

    def null_condition(self, n: int) -> Condition:
        return self.label_condition(torch.full((n,), self.null_label, dtype=torch.long, device=self.device))

    def parse_edit(self, text: str) -> Edit:
        from phenolens.methods.edits import target_of

        if text in self.info.conditions:  # a condition's name, as --to takes it (even one holding "=")
            return ToCondition(text)
        try:
            target = target_of(text)
        except ValueError as err:
            raise PhenolensError(f"--edit: {err}") from None
        self.info.condition_index(target, "--to")
        return ToCondition(target)

    def edited(self, condition, edit, source, x0):
        if not isinstance(edit, ToCondition):
            raise PhenolensError(f"edit {edit.label!r}: a {self.info.method} model edits by condition only (to=...)")
        return self.label_condition(self.labels([edit.target] * len(source), "--to"))
