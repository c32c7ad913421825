"""measure.planted on dose series and on one-phenotype-per-condition data (simulate --mode separate)."""

import csv
import math

import pytest

from phenolens.measure.planted import PLANTED_FEATURES, SIMULATOR_NAMES, planted_table


def _write(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _stats(tmp_path, conditions, d_of):
    """A measure folder whose translated effect is half the real one, real d = d_of(feature, condition)."""
    rows = [dict(feature=f, target_condition=c, real_d=d_of(f, c), trans_d=d_of(f, c) / 2,
                 trans_d_common=d_of(f, c) / 2, real_q=0.001 if d_of(f, c) else 0.9, direction_agrees="True")
            for f, _ in PLANTED_FEATURES.values() for c in conditions[1:]]
    _write(tmp_path / "stats.csv", rows)
    _write(tmp_path / "dose_correlation.csv", [dict(feature=f, pearson_r=0.9) for f, _ in PLANTED_FEATURES.values()])
    return tmp_path


def test_dose_series_reads_the_strongest_condition(tmp_path):
    conds = ["control", "low", "high"]
    rows = planted_table(_stats(tmp_path, conds, lambda f, c: {"low": 1.0, "high": 3.0}[c]), conds)
    assert len(rows) == len(PLANTED_FEATURES)
    for r in rows:
        assert r["real_d"] == 3.0 and r["ratio"] == pytest.approx(0.5)
        assert r["doses_checked"] == "low,high" and r["dose_correlation"] == 0.9


def test_separate_mode_reads_each_phenotype_at_its_own_condition(tmp_path):
    planted = ["golgi-fragmentation", "nuclear-enlargement"]
    feature_of = {SIMULATOR_NAMES[p]: f for p, (f, _) in PLANTED_FEATURES.items()}
    conds = ["control", *planted]
    # each feature moves by 2 in its own condition and by 0.1 elsewhere
    rows = planted_table(_stats(tmp_path, conds, lambda f, c: 2.0 if feature_of[c] == f else 0.1), conds)
    assert {SIMULATOR_NAMES[r["phenotype"]] for r in rows} == set(planted)
    for r in rows:
        assert r["real_d"] == 2.0 and r["doses_checked"] == SIMULATOR_NAMES[r["phenotype"]]
        assert math.isnan(r["dose_correlation"]) and not r["correlation_ok"]  # no series to correlate


def test_planted_by_target_and_separation_read_each_direction(tmp_path):
    from phenolens.measure.planted import planted_by_target, separation

    nuc, golgi = PLANTED_FEATURES["nuclear enlargement"][0], PLANTED_FEATURES["Golgi fragmentation"][0]
    rows = [dict(feature=f, target_condition=t, real_d=1.0, trans_d_common=v)
            for t, f, v in (("direction=0,alpha=1", nuc, 1.2), ("direction=0,alpha=1", golgi, -0.3),
                            ("direction=1,alpha=-1", nuc, 0.2), ("direction=1,alpha=-1", golgi, 0.25))]
    _write(tmp_path / "stats.csv", rows)
    table = planted_by_target(tmp_path)
    assert [(r["target"], r["phenotype"]) for r in table][:2] == [("direction=0,alpha=1", "nuclear enlargement"),
                                                                 ("direction=0,alpha=1", "Golgi fragmentation")]
    first = separation(table, "direction=0,alpha=1")
    assert first["largest"] == "nuclear enlargement" and first["ratio_to_next"] == pytest.approx(4.0)
    assert separation(table, "direction=1,alpha=-1")["ratio_to_next"] == pytest.approx(1.25)


def test_separate_data_counts_only_the_phenotypes_it_plants(tmp_path):
    """On --mode separate data the cell count is not planted: a direction that moves it most is judged
    on the planted phenotypes only."""
    from phenolens.measure.planted import planted_by_target, planted_in, separation

    count, golgi = PLANTED_FEATURES["cell loss"][0], PLANTED_FEATURES["Golgi fragmentation"][0]
    nuc = PLANTED_FEATURES["nuclear enlargement"][0]
    rows = [dict(feature=f, target_condition="direction=0,alpha=1", real_d=1.0, trans_d_common=v)
            for f, v in ((count, 3.0), (golgi, 1.5), (nuc, 0.5))]
    _write(tmp_path / "stats.csv", rows)
    assert planted_in(["control", "low", "high"]) is None
    planted = planted_in(["control", "golgi-fragmentation", "nuclear-enlargement"])
    assert set(planted) == {"Golgi fragmentation", "nuclear enlargement"}
    everything = separation(planted_by_target(tmp_path), "direction=0,alpha=1")
    assert everything["largest"] == "cell loss"
    mine = separation(planted_by_target(tmp_path, phenotypes=planted), "direction=0,alpha=1")
    assert mine["largest"] == "Golgi fragmentation" and mine["ratio_to_next"] == pytest.approx(3.0)
