"""DIFFusion (paper 004): minimal counterfactuals by arithmetic on image embeddings.

Method, as in the paper's §3:

1. **A diffusion decoder conditioned on an image embedding** c = E(x). The paper's is Kandinsky 2.2
   (CLIP image embeddings); the embedded default here is phenolens' own pixel UNet conditioned on the
   L2-normalised code of a semantic encoder trained with it (`phenolens train --method diffusion`: the
   networks of DiffEx's semantic model, `phenolens.models.semantic`, with the code scaled to length 1 and
   without DiffEx's KL term; with `--classifier` its scores join the code, as in DiffEx). The paper's own
   decoder is `phenolens finetune --method kandinsky` (`phenolens.methods.kandinsky`); both share the
   arithmetic below (`EmbeddingArithmetic`).
2. **Inversion** into per-step noise maps (edit-friendly DDPM, the core's `--inversion ef-ddpm`), so that
   the image is recovered exactly under its own embedding.
3. **Conditioning arithmetic** (eqs. 6-7): ĉ = c + ω·Δc with Δc = E[E(x_target)] − E[E(x_source)], the
   difference of the two conditions' mean embeddings, every embedding L2-normalised first (`ClassMeans`,
   over `--mean-images` images per condition). ĉ is used as it is, not normalised again (the paper
   does not say it renormalises). Any pair of conditions of a dose series works, not only two classes.
4. **Sampling** from T − T_skip with the inverted noise maps under ĉ (eq. 8: the core's render from the
   code's own step); T_skip sets how closely the counterfactual keeps to the input.

An edit is `to=high,omega=2` (`TowardCondition`); a bare condition name takes the model's ω.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from phenolens.errors import PhenolensError
from phenolens.methods.diffex import SemanticConditionModel, load_semantic_model
from phenolens.methods.edits import Edit, parse_fields
from phenolens.models.store import ModelInfo

DEFAULT_OMEGA = 2.0  # the paper's ω for all its datasets but AFHQ (1.0)
DEFAULT_MEAN_IMAGES = 50  # paper §4: the class means stop improving (LPIPS) near 50 images
MEANS_WEIGHTS = "class_means.safetensors"
MEANS_INFO = "class_means.json"


@dataclass(frozen=True)
class ClassMeans:
    """E[E(x)] per condition over L2-normalised embeddings (eq. 7's terms), and the images behind each."""

    means: Mapping[str, torch.Tensor] = field(compare=False)
    images: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    def delta(self, source: str, target: str) -> torch.Tensor:
        """Δc = mean(target) − mean(source) (eq. 7)."""
        for name in (source, target):
            if name not in self.means:
                raise PhenolensError(f"condition {name!r}: no mean embedding (none of its images were given; the "
                                     f"means cover {', '.join(self.means)})")
        return self.means[target] - self.means[source]

    def save(self, out: Path) -> list[str]:
        """class_means.safetensors (one tensor per condition) + class_means.json (the images averaged)."""
        from safetensors.torch import save_file

        from phenolens.atomic import write_json_atomic

        tmp = out / f".{MEANS_WEIGHTS}.tmp"
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.means.items()}, str(tmp))
        tmp.replace(out / MEANS_WEIGHTS)
        write_json_atomic(out / MEANS_INFO, {k: list(v) for k, v in self.images.items()})
        return [MEANS_WEIGHTS, MEANS_INFO]

    @classmethod
    def load(cls, folder: Path) -> "ClassMeans":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / MEANS_WEIGHTS).is_file():
            raise PhenolensError(f"{folder}: holds no class means ({MEANS_WEIGHTS})")
        images = json.loads((folder / MEANS_INFO).read_text()) if (folder / MEANS_INFO).is_file() else {}
        return cls(load_file(str(folder / MEANS_WEIGHTS)), {k: tuple(v) for k, v in images.items()})


@dataclass(frozen=True)
class TowardCondition:
    """Move an image's embedding towards TARGET by ω times the difference of the class means (eq. 6).
    The means travel with the edit, so an edit is a complete value (worker processes need nothing else)."""

    target: str
    omega: float
    means: ClassMeans | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"to={self.target},omega={self.omega:g}"

    @property
    def target_condition(self) -> str:
        return self.target

    def is_identity(self, source: str) -> bool:
        return source == self.target or self.omega == 0


