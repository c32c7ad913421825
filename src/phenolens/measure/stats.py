"""Does the translation change a feature the way the treatment does? Effect sizes and tests.

For every feature and target condition two contrasts are computed the same way:
  real:        real images of the source condition  vs  real images of the target condition
  translated:  the translated source images           vs  their translations to the target
Each gets the mean difference, Cohen's d (pooled SD), Welch's t-test and the Mann–Whitney U test,
with Benjamini–Hochberg adjustment over features (PhenDiff Fig. 2b uses a t-test on Golgi area).
Across a dose series, each feature's real and translated condition means are correlated
(PhenDiff Fig. 4), and the features the translation changes most are ranked.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import numpy as np
from scipy import stats


def pooled_sd(a: np.ndarray, b: np.ndarray) -> float:
    """Pooled standard deviation of two samples (Cohen 1988, eq. 2.5.2); NaN with fewer than 2 each."""
    a, b = _finite(a), _finite(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))


def standardized(diff: float, sd: float) -> float:
    """DIFF / SD, with the limits of a zero SD (NaN for no change, ±inf otherwise)."""
    if not np.isfinite(sd):
        return math.nan
    if sd <= 0:
        return math.nan if diff == 0 else math.copysign(math.inf, diff)
    return float(diff / sd)


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean(b) - mean(a)) / pooled SD (Cohen 1988, eq. 2.5.2); NaN when undefined."""
    a, b = _finite(a), _finite(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return standardized(float(b.mean() - a.mean()), pooled_sd(a, b))


def _finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[np.isfinite(x)]


def contrast(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean difference, Cohen's d, Welch t and Mann–Whitney p-values of B against A."""
    a, b = _finite(a), _finite(b)
    out = dict(diff=math.nan, d=math.nan, p_welch=math.nan, p_mw=math.nan)
    if len(a) == 0 or len(b) == 0:
        return out
    out["diff"] = float(b.mean() - a.mean())
    out["d"] = cohens_d(a, b)
    if len(a) >= 2 and len(b) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant inputs: scipy warns and returns NaN
            out["p_welch"] = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
            if np.ptp(np.concatenate([a, b])) > 0:
                out["p_mw"] = float(stats.mannwhitneyu(b, a, alternative="two-sided").pvalue)
    return out


def bh_adjust(p: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg q-values over the finite p-values; NaN stays NaN."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


def compare_conditions(features: Sequence[str], real_source: Mapping[str, np.ndarray],
                       real_target: Mapping[str, np.ndarray], translated_source: Mapping[str, np.ndarray],
                       translation: Mapping[str, np.ndarray]) -> list[dict]:
    """One row per feature: the real and the translated contrast, q-values, direction agreement.

    Besides each contrast's own Cohen's d, `trans_d_common` standardises the translated mean difference
    by the *real* contrast's pooled SD, so real and translated effects are on one scale and their ratio
    (`effect_ratio`, = trans_diff / real_diff) is not inflated or shrunk by the SD of the few translated
    sources (a few dozen images, against the hundreds of real ones).
    """
    rows = []
    for f in features:
        real = contrast(real_source[f], real_target[f])
        trans = contrast(translated_source[f], translation[f])
        common = standardized(trans["diff"], pooled_sd(real_source[f], real_target[f]))
        rows.append(dict(
            feature=f, n_source=len(_finite(translated_source[f])), n_real_target=len(_finite(real_target[f])),
            n_translation=len(_finite(translation[f])),
            **{f"real_{k}": v for k, v in real.items()}, **{f"trans_{k}": v for k, v in trans.items()},
            trans_d_common=common,
        ))
    for side in ("real", "trans"):
        q = bh_adjust([r[f"{side}_p_welch"] for r in rows])
        for r, v in zip(rows, q):
            r[f"{side}_q"] = float(v)
    for r in rows:
        rd, td = r["real_d"], r["trans_d"]
        r["direction_agrees"] = bool(np.isfinite(rd) and np.isfinite(td) and np.sign(rd) == np.sign(td) and rd != 0)
        r["d_ratio"] = float(td / rd) if np.isfinite(rd) and np.isfinite(td) and rd != 0 else math.nan
        rdiff, tdiff = r["real_diff"], r["trans_diff"]
        r["effect_ratio"] = float(tdiff / rdiff) if np.isfinite(rdiff) and np.isfinite(tdiff) and rdiff != 0 else math.nan
    return rows


def dose_correlation(features: Sequence[str], real_means: Mapping[str, Sequence[float]],
                     translated_means: Mapping[str, Sequence[float]]) -> list[dict]:
    """Per feature, Pearson r of real vs translated condition means across the dose series."""
    rows = []
    for f in features:
        x, y = np.asarray(real_means[f], float), np.asarray(translated_means[f], float)
        ok = np.isfinite(x) & np.isfinite(y)
        r = p = math.nan
        if ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:
            res = stats.pearsonr(x[ok], y[ok])
            r, p = float(res.statistic), float(res.pvalue)
        rows.append(dict(feature=f, pearson_r=r, p_value=p, n_conditions=int(ok.sum())))
    return rows


def rank_changes(rows: Sequence[dict], top: int | None = None) -> list[dict]:
    """Features ordered by how much the translation moves them (|translated d|), largest first."""
    ok = [r for r in rows if np.isfinite(r["trans_d"])]
    ok.sort(key=lambda r: -abs(r["trans_d"]))
    return ok[:top] if top else ok
