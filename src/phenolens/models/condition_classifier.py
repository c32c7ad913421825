"""A classifier of the conditions, saved and loaded like a model: the classifier DiffEx explains.

DiffEx (paper 001, §3) starts from a classifier that separates the conditions and asks, with images,
what it has learnt: its scores become part of the semantic code of a diffusion autoencoder (eq. 1)
and the directions found in that code are ranked by how much they move it (Algorithm 1). So the
classifier must be usable on raw files and on a diffusion model's images alike, with gradients.

Layout of a classifier folder (transformers' `save_pretrained`, safetensors only, plus one file)::

    config.json                 the network (a transformers image classifier); class names in id2label
    model.safetensors           its weights
    phenolens_classifier.json   which file channels it reads, how raw intensities become its input
                                (per-channel percentiles, `Normalizer`), its crop size, how it was
                                trained and its held-out accuracy

A user's own classifier comes in through `phenolens classifier import` (`import_classifier`): a
transformers image-classifier folder (copied as it is) or a TorchScript file (copied to model.pt; its
forward takes a (B, C, H, W) float tensor and returns logits), with its class names, the file channels
it reads, its crop size and its input transform declared. The input transform is per channel affine,
input = (raw - offset) / scale (raw/65535 is offset 0, scale 65535; ImageNet-style mean and sd on
[0, 1] images are offset mean x 65535, scale sd x 65535), which `Normalizer` represents exactly.

Class names come from the data (id2label) or the user, never from code. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from phenolens.atomic import write_json_atomic
from phenolens.data.normalize import Normalizer
from phenolens.errors import PhenolensError

CLASSIFIER_FILE = "phenolens_classifier.json"
CLASSIFIER_FILES = ("config.json", "model.safetensors", CLASSIFIER_FILE)  # what `save_pretrained` writes
TORCHSCRIPT_FILE = "model.pt"  # an imported TorchScript classifier's copy
FORMATS = ("transformers", "torchscript")


@dataclass
class ClassifierInfo:
    """Everything needed to run the network on real files, besides its weights and class names."""

    n_channels: int
    image_size: int  # the crop side it reads; larger images are centre-cropped
    normalization: dict[str, Any]  # `Normalizer.to_dict()`: raw -> [-1, 1], per channel
    channels: list[int] | None = None  # file channels it reads, in order (--channels); None = all
    shape: str = "resnet18"  # the architecture (`phenolens.measure.oracles.ORACLE_SHAPES`); "" = imported
    format: str = "transformers"  # or "torchscript" (an imported model.pt)
    classes: list[str] | None = None  # a TorchScript classifier's class names (transformers: id2label)
    clip: bool = True  # inputs clipped to [-1, 1] as in training; False for an imported (raw - offset) / scale
    evaluation: dict[str, Any] = field(default_factory=dict)  # held-out accuracy, per class, images
    training: dict[str, Any] = field(default_factory=dict)  # data, conditions, steps, command line
    version: str = ""


class ConditionClassifier:
    """A trained transformers image classifier with the class names, channels and normalisation it needs."""

    def __init__(self, model: torch.nn.Module, info: ClassifierInfo) -> None:
        self.model = model.eval()
        self.info = info
        self.normalizer = Normalizer.from_dict(info.normalization)

    @property
    def classes(self) -> list[str]:
        """Class names in output order (declared, or the transformers config's id2label)."""
        if self.info.classes:
            return list(self.info.classes)
        id2label = self.model.config.id2label
        return [str(id2label[i]) for i in range(len(id2label))]

    # ------------------------------------------------------------------------------ saving, loading
    def save_pretrained(self, path: str | Path) -> list[str]:
        """Write the classifier into PATH atomically (temporary folder inside it, then renames, the
        info file last: it is what marks a complete classifier); returns the names written."""
        from phenolens import __version__

        from phenolens.models.store import apply_umask, fresh_tmp_folder

        path = Path(path)
        tmp = fresh_tmp_folder(path, "classifier")
        if self.info.format == "torchscript":
            torch.jit.save(self.model, str(tmp / TORCHSCRIPT_FILE))
            names = [TORCHSCRIPT_FILE, CLASSIFIER_FILE]
        else:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            self.model.save_pretrained(tmp, safe_serialization=True)
            names = list(CLASSIFIER_FILES)
        self.info.version = self.info.version or __version__
        write_json_atomic(tmp / CLASSIFIER_FILE, asdict(self.info))
        if (path / CLASSIFIER_FILE).is_file():
            (path / CLASSIFIER_FILE).unlink()
        for name in names:
            os.replace(tmp / name, path / name)
        shutil.rmtree(tmp, ignore_errors=True)
        apply_umask(*(path / name for name in names))
        return names

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "ConditionClassifier":
        """Load a folder written by `save_pretrained` (`phenolens classifier train`)."""
        path = Path(path)
        if not path.is_dir():
            raise PhenolensError(f"{path}: no such classifier folder")
        info_file = path / CLASSIFIER_FILE
        if not info_file.is_file():
            raise PhenolensError(f"{path}: not a phenolens classifier (no {CLASSIFIER_FILE}); train one with "
                                 "`phenolens classifier train DATA OUT`, or declare your own with "
                                 "`phenolens classifier import SOURCE OUT`")
        try:
            info = ClassifierInfo(**json.loads(info_file.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise PhenolensError(f"{info_file}: not a valid classifier description ({err})") from None
        if info.format not in FORMATS:
            raise PhenolensError(f"{info_file}: format {info.format!r} is not one of {', '.join(FORMATS)}")
        model = load_network(path / TORCHSCRIPT_FILE if info.format == "torchscript" else path, info.format)
        classifier = cls(model.to(device), info)
        if len(classifier.classes) < 2:
            raise PhenolensError(f"{path}: the classifier has {len(classifier.classes)} class(es); it needs 2 or more")
        return classifier

    def digest(self) -> str:
        """A digest of the weights and the declared input: what a model trained with this classifier
        records, so that a resume with another one is refused."""
        import hashlib

        h = hashlib.sha256(json.dumps([self.classes, self.info.normalization, self.info.channels,
                                       self.info.image_size], sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------------------ use
    def class_index(self, name: str, option: str = "class") -> int:
        if name not in self.classes:
            raise PhenolensError(f"{option} {name!r} is not a class of this classifier; it knows: "
                                 f"{', '.join(self.classes)}")
        return self.classes.index(name)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of images already in the classifier's space (normalised, its channels and
        size); differentiable, so a diffusion model can be trained or steered through it."""
        return network_logits(self.model, x, self.info.format)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Softmax probabilities (B, classes) of images in the classifier's space."""
        weight = next(iter(self.model.parameters()), None)  # a user's network may have none (a fixed rule)
        device = weight.device if weight is not None else torch.device("cpu")
        out = [self.logits(x[i:i + batch_size].to(device)).float().softmax(1).cpu()
               for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy()

    def prepare(self, raws: Sequence[np.ndarray], names: Sequence[str] | None = None) -> torch.Tensor:
        """Raw images (C, H, W, the file's units, its channels already picked) -> the classifier's input:
        normalised and centre-cropped to its size. An image smaller than that is refused, naming it."""
        s = self.info.image_size
        out = []
        for i, raw in enumerate(raws):
            name = names[i] if names is not None else f"image {i}"
            if raw.shape[0] != self.info.n_channels:
                raise PhenolensError(f"{name}: has {raw.shape[0]} channel(s); the classifier reads "
                                     f"{self.info.n_channels}")
            h, w = raw.shape[-2:]
            if min(h, w) < s:
                raise PhenolensError(f"{name}: is {h}x{w} px; the classifier reads crops of {s} px")
            top, left = (h - s) // 2, (w - s) // 2
            crop = raw[:, top:top + s, left:left + s]
            out.append(np.asarray(self.normalizer.to_model(crop, clip=self.info.clip), dtype=np.float32))
        return torch.from_numpy(np.stack(out))


def load_network(source: Path, fmt: str) -> torch.nn.Module:
    """The network of a classifier: a transformers image-classifier folder (safetensors weights only)
    or a TorchScript file; a clear error naming SOURCE otherwise."""
    if fmt == "torchscript":
        if not source.is_file():
            raise PhenolensError(f"{source}: no such TorchScript file")
        try:
            return torch.jit.load(str(source), map_location="cpu").eval()
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PhenolensError(f"{source}: not a TorchScript model ({first})") from None
    if not (source / "config.json").is_file():
        raise PhenolensError(f"{source}: no config.json; expected a transformers image-classifier folder "
                             "(save_pretrained) or a TorchScript file")
    if not (source / "model.safetensors").is_file():
        raise PhenolensError(f"{source}: model.safetensors is missing (only safetensors weights are loaded; "
                             "re-save with save_pretrained(..., safe_serialization=True))")
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per small file read is noise in phenolens' own output
    try:
        return AutoModelForImageClassification.from_pretrained(source, use_safetensors=True).eval()
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PhenolensError(f"{source}: cannot load it as a transformers image classifier ({first})") from None


def network_logits(model: torch.nn.Module, x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Logits of either kind of network: transformers' output object, or a TorchScript tensor (the first
    element of a tuple, or the "logits" entry of a dict)."""
    if fmt == "transformers":
        return model(pixel_values=x).logits
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif isinstance(out, dict):
        out = out["logits"]
    return out


__all__ = ["CLASSIFIER_FILE", "CLASSIFIER_FILES", "ClassifierInfo", "ConditionClassifier", "FORMATS",
           "load_network", "network_logits"]
