"""Score a run on simulated data: does each planted phenotype move the same way in translations?

The simulator plants five phenotypes (see `phenolens.data.simulate`); each has one CellProfiler
feature that reads it out. For each, this compares the real effect (real control vs real condition)
with the translated one (sources vs their translations) at every dose, and correlates the real and
translated condition means across the series (PhenDiff Fig. 4 protocol).

Effect sizes are compared on one scale: the translated mean difference is standardised by the real
contrast's pooled SD (`trans_d_common`), so the ratio is translated / real mean difference. Each
contrast's own Cohen's d is reported beside it; its ratio also carries the sampling noise of the SD
of the few translated sources (for a subtle effect, more than the ±50 % band).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from phenolens.errors import PhenolensError

# phenotype -> (feature column, what it reads)
PLANTED_FEATURES: dict[str, tuple[str, str]] = {
    "nuclear enlargement": ("Nuclei_Area", "mean nucleus area"),
    "cell loss": ("Image_Count_Nuclei", "nuclei per image"),
    "Golgi fragmentation": ("Cells_Intensity_StdIntensity__Golgi", "Golgi contrast per cell (compact = high)"),
    "actin translocation": ("Image_Intensity_NuclearFraction_actin", "fraction of actin over nuclei"),
    "tubulin +10 % (subtle)": ("Image_Intensity_CytoplasmMean_tubulin", "mean cytoplasmic tubulin"),
    # only in datasets simulated with --puncta (a fifth channel)
    "LC3 puncta": ("Cells_Intensity_StdIntensity__LC3", "LC3 contrast per cell (punctate = high)"),
}
# each phenotype's name in the simulator (`phenolens simulate --phenotypes`)
SIMULATOR_NAMES: dict[str, str] = {
    "nuclear enlargement": "nuclear-enlargement", "cell loss": "cell-loss", "Golgi fragmentation": "golgi-fragmentation",
    "actin translocation": "actin-translocation", "tubulin +10 % (subtle)": "tubulin-shift", "LC3 puncta": "lc3-puncta",
}
EFFECT_TOLERANCE = 0.5  # translated effect within +-50 % of the real one at the strongest dose
MIN_CORRELATION = 0.8
SIGNIFICANT_Q = 0.05  # BH-adjusted p of the real effect below which a dose counts for direction


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        raise PhenolensError(f"{path}: missing; run `phenolens measure` on the run first")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def planted_table(measure_dir: str | Path, conditions: list[str] | None = None) -> list[dict]:
    """One row per planted phenotype: real and translated d at the strongest dose, their ratio,
    direction agreement at every dose where the real effect is significant (q < 0.05), and the
    real-vs-translated correlation across doses. On data simulated with ``--mode separate`` (conditions
    named after the phenotypes) each phenotype is read at its own condition, and there is no dose
    series to correlate (r is NaN)."""
    measure_dir = Path(measure_dir)
    stats = _read(measure_dir / "stats.csv")
    corr = {r["feature"]: r for r in _read(measure_dir / "dose_correlation.csv")}
    if conditions is None:
        import json

        conditions = json.loads((measure_dir / "measure.json").read_text())["conditions"]
    # data simulated with --mode separate: each phenotype's own condition, not a dose series
    separate = any(name in conditions for name in SIMULATOR_NAMES.values())
    rows = []
    for phenotype, (feature, reads) in PLANTED_FEATURES.items():
        target = SIMULATOR_NAMES[phenotype] if separate else conditions[-1]
        series = [target] if separate else conditions
        per_target = {r["target_condition"]: r for r in stats if r["feature"] == feature}
        if target not in per_target:
            continue
        s = per_target[target]
        real_d, own_d = float(s["real_d"]), float(s["trans_d"])
        trans_d = float(s["trans_d_common"]) if s.get("trans_d_common") not in (None, "") else math.nan
        ratio = trans_d / real_d if real_d else math.nan
        # direction is only defined where the real images move: doses whose real effect is significant
        moving = [c for c in series if c in per_target and float(per_target[c]["real_q"]) < SIGNIFICANT_Q]
        agree = [per_target[c]["direction_agrees"] == "True" for c in moving]
        r = float(corr[feature]["pearson_r"]) if feature in corr and not separate else math.nan
        rows.append(dict(phenotype=phenotype, feature=feature, reads=reads, real_d=real_d, translated_d=trans_d,
                         ratio=ratio, translated_own_d=own_d, own_d_ratio=own_d / real_d if real_d else math.nan, same_direction_all_doses=all(agree) and bool(agree),
                         doses_checked=",".join(moving),
                         within_50pct=bool(abs(ratio - 1) <= EFFECT_TOLERANCE),
                         dose_correlation=r, correlation_ok=bool(np.isfinite(r) and r >= MIN_CORRELATION)))
    return rows


def format_planted_table(rows: list[dict]) -> str:
    """Markdown table for the summary, README and notes."""
    lines = ["| phenotype | feature | real d | translated d (real SD) | ratio | translated d (own SD) | ratio "
             "| same direction (doses with real q < 0.05) | r across doses |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['phenotype']} | {r['feature']} | {r['real_d']:.2f} | {r['translated_d']:.2f} | "
                     f"{r['ratio']:.2f} | {r['translated_own_d']:.2f} | {r['own_d_ratio']:.2f} | "
                     f"{'yes' if r['same_direction_all_doses'] else 'no'} ({r['doses_checked']}) | "
                     f"{r['dose_correlation']:.2f} |")
    return "\n".join(lines)


def planted_by_target(measure_dir: str | Path, targets: list[str] | None = None,
                      phenotypes: list[str] | None = None) -> list[dict]:
    """One row per (target, planted phenotype): the translated mean difference on the real contrast's
    scale (`trans_d_common`) and the real d, for every target of a run (conditions, and edits that are
    their own targets such as DiffEx directions). What a disentanglement table reads: does a direction
    move one planted phenotype far more than the others? PHENOTYPES (names of PLANTED_FEATURES) limits
    the rows to those the data plants (`planted_in`; default every phenotype whose feature was measured)."""
    stats = _read(Path(measure_dir) / "stats.csv")
    order = targets or list(dict.fromkeys(r["target_condition"] for r in stats))
    by = {(r["target_condition"], r["feature"]): r for r in stats}
    rows = []
    for target in order:
        for phenotype, (feature, _) in PLANTED_FEATURES.items():
            if phenotypes is not None and phenotype not in phenotypes:
                continue
            r = by.get((target, feature))
            if r is None:
                continue
            common = r.get("trans_d_common")
            rows.append(dict(target=target, phenotype=phenotype, feature=feature, real_d=float(r["real_d"]),
                             translated_d=float(common) if common not in (None, "") else math.nan))
    return rows


def planted_in(conditions: list[str]) -> list[str] | None:
    """The phenotypes data simulated with ``--mode separate`` plants: those its conditions are named
    after (the cell count is left alone there, so "cell loss" is not one unless named). None for a dose
    series (``--mode together``), which plants every phenotype."""
    names = [p for p, sim in SIMULATOR_NAMES.items() if sim in conditions]
    return names or None


def separation(rows: list[dict], target: str) -> dict:
    """For one target: the planted phenotype it moves most (|translated d|) and how many times more than
    the next one (inf when the others do not move)."""
    mine = sorted((r for r in rows if r["target"] == target and np.isfinite(r["translated_d"])),
                  key=lambda r: -abs(r["translated_d"]))
    if not mine:
        return dict(target=target, largest="", largest_d=math.nan, ratio_to_next=math.nan)
    nxt = abs(mine[1]["translated_d"]) if len(mine) > 1 else 0.0
    top = abs(mine[0]["translated_d"])
    return dict(target=target, largest=mine[0]["phenotype"], largest_d=mine[0]["translated_d"],
                ratio_to_next=top / nxt if nxt > 0 else math.inf)
