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
                     batch_size: int = 32, lr: float = 2e-3, seed: int = 0, progress: bool = True):
    """Train on images in [-1, 1] (BCHW) with flips / 90° rotations; returns the model in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_classifier(images.shape[1], n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc="classifier", disable=None if progress else True):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = images[idx]
        if torch.rand(1, generator=gen) < 0.5:
            x = x.flip(-1)
        x = torch.rot90(x, int(torch.randint(4, (1,), generator=gen)), dims=(-2, -1))
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