class EmbeddingArithmetic:
    """DIFFusion's edit on any decoder conditioned on an image embedding (§3.2, eqs. 6-7), shared by the
    embedded model (`DIFFusion`) and the Kandinsky 2.2 back-end (`methods.kandinsky.Kandinsky`).

    A class provides `embedding(x0)`, the L2-normalised embedding c = E(x) of images in [-1, 1] (eq. 7
    averages those), and `embedding_condition(c, reference)`, the network's condition for embeddings c
    (REFERENCE: the same images' own condition, for a decoder that needs more than the direction, e.g.
    the length of the image's own embedding). This mixin does the rest: the class means, ω, the edit
    `to=B,omega=W` and ĉ = c + ω·Δc. It comes before the CounterfactualModel base in the class's bases."""

    omega: float = DEFAULT_OMEGA
    class_means: ClassMeans | None = None

    def embedding(self, x0: torch.Tensor) -> torch.Tensor:
        """c = E(x) of images in [-1, 1], L2-normalised (§3.2: "normalize ... with L2 norm")."""
        raise NotImplementedError

    def embedding_condition(self, c: torch.Tensor, reference: Mapping | None = None) -> dict:
        """The network's condition for (edited) embeddings C of the images whose own condition is REFERENCE."""
        raise NotImplementedError

    @torch.no_grad()
    def mean_embeddings(self, images: Mapping[str, Sequence], batch_size: int = 32) -> ClassMeans:
        """Eq. 7's class means: IMAGES maps a condition to (path, raw CHW image) pairs of one shape per
        batch; each mean is over their L2-normalised embeddings."""
        means, names = {}, {}
        for condition, items in images.items():
            if not items:
                continue
            total = None
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                x0, _ = self.to_model_space([raw for _, raw in chunk])
                c = self.embedding(x0.to(self.device)).float().sum(0)
                total = c if total is None else total + c
            means[condition] = (total / len(items)).cpu()
            names[condition] = tuple(str(path) for path, _ in items)
        return ClassMeans(means, names)

    def use_class_means(self, means: ClassMeans, omega: float | None = None) -> None:
        """The means eq. 7 reads, and the ω a bare condition name (`--to high`) is edited with."""
        if omega is not None:
            check_omega(omega)
            self.omega = float(omega)
        self.class_means = means

    def parse_edit(self, text: str) -> Edit:
        """`to=B,omega=w`, or a bare condition name B (ω: the model's, `use_class_means`)."""
        try:
            fields = parse_fields(text) if text not in self.info.conditions else {"to": text}
            if "to" not in fields or set(fields) - {"to", "omega"}:
                raise ValueError
            omega = float(fields.get("omega", self.omega))
        except ValueError:
            raise PhenolensError(f"edit {text!r}: a DIFFusion model edits towards a condition; write to=B,omega=W "
                                 "or a condition's name") from None
        self.info.condition_index(fields["to"], "--to")
        check_omega(omega)
        if self.class_means is None:
            raise PhenolensError(f"edit {text!r}: the class means are not computed yet (translate computes them "
                                 "from --mean-images images per condition)")
        return TowardCondition(fields["to"], omega, self.class_means)

    def edited(self, condition, edit, source, x0):
        """ĉ = c + ω·(mean(target) − mean(source)) per image (eqs. 6-7), as the network's condition."""
        if not isinstance(edit, TowardCondition):
            raise PhenolensError(f"edit {edit.label!r}: a DIFFusion model edits towards a condition (to=B,omega=W)")
        means = edit.means or self.class_means
        if means is None:
            raise PhenolensError(f"edit {edit.label!r}: no class means to move along")
        c = self.embedding(x0)
        delta = torch.stack([means.delta(s, edit.target) for s in source]).to(c.device, c.dtype)
        return self.embedding_condition(c + edit.omega * delta, condition)


class DIFFusion(EmbeddingArithmetic, SemanticConditionModel):
    """A pixel UNet conditioned on an image embedding (the embedded default of DIFFusion).

    Trained with condition dropout (`--cond-dropout`, default 0.1) the embedding is sometimes replaced by
    the null code (all zeros: no image embedding has length 0), so classifier-free guidance can amplify an
    edit; as in the paper (App. B.3) the guidance applies to inversion and generation alike."""

    guide_inversion = True

    def __init__(self, unet, encoder, classifier, scheduler, info: ModelInfo, device: str | None = None,
                 model_dir: Path | None = None):
        super().__init__(unet, encoder, classifier, scheduler, info, device, model_dir)
        self.omega = DEFAULT_OMEGA
        self.class_means: ClassMeans | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | None = None) -> "DIFFusion":
        unet, encoder, classifier, scheduler, info = load_semantic_model(
            model_dir, "diffusion", "a DIFFusion model (`phenolens train --method diffusion`)", need_classifier=False)
        return cls(unet, encoder, classifier, scheduler, info, device=device, model_dir=Path(model_dir))

    # ------------------------------------------------------------------------------ the method
    def embedding(self, x0: torch.Tensor) -> torch.Tensor:
        """c = E(x) of images in [-1, 1]: the semantic code, length 1 (§3, "normalize ... with L2 norm")."""
        return F.normalize(self.semantic_code(x0), dim=-1)

    def embedding_condition(self, c: torch.Tensor, reference: Mapping | None = None) -> dict:
        """The UNet's condition: ĉ as it is (not normalised again), through the encoder's embedding layer."""
        return {"class_labels": self.encoder.embed(c)}

    def condition(self, x0: torch.Tensor | None, source: Sequence[str]) -> dict:
        """An image's own condition is its embedding; there is none without an image."""
        if x0 is None:
            raise PhenolensError("a DIFFusion model renders embeddings of real images; it does not generate from "
                                 "noise alone (give images to translate)")
        return self.embedding_condition(self.embedding(x0))

    def null_condition(self, n: int) -> dict:
        """The unconditional condition: the null code (zeros), which training put in with p = cond_dropout."""
        if not self.info.cond_dropout:
            raise PhenolensError("this DIFFusion model was trained without condition dropout, so it has no "
                                 "unconditional mode: use --guidance-scale 1 (or train with --cond-dropout 0.1)")
        z = torch.zeros(n, self.encoder.sem_dim, device=self.device, dtype=next(self.encoder.parameters()).dtype)
        return {"class_labels": self.encoder.embed(z)}


def check_omega(omega: float) -> None:
    if not math.isfinite(omega):
        raise PhenolensError(f"--omega {omega}: must be a finite number (the paper uses 1 to 2)")


__all__ = ["ClassMeans", "DIFFusion", "EmbeddingArithmetic", "TowardCondition", "DEFAULT_OMEGA", "DEFAULT_MEAN_IMAGES"]
