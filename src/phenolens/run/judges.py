"""Judges trained on the real images: success ratio and classifier-feature FID/KID of a run.

The oracle ensemble (`phenolens.measure.oracles`) is trained on the real reference images of every
condition (a fifth held out to report its accuracy), then asked which condition each translation,
and each untranslated source, shows. A translation that worked is assigned to its target; its
source should not be. FID/KID use the ResNet member's pooled features.

It takes plain values (index.csv rows, the model's channels and normalisation, the reference images
per condition), not `run.measure`'s objects, so `run/measure.py` can call it without a loop back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from phenolens.run.index import reference_of


@dataclass
class Judges:
    """An oracle ensemble trained on real images, the normalisation it reads them with, its training
    images and labels (BCHW in [-1, 1], class indices), and what to report of it."""

    oracles: object
    normalizer: object
    images: object
    labels: np.ndarray
    summary: dict
    conditions: list[str]


def train_judges(by_condition: dict[str, list], conditions: list[str], size: tuple[int, int], *,
                 channels: list[int] | None = None, normalization: dict | None = None, max_reference: int = 200,
                 steps: int = 300, progress: bool = True) -> Judges:
    """The oracle ensemble of CONDITIONS (in that order), trained on at most MAX_REFERENCE real images per
    condition of BY_CONDITION (ImageRecords), read at SIZE; a fifth is held out to report its accuracy."""
    from phenolens.data.io import read_image
    from phenolens.data.normalize import Normalizer, load_normalized
    from phenolens.data.records import pick_evenly
    from phenolens.measure.oracles import OracleEnsemble

    ref_paths, labels = [], []
    for ci, c in enumerate(conditions):
        picked = pick_evenly(by_condition.get(c, []), max_reference)
        ref_paths += [r.path for r in picked]
        labels += [ci] * len(picked)
    normalizer = (Normalizer.from_dict(normalization) if normalization
                  else Normalizer.fit(read_image(p, channels=channels)[0] for p in ref_paths))
    x = load_normalized(ref_paths, normalizer, channels, size)
    y = np.array(labels)
    held = np.random.default_rng(0).random(len(y)) < 0.2
    oracles = OracleEnsemble.train(x[~held], y[~held], len(conditions), steps=steps, seed=0, progress=progress)
    summary = dict(members=list(oracles.members), steps_per_member=steps, trained_on=int((~held).sum()),
                   heldout_accuracy=oracles.accuracy(x[held], y[held]) if held.any() else {})
    return Judges(oracles, normalizer, x, y, summary, list(conditions))


def judge_metrics(rows: Sequence[dict], run_dir: Path, sources: dict[str, Path], by_condition: dict[str, list],
                  conditions: list[str], *, channels: list[int] | None = None, normalization: dict | None = None,
                  max_reference: int = 200, steps: int = 300, progress: bool = True) -> dict:
    """Train the oracles on at most MAX_REFERENCE real images per condition (STEPS each) and judge the run.

    ROWS are index.csv's rows, SOURCES maps their source_path to the file, BY_CONDITION holds the
    reference ImageRecords; CHANNELS and NORMALIZATION are the model's (phenolens.json), the latter
    fitted on the picked reference images when the model records none.
    """
    from phenolens.data.io import read_image
    from phenolens.data.normalize import load_normalized
    from phenolens.measure.image_metrics import distribution_metrics

    first = read_image(next(iter(sources.values())), channels=channels)[0]
    size = tuple(first.shape[1:])
    judges = train_judges(by_condition, conditions, size, channels=channels, normalization=normalization,
                          max_reference=max_reference, steps=steps, progress=progress)
    oracles, normalizer, x, y = judges.oracles, judges.normalizer, judges.images, judges.labels
    out: dict = dict(judges.summary)
    per_target: dict = {}
    for source_condition in dict.fromkeys(r["source_condition"] for r in rows):
        src_keys = list(dict.fromkeys(r["source_path"] for r in rows if r["source_condition"] == source_condition))
        src = load_normalized([sources[k] for k in src_keys], normalizer, channels, size)
        src_feats = oracles.features(src)
        ref_of = reference_of(rows)
        for tc in list(conditions) + [t for t in ref_of if t not in conditions]:  # edits: their own targets
            pairs = {r["source_path"]: r for r in rows
                     if r["source_condition"] == source_condition and r["target_condition"] == tc}
            if tc == source_condition or not pairs or ref_of.get(tc, tc) not in conditions:
                continue
            ti = conditions.index(ref_of.get(tc, tc))  # the class the oracles should see
            gen = load_normalized([run_dir / pairs[k]["output_path"] for k in src_keys if k in pairs], normalizer,
                                  None, size)  # outputs hold the model's channels only
            real = x[y == ti]
            per_target[f"{source_condition} -> {tc}"] = dict(
                n=len(gen),
                success_ratio_translations=oracles.success_ratio(gen, ti),
                success_ratio_untranslated_sources=oracles.success_ratio(src, ti),
                classifier_fid_kid_translations=distribution_metrics(oracles.features(real), oracles.features(gen)),
                classifier_fid_kid_sources=distribution_metrics(oracles.features(real), src_feats),
            )
    out["targets"] = per_target
    return out
