"""Segmentation, features and statistics, checked against the simulator's ground truth.

No model is needed: a translate run folder is built by hand, with real simulated images standing
in for translations, so the expected answers are known (a "translation" that is the source itself
keeps every nucleus; one that is a real high-dose image moves features as the real data do).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import run_cli, write_fake_run

CONDS = ["control", "low", "high"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    from phenolens.data.simulate import simulate

    return simulate(tmp_path_factory.mktemp("sim") / "data", conditions=CONDS, per_condition=12, size=64, seed=3,
                    progress=False)


def test_segmentation_matches_simulator_masks(sim):
    from phenolens.measure.segment import matched_iou, segment

    nuc, cel = [], []
    for cond in ("control", "high"):
        for p in sorted((sim / cond).glob("*.tif"))[:6]:
            n, c = segment(tifffile.imread(p).astype(float))
            truth = sim / "_groundtruth" / "masks" / cond
            nuc += list(matched_iou(n, tifffile.imread(truth / f"{p.stem}_nuclei.tif")))
            cel += list(matched_iou(c, tifffile.imread(truth / f"{p.stem}_cells.tif")))
    assert np.mean(nuc) > 0.8, np.mean(nuc)
    assert np.mean(cel) > 0.75, np.mean(cel)


def test_matched_iou_and_centroid_matching_on_known_shapes():
    from phenolens.measure.segment import centroids, count_matches, matched_iou

    truth = np.zeros((20, 20), int)
    truth[2:6, 2:6] = 1  # 16 px
    truth[10:14, 10:14] = 2
    pred = np.zeros_like(truth)
    pred[2:6, 2:4] = 5  # half of object 1: IoU 0.5; object 2 missed: IoU 0
    assert matched_iou(pred, truth).tolist() == [0.5, 0.0]
    a = centroids(truth)
    assert count_matches(a, a + [0, 2.9], 3.0) == 2
    assert count_matches(a, a + [0, 3.1], 3.0) == 0
    assert count_matches(a, a[:1], 3.0) == 1  # one-to-one: a single nucleus matches once


def test_touches_border_flags_the_objects_cut_by_the_edge():
    from phenolens.measure.segment import centroids, count_matches, touches_border

    labels = np.zeros((20, 20), int)
    labels[0:4, 8:12] = 3  # top edge
    labels[8:12, 8:12] = 1  # inside
    labels[10:14, 16:20] = 2  # right edge
    assert touches_border(labels).tolist() == [False, True, True]  # centroids' order: labels 1, 2, 3
    flagged = np.column_stack([centroids(labels), touches_border(labels)])
    assert count_matches(flagged, centroids(labels), 3.0) == 3  # the flag column is not a coordinate


def test_cohens_d_and_bh_against_hand_computation():
    from phenolens.measure.stats import bh_adjust, cohens_d, contrast

    a, b = np.array([1.0, 2.0, 3.0]), np.array([3.0, 4.0, 5.0])
    assert cohens_d(a, b) == pytest.approx(2.0)  # means 2 and 4, pooled SD 1
    q = bh_adjust([0.01, 0.04, 0.03, np.nan])
    assert q[:3] == pytest.approx([0.03, 0.04, 0.04])
    assert np.isnan(q[3])
    rng = np.random.default_rng(0)
    shifted = contrast(rng.normal(0, 1, 50), rng.normal(1, 1, 50))
    same = contrast(rng.normal(0, 1, 50), rng.normal(0, 1, 50))
    assert shifted["p_welch"] < 1e-3 and shifted["p_mw"] < 1e-3 and shifted["d"] > 0.5
    assert same["p_welch"] > 0.01


def test_translated_effect_on_the_real_scale():
    """trans_d_common divides the translated mean shift by the *real* pooled SD: a translation that shifts
    by the real mean difference scores the real d, however narrow its few sources happen to be."""
    from phenolens.measure.stats import compare_conditions

    real_src, real_tgt = np.array([0.0, 2.0, 4.0]), np.array([2.0, 4.0, 6.0])  # diff 2, pooled SD 2 -> d 1
    sources = np.array([1.0, 1.5, 2.0])  # SD 0.5: their own d would be 4
    rows = compare_conditions(["f"], {"f": real_src}, {"f": real_tgt}, {"f": sources}, {"f": sources + 2})
    r = rows[0]
    assert r["real_d"] == pytest.approx(1.0)
    assert r["trans_d"] == pytest.approx(4.0)
    assert r["trans_d_common"] == pytest.approx(1.0)
    assert r["effect_ratio"] == pytest.approx(1.0) and r["d_ratio"] == pytest.approx(4.0)


def test_features_see_the_planted_nucleus_growth(sim):
    from phenolens.measure.features import FeatureSettings, measure_image
    from phenolens.measure.segment import segment

    settings = FeatureSettings(channel_names=("DNA", "tubulin", "actin", "Golgi"))
    area = {}
    for cond in ("control", "high"):
        vals = []
        for p in sorted((sim / cond).glob("*.tif"))[:6]:
            raw = tifffile.imread(p)
            n, c = segment(raw.astype(float))
            row = measure_image(raw / 65535.0, n, c, settings)
            truth = tifffile.imread(sim / "_groundtruth" / "masks" / cond / f"{p.stem}_nuclei.tif")
            assert row["Image_Count_Nuclei"] == pytest.approx(truth.max(), abs=1)
            vals.append(row["Nuclei_Area"])
        area[cond] = np.mean(vals)
    # the simulator grows nuclei by 40 % at strength 1
    assert area["high"] / area["control"] == pytest.approx(1.4, abs=0.15)


def _fake_run(sim: Path, run: Path, model_dir: Path) -> Path:
    """A translate run whose 'translations' are real images: to high = a real high image, to low = the source."""
    return write_fake_run(sim, run, model_dir, CONDS, 5, targets=("low", "high"))


def test_measure_cli_on_a_known_run(sim, tmp_path, monkeypatch):
    run = _fake_run(sim, tmp_path / "run", tmp_path / "model")
    code, out, err = run_cli("measure", run, "--channel-names", "DNA,tubulin,actin,Golgi", "--no-judges",
                             "--workers", "1", "--max-reference", "5")
    assert code == 0, err
    m = run / "measure"
    with open(m / "features.csv") as fh:
        feats = list(csv.DictReader(fh))
    kinds = {(r["kind"], r["role"]) for r in feats}
    assert kinds == {("real", "source"), ("real", "reference"), ("reconstruction", "generated"),
                     ("translation", "generated")}
    assert sum(r["role"] == "reference" for r in feats) == 15  # 5 per condition (--max-reference)
    with open(m / "stats.csv") as fh:
        stats = {(r["feature"], r["target_condition"]): r for r in csv.DictReader(fh)}
    area = stats[("Nuclei_Area", "high")]
    assert float(area["real_d"]) > 1 and float(area["trans_d"]) > 1 and area["direction_agrees"] == "True"
    assert float(stats[("Nuclei_Area", "low")]["trans_d"]) == 0  # the "translation" is the source itself
    metrics = json.loads((m / "metrics.json").read_text())
    assert metrics["identity_nuclei_within_3px"]["low"]["fraction"] == 1.0
    assert metrics["identity_nuclei_within_3px"]["high"]["fraction"] < 0.5  # other cells entirely
    low = metrics["identity_nuclei_within_3px"]["low"]
    assert 0 < low["whole_source_nuclei"] <= low["source_nuclei"]
    assert low["whole_fraction"] == 1.0
    seg = metrics["segmentation_vs_ground_truth"]
    assert seg["nuclei_mean_iou"] > 0.8
    with open(m / "ranked.csv") as fh:
        ranked = [r for r in csv.DictReader(fh) if r["target_condition"] == "high"]
    assert [int(r["rank"]) for r in ranked[:3]] == [1, 2, 3]
    assert abs(float(ranked[0]["trans_d"])) >= abs(float(ranked[1]["trans_d"]))

    # a second run with the same settings reuses every measured row
    import phenolens.run.measure as measure_module

    def fail(job):
        raise AssertionError(f"measured {job.image} again")

    monkeypatch.setattr(measure_module, "_measure_job", fail)
    code, out, err = run_cli("measure", run, "--channel-names", "DNA,tubulin,actin,Golgi", "--no-judges",
                             "--workers", "1", "--max-reference", "5")
    assert code == 0, err
    with open(m / "features.csv") as fh:
        assert list(csv.DictReader(fh)) == feats


def test_measure_errors_name_the_problem(tmp_path, sim):
    code, _, err = run_cli("measure", tmp_path)
    assert code == 2 and "index.csv" in err
    run = _fake_run(sim, tmp_path / "run", tmp_path / "model")
    code, _, err = run_cli("measure", run, "--channel-names", "DNA,tubulin", "--no-judges")
    assert code == 2 and "--channel-names" in err and "4 channel" in err
    code, _, err = run_cli("measure", run, "--reference", tmp_path / "nowhere", "--no-judges")
    assert code == 2 and "--reference" in err
