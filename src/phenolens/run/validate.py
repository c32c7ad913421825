"""`phenolens validate MODEL HELDOUT OUT`: does the model show the real phenotype on cells it never saw?

HELDOUT holds real cells of every condition that training never saw (a folder per condition or a
manifest). The held-out cells of the control condition are translated to every condition
(`phenolens translate`, into OUT/run), measured against all held-out cells (`phenolens measure`,
OUT/run/measure), and scored by `phenolens.measure.validation`: OUT/validation.md (the table and
the checks), OUT/validation.json (every number) and OUT/validation.csv (one row per top feature);
`phenolens.report.validation` then draws OUT/dose_response.png and OUT/cells.png.

OUT is a phenolens output folder (kind "validation"): a re-run resumes (translations and measured
images are kept), --overwrite removes only what phenolens wrote there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from phenolens.atomic import write_csv_atomic, write_json_atomic, write_text_atomic
from phenolens.data.records import discover
from phenolens.errors import PhenolensError
from phenolens.folders import OutputFolder, check_apart
from phenolens.launch import launched_world
from phenolens.measure.validation import Criteria, format_validation, validation_summary
from phenolens.models.store import load_info
from phenolens.run.measure import MeasureSettings, run_measure
from phenolens.run.translate import TranslateSettings, default_guidance, run_translate

logger = logging.getLogger(__name__)
KIND = "validation"
FILES = ("sources.csv", "run", "validation.md", "validation.json", "validation.csv", "dose_response.png", "cells.png")


@dataclass
class ValidateSettings:
    source: str | None = None  # the control condition; default: the model's first
    steps: int = 50
    batch_size: int = 16
    guidance_scale: float | None = None  # None = translate's default for the model and inversion
    inversion: str = "fixed-point"  # the edit's strength: translate's --inversion, --skip, --seed
    skip: int = 0
    seed: int = 0
    max_sources: int | None = None  # at most this many control cells translated (default: all)
    workers: int = 1  # CPU processes translating (translate's --workers); measuring has its own
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    criteria: Criteria = field(default_factory=Criteria)


def run_validate(model_dir: str | Path, heldout: str | Path, out: str | Path, settings: ValidateSettings,
                 *, overwrite: bool = False, device: str | None = None, progress: bool = True) -> dict:
    """Translate, measure and score; returns the summary (also written into OUT)."""
    model_dir, heldout, out = Path(model_dir), Path(heldout), Path(out)
    if launched_world() > 1:
        raise PhenolensError(f"validate under a launch of {launched_world()} processes: its own folder and summary "
                             "belong to one process; run it without `accelerate launch` (translate and measure "
                             "can be launched)")
    info = load_info(model_dir)  # the weights are loaded once, by translate
    source = settings.source or info.conditions[0]
    info.condition_index(source, "--source")
    records = discover(heldout)
    found = {r.condition for r in records}
    unknown = sorted(found - set(info.conditions))
    if unknown:
        raise PhenolensError(f"HELDOUT {heldout}: condition(s) {', '.join(unknown)} are not the model's "
                             f"({', '.join(info.conditions)})")
    missing = [c for c in info.conditions if c not in found]
    if missing:
        raise PhenolensError(f"HELDOUT {heldout}: no real cells of {', '.join(missing)}; validation compares the "
                             "translations with real held-out cells of every condition")
    sources = [r for r in records if r.condition == source][:settings.max_sources]
    if len(sources) < 3:
        raise PhenolensError(f"HELDOUT {heldout}: {len(sources)} {source!r} cell(s); at least 3 are needed")
    check_apart(out, inputs=[heldout, *(Path(r.path) for r in records)], models=[model_dir])
    folder = OutputFolder.open(out, KIND, overwrite=overwrite)
    folder.record(*(out / f for f in FILES))

    manifest = out / "sources.csv"
    write_csv_atomic(manifest, [dict(path=str(Path(r.path).resolve()), condition=source) for r in sources],
                     ["path", "condition"], only_if_changed=True)
    logger.info(f"validate: {len(sources)} held-out {source} cells -> {', '.join(info.conditions)}; real "
                f"reference: {len(records)} held-out cells of {heldout}")
    run_dir = out / "run"
    # how the translations are made: handed to translate, and recorded in validation.json
    guidance = settings.guidance_scale
    how = dict(steps=settings.steps, inversion=settings.inversion,
               guidance_scale=default_guidance(settings.inversion, info) if guidance is None else guidance,
               skip=settings.skip, seed=settings.seed)
    run_translate(TranslateSettings(model_dir=str(model_dir), input=str(manifest), batch_size=settings.batch_size,
                                    **how), run_dir, device=device, progress=progress, workers=settings.workers)
    measure = replace(settings.measure, reference=str(heldout), max_reference=max(  # every held-out cell
        settings.measure.max_reference, max(sum(r.condition == c for r in records) for c in info.conditions)))
    measure_dir = run_measure(run_dir, measure, progress=progress)
    summary = validation_summary(measure_dir, source, settings.criteria, list(info.conditions))
    summary.update(model=str(model_dir), heldout=str(heldout), n_sources=len(sources), **how)
    write_json_atomic(out / "validation.json", summary)
    write_text_atomic(out / "validation.md", format_validation(summary) + "\n")
    if summary["features"]:
        write_csv_atomic(out / "validation.csv", summary["features"], list(summary["features"][0]))
    return summary
