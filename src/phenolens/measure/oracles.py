"""The oracle ensemble: independent judges of whether a translated image shows its target condition.

DIFFusion (Table 2) scores a translation by its *success ratio* (flip rate): the fraction of images
translated to condition c that classifiers trained only on real images assign to c. One classifier
can be fooled by artefacts it happens to be sensitive to, so DIFFusion uses an ensemble of
different architectures. Here: three small networks of the ResNet-18, MobileNetV2 and
EfficientNet-B0 shapes, built from transformers configs with random weights (nothing downloaded),
narrowed for small microscopy crops and trained from scratch on the dataset's real images.

Down-sampling is matched to the image size (see `total_stride`) so that the last feature map
keeps a few pixels for images from 32 to 512 px; ResNet's stem always down-samples 32×.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from phenolens.measure.image_metrics import ClassifierFeatures
from phenolens.models.classifier import predict_proba as _model_proba
from phenolens.models.classifier import recalibrate_batchnorm, train_classifier

#: The architectures of the ensemble, in order.
ORACLE_SHAPES = ("resnet18", "mobilenet_v2", "efficientnet_b0")

#: Default optimisation steps per member (batch 32): about a minute for all three on 800 images of
#: 48×48×4 on one CPU thread (55 s measured). Enough for clear phenotypes; raise it for subtle ones
#: (on the 4-condition demo simulation, held-out ensemble accuracy was 73 % at 120 steps, 94 % at 300).
DEFAULT_ORACLE_STEPS = 120


def width_scale(image_size: int) -> int:
    """Width multiplier for the oracles: small crops need narrow networks (and train fast)."""
    return 1 if image_size <= 64 else 2 if image_size <= 192 else 4


def total_stride(image_size: int) -> int:
    """Largest of 32/16/8 that leaves a last feature map of at least 3 px (8 for tiny images)."""
    for stride in (32, 16):
        if image_size // stride >= 3:
            return stride
    return 8


def build_oracle(shape: str, n_channels: int, n_classes: int, image_size: int):
    """One oracle with random weights, sized for `image_size` (the shorter image side)."""
    from transformers import (EfficientNetConfig, EfficientNetForImageClassification, MobileNetV2Config,
                              MobileNetV2ForImageClassification, ResNetConfig, ResNetForImageClassification)
    from transformers.models.efficientnet.modeling_efficientnet import round_filters

    scale = width_scale(image_size)
    stride = total_stride(image_size)
    if shape == "resnet18":
        width = 16 * scale  # ResNet-18 is width 64
        config = ResNetConfig(num_channels=n_channels, embedding_size=width,
                              hidden_sizes=[width, 2 * width, 4 * width, 8 * width], depths=[2, 2, 2, 2],
                              layer_type="basic", downsample_in_first_stage=False, num_labels=n_classes)
        return ResNetForImageClassification(config)
    if shape == "mobilenet_v2":
        # output_stride < 32 replaces the last stride-2 convolutions by dilated ones.
        config = MobileNetV2Config(num_channels=n_channels, image_size=image_size, depth_multiplier=0.25 * scale,
                                   expand_ratio=4.0 if scale == 1 else 6.0, output_stride=stride,
                                   finegrained_output=False,  # else the last layer stays 1280 wide
                                   classifier_dropout_prob=0.2, num_labels=n_classes)
        return MobileNetV2ForImageClassification(config)
    if shape == "efficientnet_b0":
        strides = [1, 2, 2, 2, 1, 2, 1]  # B0's block strides, after a stride-2 stem: 32× in all
        if stride <= 16:
            strides[5] = 1
        if stride <= 8:
            strides[3] = 1
        expand = 4 if scale == 1 else 6
        config = EfficientNetConfig(num_channels=n_channels, image_size=image_size, width_coefficient=0.25 * scale,
                                    depth_coefficient=0.5 if scale < 4 else 1.0, strides=strides,
                                    expand_ratios=[1] + [expand] * 6, dropout_rate=0.2, drop_connect_rate=0.0,
                                    batch_norm_momentum=0.1,  # torch convention (the default 0.99 is TF's)
                                    num_labels=n_classes)
        # The top conv has round_filters(1280) channels but its BatchNorm is sized by hidden_dim.
        config.hidden_dim = round_filters(config, 1280)
        return _unit_batchnorm(EfficientNetForImageClassification(config))
    raise ValueError(f"unknown oracle shape {shape!r}; choose from {', '.join(ORACLE_SHAPES)}")


def _unit_batchnorm(model):
    """BatchNorm scales 1 and shifts 0, for training EfficientNet from scratch.

    transformers initialises EfficientNet for loading pretrained weights: its BatchNorm scales are
    drawn from N(0, 0.02) like the convolutions, so each block shrinks activations ~50× and
    nothing trains. (Its N(0, 0.02) convolutions are fine before BatchNorm and, on the test task,
    trained faster than He-normal ones, so they are kept.)
    """
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return model


def _images(images) -> torch.Tensor:
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim != 4:
        raise ValueError(f"expected B×C×H×W images in [-1, 1], got shape {tuple(x.shape)}")
    return x.float()


@dataclass
class OracleEnsemble:
    """Classifiers of different shapes trained on real images; they vote on a translation's class."""

    members: dict[str, torch.nn.Module] = field(default_factory=dict)  # shape -> trained model (eval mode)
    n_classes: int = 2
    n_channels: int = 1

    @classmethod
    def train(cls, images, labels, n_classes: int, steps: int = DEFAULT_ORACLE_STEPS, seed: int = 0,
              shapes: tuple[str, ...] = ORACLE_SHAPES, batch_size: int = 32, lr: float = 2e-3,
              progress: bool = False) -> OracleEnsemble:
        """Train one oracle per shape (seed + i each) on real images (BCHW in [-1, 1]) and labels."""
        x = _images(images)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if len(y) != len(x):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"labels must be class indices in [0, {n_classes})")
        if not shapes:
            raise ValueError("the ensemble needs at least one oracle shape")
        size = min(x.shape[-2:])
        members = {}
        for i, shape in enumerate(shapes):
            def build(n_channels: int, n_out: int, shape: str = shape):
                return build_oracle(shape, n_channels, n_out, size)
            model = train_classifier(x, y, n_classes, steps=steps, batch_size=batch_size, lr=lr,
                                     seed=seed + i, progress=progress, build=build)
            members[shape] = recalibrate_batchnorm(model, x)
        return cls(members=members, n_classes=n_classes, n_channels=x.shape[1])

    def _check(self, images) -> torch.Tensor:
        x = _images(images)
        if x.shape[1] != self.n_channels:
            raise ValueError(f"the oracles were trained on {self.n_channels}-channel images, got {x.shape[1]}")
        return x

    def member_proba(self, images) -> dict[str, np.ndarray]:
        """Softmax probabilities (B, n_classes) of each member."""
        x = self._check(images)
        return {name: _model_proba(model, x) for name, model in self.members.items()}

    def predict_proba(self, images) -> np.ndarray:
        """Mean of the members' softmax probabilities, (B, n_classes)."""
        return np.mean(list(self.member_proba(images).values()), axis=0)

    def _vote(self, member_proba: dict[str, np.ndarray]) -> np.ndarray:
        probs = np.stack(list(member_proba.values()))  # members × B × classes
        votes = np.stack([np.bincount(row, minlength=self.n_classes) for row in probs.argmax(2).T])
        # Ties between equally voted classes go to the higher mean probability; it is < 1, so
        # 0.5 · mean never outweighs a whole vote.
        return (votes + 0.5 * probs.mean(0)).argmax(1)

    def predict(self, images) -> np.ndarray:
        """Majority vote of the members per image, ties broken by the mean probability."""
        return self._vote(self.member_proba(images))

    def judge(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(predict_proba, predict) from one pass of the members."""
        member_proba = self.member_proba(images)
        return np.mean(list(member_proba.values()), axis=0), self._vote(member_proba)

    def accuracy(self, images, labels) -> dict[str, float]:
        """Accuracy of each member and of the ensemble vote (key "ensemble") on labelled images."""
        y = np.asarray(labels)
        member_proba = self.member_proba(images)
        acc = {name: float((p.argmax(1) == y).mean()) for name, p in member_proba.items()}
        acc["ensemble"] = float((self._vote(member_proba) == y).mean())
        return acc

    def success_ratio(self, images, target_index: int) -> float:
        """Fraction of images the ensemble assigns to `target_index` (DIFFusion's success ratio)."""
        if not 0 <= target_index < self.n_classes:
            raise ValueError(f"target_index must be in [0, {self.n_classes}), got {target_index}")
        return float((self.predict(images) == target_index).mean())

    def feature_extractor(self, member: str | None = None) -> ClassifierFeatures:
        """Pooled penultimate features of one member (default: the first, the ResNet) for FID / KID."""
        name = member or next(iter(self.members))
        if name not in self.members:
            raise ValueError(f"no oracle {name!r}; members: {', '.join(self.members)}")
        return ClassifierFeatures(self.members[name], name=f"oracle:{name}")

    def features(self, images, member: str | None = None) -> np.ndarray:
        """(B, D) features of `member` (default the ResNet, D = 8 × its width) for FID / KID."""
        return self.feature_extractor(member)(self._check(images))
