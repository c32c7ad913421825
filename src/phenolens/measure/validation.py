"""Does a model show real biology? The scores of `phenolens validate`, read from a measured run.

The protocol is PhenDiff's Fig. 4 on held-out real cells: control cells are translated to every
condition; for the features the real treatment changes most (largest real |d| between held-out
control and held-out cells of the strongest condition, significant at q < 0.05), the translation
should move them the same way, by about as much (effect ratio = translated / real mean difference,
both on the real pooled-SD scale), and along the dose series as the real cells do (Pearson r of the
real and translated condition means). And a translation that changes nothing must show nothing:
sources against their control -> control rendering, with every feature tested (Welch, BH q < 0.05),
beside the same test between two random halves of the real control cells (the statistics' own
false-positive rate on real data).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from phenolens.errors import PhenolensError
from phenolens.measure.stats import compare_conditions

ID_COLUMNS = ("image", "condition", "kind", "role", "source_image", "target_condition")


@dataclass(frozen=True)
class Criteria:
    """What `validate` calls a pass (issue 11's numbers)."""

    top: int = 10                 # features with the largest significant real |d| at the strongest condition
    same_direction: int = 9       # ... at least this many move the same way in translation
    tolerance: float = 0.5        # effect ratio within 1 +- tolerance ...
    within: int = 7               # ... for at least this many
    min_r: float = 0.8            # real-vs-translated dose response r at least this ...
    correlated: int = 7           # ... for at least this many
    q: float = 0.05               # significance of the real effect, and of the null tests
    null_fraction: float = 0.05   # control -> control: at most this fraction of features significant
    min_psnr: float = 60.0        # reconstruction, dB
    min_kept: float = 0.9         # source nuclei found again in the translations (every condition)


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise PhenolensError(f"{path}: missing; run `phenolens measure` on the run first")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def top_features(stats: list[dict], source: str, strongest: str, criteria: Criteria) -> list[dict]:
    """The stats rows (source -> strongest) of the features with the largest significant real |d|."""
    rows = [r for r in stats if r["source_condition"] == source and r["target_condition"] == strongest
            and math.isfinite(_float(r["real_d"])) and _float(r["real_q"]) < criteria.q]
    rows.sort(key=lambda r: -abs(_float(r["real_d"])))
    return rows[:criteria.top]


def null_tests(features_csv: Path, source: str, q: float) -> dict:
    """Fractions of features significant (BH q < Q): sources vs their source -> source rendering, and
    two halves of the real source-condition cells (alternate rows, a split blind to every feature)."""
    rows = _read_csv(features_csv)
    columns = [c for c in rows[0] if c not in ID_COLUMNS] if rows else []

    def values(sel) -> dict[str, np.ndarray]:
        chosen = [r for r in rows if sel(r)]
        return {f: np.array([_float(r.get(f)) for r in chosen]) for f in columns}

    real = [r for r in rows if r["role"] == "reference" and r["condition"] == source]
    half_a, half_b = {id(r) for r in real[0::2]}, {id(r) for r in real[1::2]}
    src = values(lambda r: r["role"] == "source" and r["condition"] == source)
    same = values(lambda r: r["role"] == "generated" and r["target_condition"] == source)
    res = compare_conditions(columns, values(lambda r: id(r) in half_a), values(lambda r: id(r) in half_b), src, same)
    tested_t = [r for r in res if math.isfinite(r["trans_q"])]
    tested_r = [r for r in res if math.isfinite(r["real_q"])]
    return dict(
        translated_significant=sum(r["trans_q"] < q for r in tested_t), translated_tested=len(tested_t),
        translated_fraction=(sum(r["trans_q"] < q for r in tested_t) / len(tested_t)) if tested_t else math.nan,
        real_halves_significant=sum(r["real_q"] < q for r in tested_r), real_halves_tested=len(tested_r),
        real_halves_fraction=(sum(r["real_q"] < q for r in tested_r) / len(tested_r)) if tested_r else math.nan,
        n_sources=len(next(iter(src.values()), [])), n_real=len(real))


def validation_summary(measure_dir: str | Path, source: str, criteria: Criteria = Criteria(),
                       conditions: list[str] | None = None) -> dict:
    """Every score and verdict of a validation, from RUN/measure (stats, dose_correlation, features,
    metrics, measure.json). CONDITIONS: the series in dose order (the model's; the strongest last)."""
    measure_dir = Path(measure_dir)
    stats = _read_csv(measure_dir / "stats.csv")
    corr = {r["feature"]: _float(r["pearson_r"]) for r in _read_csv(measure_dir / "dose_correlation.csv")}
    metrics = json.loads((measure_dir / "metrics.json").read_text())
    measured = json.loads((measure_dir / "measure.json").read_text())["conditions"]
    conditions = [c for c in (conditions or measured) if c in measured]
    targets = [c for c in conditions if c != source]
    if not targets:
        raise PhenolensError(f"{measure_dir}: the run has no condition besides {source!r} to validate")
    strongest = targets[-1]
    features = []
    for r in top_features(stats, source, strongest, criteria):
        ratio = _float(r["effect_ratio"])
        rr = corr.get(r["feature"], math.nan)
        features.append(dict(
            feature=r["feature"], real_d=_float(r["real_d"]), real_q=_float(r["real_q"]),
            translated_d=_float(r["trans_d_common"]), effect_ratio=ratio,
            same_direction=r["direction_agrees"] == "True",
            within_tolerance=bool(math.isfinite(ratio) and abs(ratio - 1) <= criteria.tolerance),
            dose_r=rr, correlated=bool(math.isfinite(rr) and rr >= criteria.min_r)))
    identity = metrics.get("identity_nuclei_within_3px", {})
    kept = {t: _float(identity.get(t, {}).get("fraction")) for t in targets}
    # the same for the nuclei not cut by the crop's border (reported beside; the check reads all nuclei)
    kept_whole = {t: _float(identity.get(t, {}).get("whole_fraction")) for t in targets}
    recon = metrics.get("reconstruction", {})
    null = null_tests(measure_dir / "features.csv", source, criteria.q)
    n_same = sum(f["same_direction"] for f in features)
    n_within = sum(f["within_tolerance"] for f in features)
    n_corr = sum(f["correlated"] for f in features)
    psnr = _float(recon.get("psnr_mean"))
    min_kept = min(kept.values()) if kept else math.nan
    checks = {
        f"same direction >= {criteria.same_direction} of {criteria.top}": n_same >= criteria.same_direction,
        f"effect ratio within +-{criteria.tolerance:.0%} >= {criteria.within}": n_within >= criteria.within,
        f"dose-response r >= {criteria.min_r:g} for >= {criteria.correlated}": n_corr >= criteria.correlated,
        f"{source} -> {source}: <= {criteria.null_fraction:.0%} of features at q < {criteria.q:g}":
            bool(null["translated_fraction"] <= criteria.null_fraction),
        f"reconstruction >= {criteria.min_psnr:g} dB": bool(psnr >= criteria.min_psnr),
        f"source nuclei found again >= {criteria.min_kept:.0%}": bool(min_kept >= criteria.min_kept),
    }
    return dict(source=source, strongest=strongest, targets=targets, criteria=asdict(criteria), features=features,
                same_direction=n_same, within_tolerance=n_within, correlated=n_corr, nuclei_kept=kept,
                whole_nuclei_kept=kept_whole,
                reconstruction_psnr_mean=psnr, reconstruction_psnr_min=_float(recon.get("psnr_min")),
                null=null, checks=checks, passed=all(checks.values()))


def _whole_nuclei(kept: dict) -> str:
    """'; of those not cut by the border: ...', where the run measured it (runs before it did not)."""
    if not kept or not all(math.isfinite(v) for v in kept.values()):
        return ""
    return "; of those not cut by the border: " + ", ".join(f"{t} {100 * v:.0f} %" for t, v in kept.items())


def format_validation(summary: dict) -> str:
    """The validation as markdown: the feature table, then the checks."""
    s = summary
    lines = [f"Top {len(s['features'])} features by real |d| ({s['source']} vs {s['strongest']}, held-out real "
             f"cells, q < {s['criteria']['q']:g}); translated d on the real pooled-SD scale; r across "
             f"{', '.join([s['source'], *s['targets']])}.", "",
             "| feature | real d | translated d | effect ratio | same direction | r (dose response) |",
             "|:---|---:|---:|---:|:---:|---:|"]
    for f in s["features"]:
        lines.append(f"| {f['feature']} | {f['real_d']:.2f} | {f['translated_d']:.2f} | {f['effect_ratio']:.2f} | "
                     f"{'yes' if f['same_direction'] else 'no'} | {f['dose_r']:.2f} |")
    n = s["null"]
    lines += ["", f"- same direction: {s['same_direction']} of {len(s['features'])}; effect ratio within "
              f"+-{s['criteria']['tolerance']:.0%}: {s['within_tolerance']}; r >= {s['criteria']['min_r']:g}: "
              f"{s['correlated']}",
              f"- {s['source']} -> {s['source']}: {n['translated_significant']} of {n['translated_tested']} features "
              f"significant ({100 * n['translated_fraction']:.1f} %); two halves of the real {s['source']} cells: "
              f"{n['real_halves_significant']} of {n['real_halves_tested']} ({100 * n['real_halves_fraction']:.1f} %)",
              f"- reconstruction PSNR mean {s['reconstruction_psnr_mean']:.1f} dB (min "
              f"{s['reconstruction_psnr_min']:.1f}); source nuclei found again: "
              + ", ".join(f"{t} {100 * v:.0f} %" for t, v in s["nuclei_kept"].items())
              + _whole_nuclei(s.get("whole_nuclei_kept", {})), ""]
    if "n_sources" in s:  # written by run_validate: how the translations were made
        how = [s.get("inversion", "fixed-point") + " inversion", f"{s['steps']} steps"]
        how += [f"T_skip {s['skip']}"] if s.get("skip") else []
        how += [f"guidance {s['guidance_scale']:g}"] if s.get("guidance_scale", 1) != 1 else []
        lines.insert(-1, f"- translations: {s['n_sources']} held-out {s['source']} cells, " + ", ".join(how))
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in s["checks"].items()]
    lines.append(f"\n{'PASSED' if s['passed'] else 'NOT PASSED'}: {sum(s['checks'].values())} of "
                 f"{len(s['checks'])} checks")
    return "\n".join(lines)
