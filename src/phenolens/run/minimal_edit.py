"""The minimal edit (DIFFusion §4.2, `phenolens translate --minimal-edit`): the weakest edit the judges see.

For each image and target, the edit is rendered from several T_skip, from the highest (closest to the
source) down, all from one inversion (`CounterfactualModel.sweep_skip`); the oracle ensemble trained on
real images (`run.judges.train_judges`) judges each, and the first one it assigns to the target is kept.
When none flips, the strongest (lowest T_skip) is kept and marked unflipped. index.csv then holds one row
per image and target at its minimal edit, with the T_skip, the ensemble's probability of the target and
the distance to the source (MSE, SSIM, and the distance between the oracle's features of source and
edit); sweep.csv holds every T_skip tried. LPIPS, the paper's distance, needs pretrained weights that
phenolens does not download; the oracle-feature distance stands in for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from phenolens.diffusion.inversion import InversionSettings
from phenolens.errors import PhenolensError
from phenolens.methods.core import Translation

DEFAULT_STRENGTHS = 10  # the paper's 10 edits per image
MINIMAL_COLUMNS = ["t_skip", "omega", "flipped", "flip_probability", "ssim", "oracle_feature_distance"]
SWEEP_COLUMNS = ["source_path", "source_condition", "target_condition", "edit", "t_skip", "flipped",
                 "flip_probability", "change_mse", "ssim"]
SWEEP_FILE = "sweep.csv"


def sweep_skips(steps: int, strengths: int = DEFAULT_STRENGTHS) -> list[int]:
    """The T_skip values tried, highest (weakest edit) first: STRENGTHS values evenly from 90 % of the
    schedule down to 0 (the whole schedule)."""
    if strengths < 1:
        raise ValueError(f"--strengths {strengths}: must be at least 1")
    top = int(round(0.9 * steps))
    values = np.linspace(top, 0, strengths) if strengths > 1 else np.array([0.0])
    return sorted({int(round(v)) for v in values if int(round(v)) < steps}, reverse=True)


@dataclass
class MinimalBatch:
    """What `minimal_edit_batch` returns: a Translation holding the chosen edits (keyed as the edits were
    given), the extra index.csv columns of each edit and image, and the sweep's rows."""

    translation: Translation
    columns: dict[str, list[dict]] = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)


def minimal_edit_batch(model, raws: list[np.ndarray], recs, edits: list, inversion: InversionSettings,
                       guidance_scale: float, generators, judges, skips: list[int],
                       omegas: list[float] | None = None, render_precision: str = "fp32") -> MinimalBatch:
    """One batch of sources (one shape): for each edit, the sweep over SKIPS and the first flip.

    OMEGAS (DIFFusion's edits only): the edit is also tried at each ω, weakest first; the edits are then
    ordered by ω, then by T_skip from the highest down, and the first the judges flip is kept (its ω in the
    `omega` column; the edit column names the strongest tried)."""
    from dataclasses import replace

    from phenolens.measure.image_metrics import ssim

    oracles, norm = judges.oracles, judges.normalizer
    sources = [r.condition for r in recs]
    as_judged = lambda images: torch.from_numpy(np.stack([norm.to_model(x) for x in images])).float()  # noqa: E731
    src = as_judged(raws)
    if tuple(src.shape[-2:]) != tuple(judges.images.shape[-2:]):
        raise PhenolensError(f"{recs[0].path}: {src.shape[-2]}x{src.shape[-1]} px, but the judges of --minimal-edit "
                             f"read {judges.images.shape[-2]}x{judges.images.shape[-1]} px images (the first "
                             "source's size); give sources of one size")
    src_features = oracles.features(src)
    result: Translation | None = None
    columns: dict[str, list[dict]] = {}
    sweep_rows: list[dict] = []
    for edit in edits:
        label = edit if isinstance(edit, str) else edit.label
        value = model.as_edit(edit)
        target = value.target_condition
        ti = judges.conditions.index(target)
        variants = [replace(value, omega=w) for w in sorted(omegas)] if omegas else [value]
        chosen: list[tuple | None] = [None] * len(raws)
        judged, outputs, change = {}, {}, {}
        for variant in variants:  # weakest ω first
            sweep = model.sweep_skip(raws, sources, variant, skips, inversion=inversion,
                                     guidance_scale=guidance_scale, generator=generators,
                                     render_precision=render_precision)
            if result is None:
                result = Translation(reconstructions=sweep.reconstructions, translations={}, recon_mse=sweep.recon_mse)
            omega = getattr(variant, "omega", None)
            for k in sweep.skips:  # highest T_skip (weakest edit) first
                key = (omega, k)
                x = as_judged(sweep.outputs[k])
                proba, predicted = oracles.judge(x)
                proba, flipped = proba[:, ti], predicted == ti
                similarity = np.atleast_1d(ssim(x.numpy(), src.numpy()))
                judged[key], outputs[key], change[key] = (proba, flipped, similarity, x), sweep.outputs[k], \
                    sweep.change_mse[k]
                for i, rec in enumerate(recs):
                    sweep_rows.append(dict(source_path=str(rec.path), source_condition=rec.condition,
                                           target_condition=target, edit=variant.label, t_skip=k,
                                           flipped=int(flipped[i]), flip_probability=f"{proba[i]:.4g}",
                                           change_mse=f"{float(sweep.change_mse[k][i]):.6g}",
                                           ssim=f"{float(similarity[i]):.4f}"))
                    if chosen[i] is None and flipped[i]:
                        chosen[i] = key
        strongest = list(judged)[-1]
        chosen = [key if key is not None else strongest for key in chosen]  # none flipped: the strongest
        result.translations[label] = [outputs[key][i] for i, key in enumerate(chosen)]
        result.change_mse[label] = np.array([change[key][i] for i, key in enumerate(chosen)])
        kept = torch.stack([judged[key][3][i] for i, key in enumerate(chosen)])
        distances = np.linalg.norm(oracles.features(kept) - src_features, axis=1)
        rows = []
        for i, key in enumerate(chosen):
            proba, flipped, similarity, _ = judged[key]
            rows.append(dict(t_skip=key[1], omega="" if key[0] is None else f"{key[0]:g}", flipped=int(flipped[i]),
                             flip_probability=f"{proba[i]:.4g}", ssim=f"{float(similarity[i]):.4f}",
                             oracle_feature_distance=f"{float(distances[i]):.4g}"))
        columns[label] = rows
    assert result is not None, "a minimal-edit batch needs at least one edit"
    result.inversion_forwards = np.full(len(raws), inversion.steps - min(skips), dtype=np.int64)
    return MinimalBatch(result, columns, sweep_rows)


__all__ = ["DEFAULT_STRENGTHS", "MINIMAL_COLUMNS", "SWEEP_COLUMNS", "SWEEP_FILE", "MinimalBatch",
           "minimal_edit_batch", "sweep_skips"]
