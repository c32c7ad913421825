"""`phenolens validate` (issue 11): the scores read from a measured run, and the command end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import fails_with, run_cli


def _write(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _fake_measure(tmp_path, n_features=12, flip=(), off=(), uncorrelated=()):
    """A measure/ folder whose numbers are known: feature i has real d = 5 - 0.3 i at the strongest dose,
    translated d = real d (x 2 where OFF, of opposite sign where FLIP), r = 0.9 unless UNCORRELATED."""
    out = tmp_path / "measure"
    out.mkdir()
    stats, corr = [], []
    for i in range(n_features):
        rd = 5 - 0.3 * i
        td = rd * (2.0 if i in off else 1.0) * (-1 if i in flip else 1)
        for target, scale in (("low", 0.5), ("high", 1.0)):
            stats.append(dict(feature=f"f{i}", source_condition="ctrl", target_condition=target,
                              real_d=rd * scale, real_q=0.001, trans_d_common=td * scale,
                              effect_ratio=td / rd, direction_agrees=str(np.sign(td) == np.sign(rd))))
        corr.append(dict(feature=f"f{i}", pearson_r=0.2 if i in uncorrelated else 0.9))
    # a feature with a huge real d that is not significant must not be picked
    stats.append(dict(feature="noise", source_condition="ctrl", target_condition="high", real_d=9, real_q=0.5,
                      trans_d_common=0, effect_ratio=0, direction_agrees="False"))
    _write(out / "stats.csv", stats)
    _write(out / "dose_correlation.csv", corr + [dict(feature="noise", pearson_r=0)])
    rng = np.random.default_rng(0)
    feats = []
    for k in range(20):
        feats.append(dict(image=f"r{k}", condition="ctrl", kind="real", role="reference", source_image="",
                          target_condition="", a=rng.normal(), b=rng.normal()))
    for k in range(10):
        v = rng.normal()
        feats.append(dict(image=f"s{k}", condition="ctrl", kind="real", role="source", source_image=f"s{k}",
                          target_condition="", a=v, b=v))
        feats.append(dict(image=f"g{k}", condition="ctrl", kind="reconstruction", role="generated",
                          source_image=f"s{k}", target_condition="ctrl", a=v + 5, b=v + 1e-6))
    _write(out / "features.csv", feats)
    (out / "metrics.json").write_text(json.dumps(dict(
        reconstruction=dict(psnr_mean=61.0, psnr_min=55.0),
        identity_nuclei_within_3px=dict(low=dict(fraction=0.95, whole_fraction=0.97),
                                        high=dict(fraction=0.89, whole_fraction=0.93)))))
    (out / "measure.json").write_text(json.dumps(dict(conditions=["ctrl", "high", "low"])))  # not dose order
    return out


def test_summary_counts_the_top_significant_features_against_the_criteria(tmp_path):
    from phenolens.measure.validation import format_validation, validation_summary

    out = _fake_measure(tmp_path, flip={1}, off={2, 3, 4}, uncorrelated={0, 5, 6, 7})
    s = validation_summary(out, "ctrl", conditions=["ctrl", "low", "high"])
    assert s["strongest"] == "high"  # the model's dose order, not measure.json's
    assert [f["feature"] for f in s["features"]] == [f"f{i}" for i in range(10)]  # "noise" is not significant
    assert s["same_direction"] == 9 and s["within_tolerance"] == 6 and s["correlated"] == 6
    # the null: sources vs their ctrl -> ctrl renderings differ in feature a (shifted by 5), not in b
    assert s["null"]["translated_significant"] == 1 and s["null"]["translated_tested"] == 2
    checks = list(s["checks"].values())
    assert checks == [True, False, False, False, True, False] and not s["passed"]  # 89 % of all nuclei kept
    text = format_validation(s)
    assert "NOT PASSED: 2 of 6 checks" in text and "| f1 | 4.70 | -4.70 |" in text
    assert "found again: low 95 %, high 89 %; of those not cut by the border: low 97 %, high 93 %" in text


def test_dose_responses_are_in_sd_units_of_the_real_control(tmp_path):
    from phenolens.report.validation import dose_responses

    out = _fake_measure(tmp_path)
    resp = dose_responses(out / "features.csv", ["a", "b"], ["ctrl", "high"])
    with open(out / "features.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    real = np.array([float(r["a"]) for r in rows if r["role"] == "reference"])
    gen = np.array([float(r["a"]) for r in rows if r["role"] == "generated"])
    assert resp["a"][("real", "ctrl")][0] == pytest.approx(0, abs=1e-12)
    assert resp["a"][("translated", "ctrl")][0] == pytest.approx((gen.mean() - real.mean()) / real.std(ddof=1))
    assert np.isnan(resp["a"][("real", "high")][0])  # no real cells of that condition: no point, no crash


def test_validate_end_to_end_on_simulated_cells(tmp_path):
    from phenolens.data.simulate import simulate

    held = simulate(tmp_path / "held", conditions=["control", "low", "high"], per_condition=4, size=48, seed=5,
                    progress=False, workers=1)
    train = simulate(tmp_path / "train", conditions=["control", "low", "high"], per_condition=2, size=48, seed=6,
                     progress=False, workers=1)
    # v-prediction: a 2-step ε network is far from a denoiser, and its fixed-point inversion over 3 steps
    # does not converge (14 dB), so its control -> control "reconstruction" would not be exact; v's is (36 dB)
    code, _, err = run_cli("train", train, tmp_path / "m", "--steps", "2", "--batch-size", "2", "--warmup-steps", "1",
                           "--cond-dropout", "0.1", "--prediction-type", "v_prediction")
    assert code == 0, err
    out = tmp_path / "val"
    args = ("validate", tmp_path / "m", held, out, "--steps", "3", "--max-sources", "3", "--no-judges",
            "--workers", "1", "--channel-names", "DNA,tubulin,actin,Golgi")
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    summary = json.loads((out / "validation.json").read_text())
    assert summary["strongest"] == "high" and summary["n_sources"] == 3
    assert summary["null"]["translated_significant"] == 0  # control -> control is the exact reconstruction
    assert (out / "validation.md").read_text().strip() in stdout
    assert f"wrote {out / 'cells.png'}" in stdout  # the figures are drawn by the command
    with open(out / "run" / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    recon = [float(r["recon_psnr"]) for r in rows if r["kind"] == "reconstruction"]
    assert summary["reconstruction_psnr_mean"] == pytest.approx(np.mean(recon), abs=0.2)
    assert {r["target_condition"] for r in rows} == {"control", "low", "high"} and len(rows) == 9
    mtime = (out / "run" / "index.csv").stat().st_mtime_ns
    code, _, err = run_cli(*args)  # a re-run resumes: nothing translated again
    assert code == 0, err and (out / "run" / "index.csv").stat().st_mtime_ns == mtime
    # a user's file in OUT survives --overwrite; phenolens' own files are replaced
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(*args, "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "validation.json").is_file()
    # the edit's strength is translate's: EF-DDPM restarted at T_skip 1 of 3, recorded and said
    code, stdout, err = run_cli(*args, "--inversion", "ef-ddpm", "--skip", "1", "--overwrite")
    assert code == 0, err
    summary = json.loads((out / "validation.json").read_text())
    assert (summary["inversion"], summary["skip"]) == ("ef-ddpm", 1)
    assert "ef-ddpm inversion, 3 steps, T_skip 1" in (out / "validation.md").read_text()
    assert json.loads((out / "run" / "run.json").read_text())["inversion"] == "ef-ddpm"


def test_validate_refuses_heldout_without_every_condition(tmp_path, tiny_model, blob_data):
    fails_with(run_cli("validate", tiny_model, blob_data / "ctrl", tmp_path / "v"), "no real cells of", "dose1")


@pytest.mark.parametrize("option", [("--top", "0"), ("--max-sources", "2"), ("--skip", "50")])
def test_validate_checks_its_options(tmp_path, tiny_model, blob_data, option):
    fails_with(run_cli("validate", tiny_model, blob_data, tmp_path / "v", *option), option[0])
