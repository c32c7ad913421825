"""measure and report on a run whose edits are more than "to another condition" (DiffEx directions, issue
12 item 6): each such edit is its own target, compared with the real images of its reference condition."""

import csv
import shutil

from phenolens.run.index import edits_as_targets, reference_of


def test_edits_become_their_own_targets():
    rows = [dict(target_condition="a", kind="reconstruction", edit="to=a"),
            dict(target_condition="b", kind="translation", edit="to=b"),
            dict(target_condition="b", kind="translation", edit="direction=2,alpha=1.5"),
            dict(target_condition="b", kind="translation")]  # a run of a phenolens before edits
    edits_as_targets(rows)
    assert [r["target_condition"] for r in rows] == ["a", "b", "direction=2,alpha=1.5", "b"]
    assert reference_of(rows) == {"a": "a", "b": "b", "direction=2,alpha=1.5": "b"}


def test_measure_and_report_give_a_direction_its_own_statistics(tmp_path):
    from phenolens.data.simulate import simulate
    from phenolens.report.html import write_report
    from phenolens.run.measure import MeasureSettings, run_measure

    data = simulate(tmp_path / "data", conditions=["control", "high"], per_condition=6, size=48, seed=1,
                    progress=False)
    run = tmp_path / "run"
    rows = []
    for i in range(4):  # "renders" of four control images: reconstruction = the source; the direction's
        src = data / "control" / f"control_{i:05d}.tif"  # render = a real high image (a perfect edit)
        (run / f"c{i}").mkdir(parents=True)
        shutil.copy(src, run / f"c{i}" / "reconstruction.tif")
        shutil.copy(data / "high" / f"high_{i:05d}.tif", run / f"c{i}" / "dir.tif")
        common = dict(source_path=str(src), source_condition="control", recon_mse="0", recon_psnr="99",
                      reconstruction_path=f"c{i}/reconstruction.tif", change_mse="0.01")
        rows += [dict(common, target_condition="control", output_path=f"c{i}/reconstruction.tif",
                      kind="reconstruction", edit="to=control"),
                 dict(common, target_condition="high", output_path=f"c{i}/dir.tif", kind="translation",
                      edit="direction=3,alpha=2")]
    with open(run / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = run_measure(run, MeasureSettings(reference=str(data), judges=False), progress=False)
    with open(out / "stats.csv", newline="") as fh:
        stats = [r for r in csv.DictReader(fh) if r["feature"] == "Nuclei_Area"]
    assert [r["target_condition"] for r in stats] == ["direction=3,alpha=2"]
    assert int(stats[0]["n_real_target"]) == 6 and int(stats[0]["n_translation"]) == 4  # real = the 6 high images
    assert float(stats[0]["real_d"]) > 0 and float(stats[0]["trans_d"]) > 0  # nuclei grow in both
    page = write_report(run, None)
    assert "direction=3,alpha=2" in page.read_text()
