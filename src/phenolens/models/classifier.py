"""Small image classifiers built from transformers configs (no pretrained weights).

They are the judges of a translation: a classifier trained on the real images of every condition
should assign an image translated to condition c to c (DIFFusion's "success ratio"; PhenDiff checks
the same by eye). Built from `ResNetConfig`, scaled down for small crops, trained from scratch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def build_classifier(n_channels: int, n_classes: int, width: int = 16):
    """A 3-stage ResNet (BasicBlocks) from a transformers config, random weights."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=n_channels, embedding_size=width, hidden_sizes=[width, 2 * width, 4 * width],
                          depths=[1, 1, 1], layer_type="basic", num_labels=n_classes, downsample_in_first_stage=False)
    return ResNetForImageClassification(config)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int = 400,
                     batch_size: int = 32, lr: float = 2e-3, seed: int = 0, progress: bool = True,
                     model=None, build=None, channel_dropout: float = 0.0):
    """Train on images in [-1, 1] (BCHW) with flips / 90° rotations; returns the model in eval mode.

    `channel_dropout` blanks each channel of a training image with that probability (one is always
    kept), so that the classifier learns the cue of every stain instead of the single easiest one:
    a classifier that sees one cue can only ever be explained by that cue.

    By default a fresh `build_classifier` ResNet is trained. `model` trains a given (random-weight)
    transformers image classifier instead, and `build(n_channels, n_classes)` builds one after the
    seed is set, so that its random initialisation is reproducible too (the oracle ensemble uses it).
    """
    if model is not None and build is not None:
        raise ValueError("give either model= or build=, not both")
    # the initial weights and the dropout masks depend on SEED only, and the caller's RNG is untouched
    cuda = [images.device.index if images.device.index is not None else torch.cuda.current_device()] \
        if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: it seeds every GPU too
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        return _train(images, labels, n_classes, steps, batch_size, lr, seed, progress, model, build,
                      channel_dropout)


def blank_channels(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """X with each channel of each image set to -1 (no signal) with probability P, one channel always kept."""
    drop = torch.rand(x.shape[:2], generator=gen) < p
    keep = torch.randint(x.shape[1], (x.shape[0],), generator=gen)
    drop[torch.arange(x.shape[0]), keep] = False
    return torch.where(drop[:, :, None, None].to(x.device), torch.full_like(x, -1.0), x)


def _train(images, labels, n_classes, steps, batch_size, lr, seed, progress, model, build, channel_dropout=0.0):
    """The loop of `train_classifier`, run under its seeded, forked RNG."""
    gen = torch.Generator().manual_seed(seed)
    if model is None:
        model = (build or build_classifier)(images.shape[1], n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc="classifier", disable=None if progress else True):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = images[idx]
        if torch.rand(1, generator=gen) < 0.5:
            x = x.flip(-1)
        x = torch.rot90(x, int(torch.randint(4, (1,), generator=gen)), dims=(-2, -1))
        if channel_dropout > 0:
            x = blank_channels(x, channel_dropout, gen)
        loss = F.cross_entropy(model(pixel_values=x).logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Predicted class per image (images in [-1, 1], BCHW)."""
    out = [model(pixel_values=images[i:i + batch_size]).logits.argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).cpu().numpy()


@torch.no_grad()
def predict_proba(model, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Softmax class probabilities per image, (B, n_classes): ensembles average these."""
    out = [model(pixel_values=images[i:i + batch_size]).logits.float().softmax(1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).cpu().numpy()


@torch.no_grad()
def recalibrate_batchnorm(model, images: torch.Tensor, batch_size: int = 64, seed: int = 0):
    """Re-estimate BatchNorm running statistics on `images` with the final weights; returns the
    model in eval mode.

    After a short training the running averages (momentum 0.1) still mix statistics of earlier,
    quite different weights; deep narrow nets (MobileNetV2, EfficientNet) then collapse in eval
    mode to one output for every image. A forward pass in train mode with a cumulative average
    (momentum None) gives the population statistics, as SWA's `update_bn` does. The images are
    shuffled: batches of one condition (files are listed by condition) would leave the
    between-condition spread out of the variances.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    momenta = [m.momentum for m in norms]
    model.eval()  # only the BatchNorm layers in training mode: dropout stays off and draws nothing
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(images), batch_size):
        model(pixel_values=images[order[i:i + batch_size].to(images.device)])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()
