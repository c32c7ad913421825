"""DiffEx (Bourou et al. 2025, paper 001): explain a classifier with a classifier-aware semantic space.

Method, as in the paper's §3:

1. **A classifier-aware semantic latent space** (§3.1). A semantic encoder maps an image x to a code,
   and the classifier's scores are appended to it: z_sem = [encoder(x), C(x)]. A DDIM is conditioned
   on z_sem (eq. 1, the DDPM loss with the condition z_sem) and trained with a KL term that keeps the
   classifier's opinion of the reconstruction x' equal to that of x, D_KL[C(x') || C(x)] (eq. 2),
   weighted by λ₁ (eq. 3). `semantic_loss` is eqs. 1-3; how z_sem enters the UNet is
   `phenolens.models.semantic`.
2. **Stochastic encoding** (Diff-AE §3.2): given z_sem, a real image is inverted into x_T by the
   core's inversion (exact fixed-point DDIM by default), and render(x_T, z_sem) is its reconstruction.
3. **Directions** in z_sem (§3.2, `phenolens.methods.diffex_directions`, learnt by `phenolens
   directions`): an edit moves an image's z_sem along direction k by α (eq. 4) and renders its x_T
   under the moved code (`DirectionEdit`, written `direction=k,alpha=a`); their **ranking** (§3.3,
   Algorithm 1) is `rank_directions`.

The classifier is a `ConditionClassifier` (`phenolens classifier train | import`); a copy is saved in
the model folder (classifier/), so the model is complete on its own. Images pass from the diffusion
model's normalisation to the classifier's through raw units (`classifier_input`), both per-channel
affine maps, so the classifier's scores are differentiable in the diffusion model's pixels.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from phenolens.data.normalize import Normalizer
from phenolens.diffusion.conditions import network_fn
from phenolens.errors import PhenolensError
from phenolens.launch import launched_world
from phenolens.methods.core import CounterfactualModel
from phenolens.methods.edits import Edit
from phenolens.models.condition_classifier import ConditionClassifier
from phenolens.models.store import MODEL_FILES, ModelInfo, load_model, save_model
from phenolens.models.unet import unet_downsample_factor

logger = logging.getLogger(__name__)

ENCODER_DIR = "encoder"
CLASSIFIER_DIR = "classifier"
DIFFEX_FILES = (ENCODER_DIR, CLASSIFIER_DIR, *MODEL_FILES)  # what a DiffEx model folder holds
# λ₁ of eq. 3: the paper does not give its value. 0.1 keeps the KL (at most log K nats, on x̂₀) from
# outweighing the diffusion loss early in training; `--lambda-cls 0` trains without it (DiffEx Table 1's
# ablation in the must-show).
DEFAULT_LAMBDA_CLS = 0.1
DEFAULT_CODE_DIM = 64


def classifier_input(x: torch.Tensor, model_norm: Normalizer, classifier: ConditionClassifier,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
    """Images in the diffusion model's [-1, 1] -> the classifier's input (its normalisation and crop
    size), differentiably: raw = model⁻¹(x), input = classifier(raw). KEEP (B, C, 1, 1), 1 or 0 per
    image and stain, sets the stains at 0 to 0 raw units (no signal), as `classifier evaluate
    --per-stain` does."""
    raw = model_norm.from_model(x)
    if keep is not None:
        raw = raw * keep
    y = classifier.normalizer.to_model(raw, clip=classifier.info.clip)
    s = int(classifier.info.image_size)
    h, w = y.shape[-2:]
    if min(h, w) < s:
        raise PhenolensError(f"images of {h}x{w} px are smaller than the {s} px crops the classifier reads")
    top, left = (h - s) // 2, (w - s) // 2
    return y[..., top:top + s, left:left + s]


class SemanticDiffusion(nn.Module):
    """What trains (eq. 3): the UNet and the semantic encoder. The classifier stays frozen outside;
    CLASSIFIER_DIGEST (`ConditionClassifier.digest`) names it in the resume fingerprint."""

    def __init__(self, unet, encoder, classifier_digest: str = ""):
        super().__init__()
        self.unet = unet
        self.encoder = encoder
        self.classifier_digest = classifier_digest

    @property
    def config(self) -> dict:
        """Both networks' configs and the classifier (the trainer's resume fingerprint reads `config`)."""
        return {"unet": dict(self.unet.config), "encoder": dict(self.encoder.config),
                "classifier": self.classifier_digest}


def semantic_code(encoder, classifier: ConditionClassifier | None, model_norm: Normalizer, x0: torch.Tensor,
                  views: str = "whole") -> torch.Tensor:
    """z_sem = [encoder(x), C(x)] (§3.1): the code, then the classifier's class probabilities.

    Without a classifier (DIFFusion's embedded model, `phenolens.methods.diffusion_embedding`) z_sem is
    the encoder's code alone; an encoder with `unit_norm` returns z_sem scaled to length 1.

    VIEWS "per-stain" (our extension, not the paper's) also puts in the classifier's probabilities with
    each stain alone, z_sem = [encoder(x), C(x|stain 1), ..., C(x|stain n), C(x)]: a classifier that
    reads several stains then gives the semantic space one classifier-aware axis per stain instead of a
    single one for all cues together, so that a direction can move one stain's cue without the others.
    C(x) stays last, where eq. 2's KL term reads it. Every view is scored in one classifier call."""
    if classifier is None:
        return _unit(encoder, encoder.encode(x0))
    masks = view_masks(classifier.info.n_channels, views).to(x0.device, x0.dtype)
    b = x0.shape[0]
    with torch.no_grad():
        keep = masks.repeat_interleave(b, dim=0)[:, :, None, None]  # view-major: view 0's images, view 1's, ...
        x = classifier_input(x0.repeat(len(masks), 1, 1, 1), model_norm, classifier, keep)
        scores = classifier.logits(x).float().softmax(-1).view(len(masks), b, -1).transpose(0, 1).reshape(b, -1)
    return _unit(encoder, torch.cat([encoder.encode(x0), scores.to(x0.dtype)], dim=-1))


def _unit(encoder, z: torch.Tensor) -> torch.Tensor:
    return F.normalize(z, dim=-1) if getattr(encoder, "unit_norm", False) else z


CLASSIFIER_VIEWS = ("whole", "per-stain")


def view_masks(n_channels: int, views: str) -> torch.Tensor:
    """The stains each classifier view of z_sem keeps, one row per view in z_sem's order: each stain
    alone (per-stain only), then every stain."""
    alone = [torch.eye(n_channels)] if views == "per-stain" else []
    return torch.cat([*alone, torch.ones(1, n_channels)])


def n_scores(classifier: ConditionClassifier | None, views: str) -> int:
    """How many classifier numbers z_sem holds under VIEWS (`semantic_code`); none without a classifier."""
    if classifier is None:
        return 0
    return len(classifier.classes) * len(view_masks(classifier.info.n_channels, views))


def semantic_loss(net: SemanticDiffusion, noise_scheduler, x0: torch.Tensor, generator: torch.Generator, *,
                  classifier: ConditionClassifier | None, model_norm: Normalizer, lambda_cls: float,
                  views: str = "whole", drop: torch.Tensor | None = None) -> torch.Tensor:
    """L_sem = L_diffusion + λ₁ L_cls (eqs. 1-3).

    L_diffusion (eq. 1): ||ε_θ(x_t, t, z_sem) - ε||² (or the v / x₀ target the scheduler names).
    L_cls (eq. 2): D_KL[C(x') || C(x)]. The paper's x' is the reconstruction; a full sampling pass per
    training step is unaffordable, so x' here is the model's own estimate x̂₀ at the sampled step t
    (from its prediction, clipped to [-1, 1]), which is the reconstruction's one-step approximation.
    Without a classifier (DIFFusion's embedded model) there is no L_cls. DROP (B,) marks the images
    whose code is replaced by the null code (classifier-free condition dropout, DIFFusion only).
    """
    b = x0.shape[0]
    num_t = int(noise_scheduler.config.num_train_timesteps)
    t = torch.randint(0, num_t, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    x_t = noise_scheduler.add_noise(x0, noise, t)
    z_sem = semantic_code(net.encoder, classifier, model_norm, x0, views)
    if drop is not None:  # condition dropout (DIFFusion's embedded model): the null code, zeros
        z_sem = torch.where(drop.to(z_sem.device).view(-1, 1), torch.zeros_like(z_sem), z_sem)
    pred = network_fn(net.unet)(x_t, t, {"class_labels": net.encoder.embed(z_sem)})
    abar = noise_scheduler.alphas_cumprod.to(x0.device)[t].float().view(-1, 1, 1, 1)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target, x0_hat = noise, (x_t - (1 - abar).sqrt() * pred) / abar.sqrt()
    elif kind == "v_prediction":
        target, x0_hat = noise_scheduler.get_velocity(x0, noise, t), abar.sqrt() * x_t - (1 - abar).sqrt() * pred
    else:
        raise PhenolensError(f"prediction_type {kind!r}: DiffEx trains with epsilon or v_prediction")
    loss = F.mse_loss(pred.float(), target.float())
    if lambda_cls > 0 and classifier is not None:
        p_real = z_sem[:, -len(classifier.classes):].detach().float().clamp_min(1e-8)
        logp_hat = classifier.logits(classifier_input(x0_hat.clamp(-1, 1), model_norm, classifier)).float() \
            .log_softmax(-1)
        # D_KL[C(x') || C(x)] = Σ C(x') (log C(x') - log C(x))  (eq. 2)
        kl = (logp_hat.exp() * (logp_hat - p_real.log())).sum(-1).mean()
        loss = loss + lambda_cls * kl
    return loss


@dataclass(frozen=True)
class DirectionEdit:
    """Move an image's semantic code along learnt direction k by α (eq. 4) and render its x_T under it."""

    direction: int
    alpha: float

    @property
    def label(self) -> str:
        return f"direction={self.direction},alpha={self.alpha:g}"

    @property
    def target_condition(self) -> str:
        return ""  # a direction names no condition; the ranking says which class it moves towards

    def is_identity(self, source: str) -> bool:
        return self.alpha == 0


class SemanticConditionModel(CounterfactualModel):
    """A UNet conditioned on each image's own semantic code (DiffEx's z_sem, DIFFusion's embedding): the
    networks, the optional classifier, saving, and the network call. Subclasses say what an edit does."""

    def __init__(self, unet, encoder, classifier: ConditionClassifier | None, scheduler, info: ModelInfo,
                 device: str | None = None, model_dir: Path | None = None):
        super().__init__(info, scheduler, device)
        self.unet = unet.to(self.device).eval()
        self.encoder = encoder.to(self.device).eval()
        self.classifier = classifier
        if classifier is not None:  # it is read (or explained), never trained
            classifier.model.to(self.device).eval().requires_grad_(False)
        self.model_dir = model_dir
        self.views = (info.semantic or {}).get("classifier_views", "whole")  # models saved before it: whole

    def save_pretrained(self, model_dir: str | Path) -> None:
        save_model(Path(model_dir), self.unet, self.scheduler, self.info, extra=model_parts(self.encoder,
                                                                                              self.classifier))

    def semantic_code(self, x0: torch.Tensor) -> torch.Tensor:
        """z_sem of images in [-1, 1] (§3.1)."""
        return semantic_code(self.encoder, self.classifier, self.normalizer, x0.to(self.device), self.views)

    def network(self):
        """ε_θ(x_t, t, z_sem) (eq. 1): the UNet, z_sem entering as its `class_labels` embedding."""
        return network_fn(self.unet)

    def spatial_factor(self) -> int:
        return unet_downsample_factor(self.unet)


class DiffEx(SemanticConditionModel):
    """A trained DiffEx semantic model: UNet conditioned on z_sem, semantic encoder, classifier, and
    (after `use_directions`) the learnt directions its edits follow."""

    def __init__(self, unet, encoder, classifier: ConditionClassifier, scheduler, info: ModelInfo,
                 device: str | None = None, model_dir: Path | None = None):
        super().__init__(unet, encoder, classifier, scheduler, info, device, model_dir)
        self.directions = None  # DirectionModels, after use_directions
        self.directions_info = None

    def use_directions(self, path: str | Path) -> None:
        """Load the directions of PATH (`phenolens directions`), refusing those learnt in another model."""
        from phenolens.methods.diffex_directions import load_directions, model_identity

        models, info = load_directions(Path(path))
        if self.model_dir is not None and info.model_id != model_identity(self.model_dir):
            raise PhenolensError(f"DIRECTIONS {path}: were learnt in the semantic space of another model "
                                 f"({info.model}), not {self.model_dir}")
        if info.dim != self.encoder.sem_dim:
            raise PhenolensError(f"DIRECTIONS {path}: move {info.dim}-value codes; this model's have "
                                 f"{self.encoder.sem_dim}")
        self.directions, self.directions_info = models.to(self.device).eval().requires_grad_(False), info

    # ----------------------------------------------------------------------------- persistence
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | None = None) -> "DiffEx":
        unet, encoder, classifier, scheduler, info = load_semantic_model(model_dir, "diffex", "a DiffEx model")
        return cls(unet, encoder, classifier, scheduler, info, device=device, model_dir=Path(model_dir))

    # ------------------------------------------------------------------------------ the method
    def condition(self, x0: torch.Tensor | None, source: Sequence[str]) -> dict:
        """An image's own condition is its semantic code; there is none without an image."""
        if x0 is None:
            raise PhenolensError("a DiffEx model renders codes of real images; it does not generate from noise "
                                 "alone (give images to translate)")
        return {"class_labels": self.encoder.embed(self.semantic_code(x0))}

    def null_condition(self, n: int) -> dict:
        raise PhenolensError("a DiffEx model has no unconditional mode: use --guidance-scale 1")

    def parse_edit(self, text: str) -> Edit:
        """`direction=k,alpha=a` (k counted from 0)."""
        from phenolens.methods.edits import parse_fields

        try:
            fields = parse_fields(text)
            if set(fields) != {"direction", "alpha"}:
                raise ValueError
            edit = DirectionEdit(int(fields["direction"]), float(fields["alpha"]))
        except ValueError:
            raise PhenolensError(f"edit {text!r}: a DiffEx model edits along learnt directions; write "
                                 "direction=K,alpha=A (directions from `phenolens directions`)") from None
        self._check_direction(edit)
        return edit

    def _check_direction(self, edit: DirectionEdit) -> None:
        if self.directions is None:
            raise PhenolensError(f"edit {edit.label!r}: no directions loaded (learn them with `phenolens directions`)")
        if not 0 <= edit.direction < self.directions.k:
            raise PhenolensError(f"edit {edit.label!r}: direction {edit.direction} does not exist; there are "
                                 f"{self.directions.k} (0 to {self.directions.k - 1})")

    def edited(self, condition, edit, source, x0):
        """z_sem of x0 moved by D_k(z, α) (eq. 4), as the UNet's condition."""
        if not isinstance(edit, DirectionEdit):
            raise PhenolensError(f"edit {edit.label!r}: a DiffEx model edits along learnt directions only")
        self._check_direction(edit)
        z = self.directions.shift(self.semantic_code(x0), edit.direction, edit.alpha)
        return {"class_labels": self.encoder.embed(z)}


def load_semantic_model(model_dir: str | Path, method: str, what: str, need_classifier: bool = True):
    """(unet, encoder, classifier or None, scheduler, info) of a semantic model folder whose phenolens.json
    names METHOD (WHAT says it in errors); the classifier is loaded when the folder holds one."""
    from phenolens.models.semantic import SemanticEncoder

    model_dir = Path(model_dir)
    unet, scheduler, info = load_model(model_dir, device="cpu")
    if info.method != method:
        raise PhenolensError(f"{model_dir}: is a {info.method!r} model, not {what}")
    for part in (ENCODER_DIR, *([CLASSIFIER_DIR] if need_classifier else [])):
        if not (model_dir / part).is_dir():
            raise PhenolensError(f"{model_dir}: {what} is incomplete ({part}/ missing)")
    try:
        encoder = SemanticEncoder.from_pretrained(model_dir / ENCODER_DIR, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise PhenolensError(f"{model_dir / ENCODER_DIR}: cannot load the semantic encoder "
                             f"({str(err).splitlines()[0]})") from None
    classifier = ConditionClassifier.from_pretrained(model_dir / CLASSIFIER_DIR) \
        if (model_dir / CLASSIFIER_DIR).is_dir() else None
    return unet, encoder, classifier, scheduler, info


def model_parts(encoder, classifier: ConditionClassifier | None) -> dict:
    """The parts a DiffEx folder holds besides unet/ and scheduler/, as `save_model`'s writers (no
    classifier/ for a DIFFusion model trained without one)."""
    parts = {ENCODER_DIR: lambda path: encoder.save_pretrained(path, safe_serialization=True)}
    if classifier is not None:
        parts[CLASSIFIER_DIR] = lambda path: classifier.save_pretrained(path)
    return parts


# --------------------------------------------------------------------------------- training
@dataclass
class DiffExTrainSettings:
    """What `phenolens train --method diffex` decides besides the optimiser loop (see TrainConfig)."""

    classifier: str = ""  # the classifier folder (`phenolens classifier train | import`)
    preset: str = "tiny"
    size: int | None = None  # training crop side; None = the data's own size
    conditions: list[str] | None = None
    code_dim: int = DEFAULT_CODE_DIM
    lambda_cls: float = DEFAULT_LAMBDA_CLS
    classifier_views: str = "whole"  # "per-stain": also the classifier's scores with each stain alone
    prediction_type: str = "epsilon"
    skip_bad: bool = False


def check_classifier_fits(classifier: ConditionClassifier, classifier_dir: Path, channels: Sequence[int] | None,
                          size: int | None = None) -> None:
    """The classifier must read what the model is trained on (its classes are checked against the data's
    conditions before): its file channels are the training channels, its crops no larger than the
    training crops (SIZE; None before the images are read)."""
    mine = list(channels) if channels is not None else None
    if classifier.info.channels != mine:
        raise PhenolensError(f"--classifier {classifier_dir}: reads file channels "
                             f"{classifier.info.channels or 'all'}, but training uses {mine or 'all'} (--channels); "
                             "give the channels the classifier was trained on")
    if size is not None and classifier.info.image_size > size:
        raise PhenolensError(f"--classifier {classifier_dir}: reads {classifier.info.image_size} px crops, larger than "
                             f"the {size} px training crops")


def train_diffex(data: str | Path, model_dir: str | Path, settings: DiffExTrainSettings, config, *,
                 channels: Sequence[int] | None = None, resume: bool = False, overwrite: bool = False,
                 command: str = "", progress: bool = True, method: str = "diffex") -> ModelInfo:
    """Train a DiffEx semantic model on DATA into MODEL_DIR with the shared trainer (EMA, checkpoints,
    exact resume, Accelerate); the classifier's classes name the conditions, in its order.

    METHOD "diffusion" trains the same networks as DIFFusion's embedded model: the code is scaled to
    length 1 (its image embedding), there is no KL term, and the classifier is optional (without one the
    data's conditions are the model's)."""
    embedded = method == "diffusion"
    if embedded:
        settings = replace(settings, lambda_cls=0.0)
    from phenolens import __version__
    from phenolens.data.dataset import ImageSet
    from phenolens.data.records import training_records
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.models.semantic import SemanticEncoder, build_semantic_unet, embed_dim_of
    from phenolens.models.unet import preset_downsample_factor
    from phenolens.train.inputs import size_line, training_inputs
    from phenolens.train.trainer import check_config, is_main_process, open_model_folder, train

    model_dir = Path(model_dir)
    check_config(config)
    if config.cond_dropout and not embedded:
        raise PhenolensError("--cond-dropout: a DiffEx model is conditioned on each image's own code and has no "
                             "unconditional mode; use 0")
    if settings.lambda_cls < 0:
        raise PhenolensError(f"--lambda-cls {settings.lambda_cls}: must be 0 or more")
    if settings.code_dim < 1:
        raise PhenolensError(f"--code-dim {settings.code_dim}: must be at least 1")
    if settings.classifier_views not in CLASSIFIER_VIEWS:
        raise PhenolensError(f"--classifier-views {settings.classifier_views}: choose {' or '.join(CLASSIFIER_VIEWS)}")
    classifier_dir = Path(settings.classifier) if settings.classifier else None
    if classifier_dir is None and not embedded:
        raise PhenolensError("--method diffex needs --classifier, the classifier to explain (make one with "
                             "`phenolens classifier train DATA OUT`)")
    classifier = ConditionClassifier.from_pretrained(classifier_dir) if classifier_dir else None
    records, conditions = training_records(data, settings.conditions)
    if classifier is not None:
        if sorted(classifier.classes) != sorted(conditions):
            raise PhenolensError(f"--classifier {classifier_dir}: its classes ({', '.join(classifier.classes)}) are "
                                 f"not the data's conditions ({', '.join(conditions)})")
        conditions = settings.conditions or classifier.classes  # without --conditions, the classifier's order
        check_classifier_fits(classifier, classifier_dir, channels)  # before reading the images
    folder = open_model_folder(model_dir, inputs=training_inputs(data, records), resume=resume, overwrite=overwrite)
    images = ImageSet(records, settings.size, conditions, channels=channels, skip_bad=settings.skip_bad,
                      augment=getattr(config, "augment", True), progress=progress,
                      size_multiple=preset_downsample_factor(settings.preset))
    if classifier is not None:
        check_classifier_fits(classifier, classifier_dir, channels, images.size)
    main = is_main_process()
    if main:
        (logger.warning if images.resized_up else logger.info)(size_line(images, settings.size))
    if overwrite:
        folder.clear()
    with torch.random.fork_rng(devices=[]):  # initial weights from --seed only; the caller's RNG untouched
        torch.random.default_generator.manual_seed(config.seed)
        unet = build_semantic_unet(settings.preset, channels=images.n_channels, size=images.size)
        encoder = SemanticEncoder(in_channels=images.n_channels, code_dim=settings.code_dim,
                                  n_scores=n_scores(classifier, settings.classifier_views), embed_dim=embed_dim_of(unet),
                                  unit_norm=embedded)
    scheduler = make_scheduler(prediction_type=settings.prediction_type)
    info = ModelInfo(
        conditions=list(conditions), n_channels=images.n_channels, image_size=images.size,
        normalization=images.normalizer.to_dict(), method=method, channels=list(channels) if channels else None,
        preset=settings.preset, prediction_type=settings.prediction_type,
        training=dict(command=command, data=str(Path(data).resolve()), settings=asdict(settings),
                      config=asdict(config), num_processes=launched_world()),
        version=__version__, input_stats=dict(images.input_stats), cond_dropout=float(config.cond_dropout),
        size_rule="resize-up" if images.resized_up else "own",
        semantic=dict(code_dim=settings.code_dim, classes=classifier.classes if classifier else list(conditions),
                      lambda_cls=settings.lambda_cls, classifier_views=settings.classifier_views,
                      classifier=str(classifier_dir.resolve()) if classifier_dir else "",
                      classifier_digest=classifier.digest() if classifier else "", unit_norm=embedded),
    )
    device_classifier: dict = {}

    def loss_fn(net, noise_scheduler, x0, labels, generator):
        if not device_classifier and classifier is not None:  # the trainer picks the device: follow the networks
            classifier.model.to(x0.device)
            device_classifier["done"] = True
        # the trainer replaced the labels of the dropped images by the null label (p = --cond-dropout)
        return semantic_loss(net, noise_scheduler, x0, generator, classifier=classifier,
                             model_norm=images.normalizer, lambda_cls=settings.lambda_cls,
                             views=settings.classifier_views, drop=labels >= len(conditions))

    def on_save(trained: SemanticDiffusion, step: int) -> None:
        info.training["steps_done"] = step
        folder.record(*(DIFFEX_FILES if classifier else [f for f in DIFFEX_FILES if f != CLASSIFIER_DIR]))
        save_model(model_dir, trained.unet, scheduler, info, extra=model_parts(trained.encoder, classifier))

    if classifier is not None:
        classifier.model.requires_grad_(False)  # frozen: eq. 3 trains the UNet and the encoder only
    train(SemanticDiffusion(unet, encoder, info.semantic["classifier_digest"]), scheduler, images, model_dir, config,
          null_label=len(conditions), resume=resume, overwrite=overwrite, loss_fn=loss_fn, on_save=on_save, progress=progress, out_folder=folder)
    return info
