"""`phenolens classifier train | import | evaluate`: the classifier DiffEx explains, and how good it is.

Why: DiffEx explains a classifier that separates the conditions (paper 001, §3). Many biologists
have none; this trains one from the images and their conditions, in one of the small shapes the
oracle ensemble already uses (`phenolens.measure.oracles`), and says how good it is on images it
never saw: a classifier near chance has nothing to explain.

A share of each condition (`heldout`, drawn with the seed) is kept out of training and scored;
OUT gets the classifier (`ConditionClassifier.save_pretrained`) and heldout.csv (one row per held-out
image: its condition, the predicted one, the probability of each class). OUT is a phenolens output
folder (kind "classifier"): a finished one is only replaced with --overwrite, which removes what
phenolens wrote there and nothing else. Training takes minutes on a CPU, so it does not resume.

`import_classifier` brings a user's own classifier in (a transformers folder or a TorchScript file,
see `phenolens.models.condition_classifier`), checking what is declared against the network itself;
`evaluate_classifier` scores any classifier on labelled images, and refuses data whose conditions
are not its classes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from phenolens.atomic import write_csv_atomic
from phenolens.data.records import ImageRecord, training_records
from phenolens.errors import PhenolensError
from phenolens.folders import OutputFolder, check_apart
from phenolens.measure.oracles import ORACLE_SHAPES
from phenolens.models.condition_classifier import (CLASSIFIER_FILE, ClassifierInfo, ConditionClassifier,
                                                   load_network, network_logits)

logger = logging.getLogger(__name__)
KIND = "classifier"
HELDOUT_TABLE = "heldout.csv"


@dataclass
class ClassifierSettings:
    shape: str = "resnet18"  # one of ORACLE_SHAPES
    steps: int = 600  # optimiser steps of batch_size images (flips and 90° rotations)
    batch_size: int = 32
    lr: float = 2e-3  # AdamW peak, one-cycle schedule (as the oracles)
    heldout: float = 0.2  # share of each condition kept out of training and scored
    seed: int = 0
    channel_dropout: float = 0.0  # chance of blanking each channel of a training image (one always kept)

    def check(self) -> None:
        if not 0 <= self.channel_dropout < 1:
            raise PhenolensError(f"--channel-dropout {self.channel_dropout}: must be a probability from 0 to below 1")
        if self.shape not in ORACLE_SHAPES:
            raise PhenolensError(f"--shape {self.shape!r}: choose one of {', '.join(ORACLE_SHAPES)}")
        if self.steps < 1:
            raise PhenolensError(f"--steps {self.steps}: must be at least 1")
        if self.batch_size < 1:
            raise PhenolensError(f"--batch-size {self.batch_size}: must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise PhenolensError(f"--lr {self.lr}: must be a number above 0")
        if not 0 <= self.heldout < 1:
            raise PhenolensError(f"--heldout {self.heldout}: must be a share from 0 (score nothing) to below 1")
        if self.seed < 0:
            raise PhenolensError(f"--seed {self.seed}: must be 0 or more")


def split_heldout(records: Sequence[ImageRecord], conditions: Sequence[str], share: float,
                  seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, held out): round(share x n) images of each condition, at least one when share > 0,
    drawn with SEED; file order is kept within each part."""
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for cond in conditions:
        idx = [i for i, r in enumerate(records) if r.condition == cond]
        if share > 0:
            if len(idx) < 2:
                raise PhenolensError(f"condition {cond!r} has {len(idx)} image(s); a held-out split needs at least "
                                     "2 per condition (or --heldout 0)")
            n = min(max(1, round(share * len(idx))), len(idx) - 1)
            held.update(int(i) for i in rng.permutation(idx)[:n])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def _centre_crops(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    crops = []
    for img in images:
        h, w = img.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2
        crops.append(img[:, top:top + size, left:left + size])
    return torch.stack(crops)


def train_condition_classifier(data: str | Path, out: str | Path, settings: ClassifierSettings, *,
                               conditions: Sequence[str] | None = None, channels: Sequence[int] | None = None,
                               overwrite: bool = False, device: str | None = None, progress: bool = True,
                               invocation: Sequence[str] | None = None) -> dict:
    """Train, score on the held-out share, write OUT; returns the evaluation (also in OUT)."""
    from phenolens.data.dataset import ImageSet
    from phenolens.measure.oracles import build_oracle
    from phenolens.models.classifier import recalibrate_batchnorm, train_classifier

    settings.check()
    data, out = Path(data), Path(out)
    records, conditions = training_records(data, conditions)
    check_apart(out, inputs=[data, *(r.path for r in records)])
    folder = _open_out(out, overwrite)
    train_recs, held_recs = split_heldout(records, conditions, settings.heldout, settings.seed)
    train_set = ImageSet(train_recs, None, list(conditions), channels=channels, augment=False, progress=progress)
    size = train_set.size
    x = _centre_crops(train_set.images, size)
    logger.info("classifier: %s on %d images of %d px, %d conditions (%s); %d held out", settings.shape, len(x), size,
                len(conditions), ", ".join(conditions), len(held_recs))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def build(n_channels: int, n_classes: int):
        return build_oracle(settings.shape, n_channels, n_classes, size)

    model = train_classifier(x.to(device), train_set.labels.to(device), len(conditions), steps=settings.steps,
                             batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed, progress=progress,
                             build=build, channel_dropout=settings.channel_dropout)
    model = recalibrate_batchnorm(model, x.to(device), seed=settings.seed)
    model.config.id2label = dict(enumerate(conditions))
    model.config.label2id = {c: i for i, c in enumerate(conditions)}
    info = ClassifierInfo(n_channels=train_set.n_channels, image_size=size, normalization=train_set.normalizer.to_dict(),
                          channels=list(channels) if channels is not None else None, shape=settings.shape,
                          training=dict(data=str(data), conditions=list(conditions), images=len(x),
                                        settings=asdict(settings), command=list(invocation or [])))
    classifier = ConditionClassifier(model, info)
    rows: list[dict] = []
    if held_recs:
        held = ImageSet(held_recs, None, list(conditions), normalizer=train_set.normalizer, channels=channels,
                        augment=False, progress=False)
        small = [r.path for r, im in zip(held.records, held.images) if min(im.shape[-2:]) < size]
        if small:  # the classifier reads crops of `size` and never resizes (it would change the cells' scale)
            raise PhenolensError(f"{small[0]}: is smaller than the {size} px crops the classifier is trained on "
                                 "(the smallest training image); give images of one size, or crop them")
        proba = classifier.predict_proba(_centre_crops(held.images, size))
        info.evaluation = evaluation(proba, held.labels.numpy(), conditions)
        for rec, p, label in zip(held.records, proba, held.labels.tolist()):
            rows.append(dict(path=str(rec.path), condition=conditions[label], predicted=conditions[int(p.argmax())],
                             **{f"p_{c}": f"{v:.4f}" for c, v in zip(conditions, p)}))
    if overwrite:
        folder.clear()  # the new classifier is trained: only now does the old one (what phenolens wrote) go
    written = classifier.save_pretrained(out)
    folder.record(*written)
    if rows:
        write_csv_atomic(out / HELDOUT_TABLE, rows, list(rows[0]))
        folder.record(HELDOUT_TABLE)
    return info.evaluation


def evaluation(proba: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy overall and per class, and the confusion counts (true class -> predicted class)."""
    pred = proba.argmax(1)
    per_class = {c: float((pred[labels == k] == k).mean()) for k, c in enumerate(classes) if (labels == k).any()}
    confusion = {c: {d: int(((labels == k) & (pred == j)).sum()) for j, d in enumerate(classes)}
                 for k, c in enumerate(classes)}
    return dict(images=int(len(labels)), accuracy=float((pred == labels).mean()), per_class=per_class,
                confusion=confusion, chance=float(np.bincount(labels, minlength=len(classes)).max() / len(labels)))


def format_evaluation(ev: dict) -> str:
    """One line for the terminal."""
    if not ev:
        return "no held-out images (--heldout 0): accuracy not measured"
    per = ", ".join(f"{c} {100 * a:.0f} %" for c, a in ev["per_class"].items())
    line = (f"held-out accuracy {100 * ev['accuracy']:.1f} % on {ev['images']} images ({per}; "
            f"the largest class alone: {100 * ev['chance']:.0f} %)")
    if "stains" in ev:
        line += "\n" + "\n".join(f"  file channel {c}: {100 * v['only']:.1f} % with this stain alone, "
                                  f"{100 * v['without']:.1f} % without it" for c, v in ev["stains"].items())
    return line


def _open_out(out: Path, overwrite: bool) -> OutputFolder:
    """OUT as a classifier folder. With OVERWRITE its earlier classifier stays until the caller clears
    the folder, once the new one's inputs have been read and checked."""
    folder = OutputFolder.open(out, KIND)
    if (out / CLASSIFIER_FILE).is_file() and not overwrite:
        raise PhenolensError(f"OUT {out}: holds a classifier already; pass --overwrite to replace it "
                             "(only what phenolens wrote there is removed) or choose another folder")
    return folder


def _per_channel(values: Sequence[float], n: int, option: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise PhenolensError(f"{option}: give one value, or one per channel ({n}); got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise PhenolensError(f"{option}: values must be finite numbers")
    return values


def import_classifier(source: str | Path, out: str | Path, *, size: int, classes: Sequence[str] | None = None,
                      channels: Sequence[int] | None = None, offset: Sequence[float] = (0.0,),
                      scale: Sequence[float] = (65535.0,), overwrite: bool = False) -> ConditionClassifier:
    """Declare a user's classifier (a transformers folder or a TorchScript file) and copy it into OUT.

    What is declared is checked against the network: it is run once on SIZE px images of its channel
    count, and must give one logit per class. Classes: CLASSES, else a transformers config's own labels
    (not the placeholder LABEL_0 ...). Input = (raw - OFFSET) / SCALE per channel."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise PhenolensError(f"SOURCE {source}: no such file or folder")
    fmt = "torchscript" if source.is_file() else "transformers"
    model = load_network(source, fmt)
    if size < 1:
        raise PhenolensError(f"--size {size}: must be a positive number of pixels")
    n_channels = len(channels) if channels else getattr(getattr(model, "config", None), "num_channels", None)
    if not n_channels:
        raise PhenolensError(f"SOURCE {source}: its channel count is unknown; give --channels (the file channels "
                             "it reads, in order)")
    try:
        with torch.no_grad():
            logits = network_logits(model, torch.zeros(2, n_channels, size, size), fmt)
    except Exception as err:  # a user's network: whatever it raises, say which input it refused
        raise PhenolensError(f"SOURCE {source}: fails on a batch of {n_channels}-channel {size} px images "
                             f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                             "check --channels and --size") from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 2:
        raise PhenolensError(f"SOURCE {source}: returns {getattr(logits, 'shape', type(logits).__name__)} for 2 "
                             "images; expected logits of shape (images, classes)")
    n_out = int(logits.shape[1])
    if classes is None and fmt == "transformers":
        labels = [str(model.config.id2label[i]) for i in range(len(model.config.id2label))]
        if labels != [f"LABEL_{i}" for i in range(len(labels))]:
            classes = labels
    if not classes:
        raise PhenolensError(f"SOURCE {source}: give --classes, its {n_out} class names in output order")
    classes = list(classes)
    if len(classes) != n_out:
        raise PhenolensError(f"--classes names {len(classes)} class(es) ({', '.join(classes)}) but SOURCE {source} "
                             f"has {n_out} outputs")
    if len(set(classes)) != len(classes) or n_out < 2:
        raise PhenolensError(f"--classes {', '.join(classes)}: need 2 or more distinct names")
    offsets = _per_channel(offset, n_channels, "--offset")
    scales = _per_channel(scale, n_channels, "--scale")
    if any(v <= 0 for v in scales):
        raise PhenolensError("--scale: values must be above 0")
    from phenolens.data.normalize import Normalizer

    # input = (raw - offset) / scale is Normalizer's map with low = offset - scale, high = offset + scale
    normalizer = Normalizer(low=[o - s for o, s in zip(offsets, scales)], high=[o + s for o, s in zip(offsets, scales)])
    check_apart(out, inputs=[source])
    folder = _open_out(out, overwrite)
    if overwrite:
        folder.clear()
    if fmt == "transformers":
        model.config.id2label = dict(enumerate(classes))
        model.config.label2id = {c: i for i, c in enumerate(classes)}
    info = ClassifierInfo(n_channels=n_channels, image_size=int(size), normalization=normalizer.to_dict(),
                          channels=list(channels) if channels else None, shape="", format=fmt,
                          classes=classes if fmt == "torchscript" else None, clip=False,
                          training=dict(imported_from=str(source.resolve()), offset=offsets, scale=scales))
    classifier = ConditionClassifier(model, info)
    folder.record(*classifier.save_pretrained(out))
    return classifier


def evaluate_classifier(classifier_dir: str | Path, data: str | Path, *, per_stain: bool = False,
                        progress: bool = True) -> tuple[dict, list[dict]]:
    """Accuracy of a classifier on labelled images (every condition of DATA must be one of its classes);
    returns the evaluation and one row per image.

    PER_STAIN adds, for each channel the classifier reads, its accuracy with that stain alone (the
    others set to 0, no signal) and without it: which stains it uses, and so which cues an
    explanation of it can possibly find."""
    from tqdm.auto import tqdm

    from phenolens.data.io import read_image
    from phenolens.data.records import conditions_in_order, discover

    clf = ConditionClassifier.from_pretrained(classifier_dir)
    records = discover(data)
    unknown = [c for c in conditions_in_order(records) if c not in clf.classes]
    if unknown:
        raise PhenolensError(f"DATA {data}: condition(s) {', '.join(unknown)} are not classes of the classifier "
                             f"{classifier_dir} (its classes: {', '.join(clf.classes)})")
    rows, probas, labels = [], [], []
    n = clf.info.n_channels
    stain_probas: dict[tuple[str, int], list[np.ndarray]] = {(kind, c): [] for c in range(n)
                                                             for kind in ("only", "without")}
    for i in tqdm(range(0, len(records), 64), desc="classify", disable=None if progress else True):
        chunk = records[i:i + 64]
        raws = [read_image(r.path, channels=clf.info.channels)[0] for r in chunk]
        names = [str(r.path) for r in chunk]
        proba = clf.predict_proba(clf.prepare(raws, names))
        for c in range(n) if per_stain else ():
            keep = np.arange(n) == c
            for kind, blank in (("only", ~keep), ("without", keep)):
                stain_probas[kind, c].append(
                    clf.predict_proba(clf.prepare([np.where(blank[:, None, None], 0, r) for r in raws], names)))
        for rec, p in zip(chunk, proba):
            rows.append(dict(path=str(rec.path), condition=rec.condition, predicted=clf.classes[int(p.argmax())],
                             **{f"p_{c}": f"{v:.4f}" for c, v in zip(clf.classes, p)}))
        probas.append(proba)
        labels += [clf.classes.index(r.condition) for r in chunk]
    ev = evaluation(np.concatenate(probas), np.array(labels), clf.classes)
    if per_stain:
        channels = clf.info.channels or list(range(n))
        ev["stains"] = {str(channels[c]): {kind: float((np.concatenate(stain_probas[kind, c]).argmax(1)
                                                        == np.array(labels)).mean()) for kind in ("only", "without")}
                        for c in range(n)}
    return ev, rows
