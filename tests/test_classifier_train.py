"""`phenolens classifier train` (issue 12, item 1): a classifier of the conditions, its held-out accuracy,
saved with its class names, channels and normalisation, and loaded back."""

import csv
import json

import numpy as np
import pytest

from phenolens.cli import main
from phenolens.data.io import read_image
from phenolens.errors import PhenolensError


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from phenolens.data.simulate import simulate

    return simulate(tmp_path_factory.mktemp("clf") / "sim", conditions=["control", "high"], per_condition=20,
                    size=40, seed=2, progress=False)


@pytest.fixture(scope="module")
def trained(sim, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf_out") / "clf"
    assert main(["classifier", "train", str(sim), str(out), "--steps", "80", "--channels", "0,3,2",
                 "--conditions", "high,control", "--save-config", str(out.parent / "clf.json")]) == 0
    return out


def _heldout(out):
    with open(out / "heldout.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_scores_a_heldout_share_and_separates_strong_phenotypes(trained):
    info = json.loads((trained / "phenolens_classifier.json").read_text())
    rows = _heldout(trained)
    assert len(rows) == 8 and sorted(r["condition"] for r in rows).count("control") == 4  # 20 % of each
    ev = info["evaluation"]
    assert ev["images"] == 8 and ev["accuracy"] == np.mean([r["condition"] == r["predicted"] for r in rows])
    assert ev["accuracy"] >= 0.75  # every phenotype planted at strength 1: far from the 50 % of chance
    assert info["channels"] == [0, 3, 2] and info["n_channels"] == 3 and info["image_size"] == 40
    assert info["training"]["images"] == 40 - len({r["path"] for r in rows})  # none trained on and scored


def test_saved_classifier_loads_with_class_names_from_the_data(trained):
    from phenolens.models.condition_classifier import ConditionClassifier

    clf = ConditionClassifier.from_pretrained(trained)
    assert clf.classes == ["high", "control"]  # --conditions order, read from config.json's id2label
    rows = _heldout(trained)
    raws = [read_image(r["path"], channels=[0, 3, 2])[0] for r in rows]
    proba = clf.predict_proba(clf.prepare(raws, [r["path"] for r in rows]))
    # loaded from disk, it predicts what it predicted when trained
    assert [clf.classes[k] for k in proba.argmax(1)] == [r["predicted"] for r in rows]
    np.testing.assert_allclose(proba[:, 0], [float(r["p_high"]) for r in rows], atol=1e-3)
    with pytest.raises(PhenolensError, match="has 4 channel"):
        clf.prepare([read_image(rows[0]["path"])[0]], ["x.tif"])
    with pytest.raises(PhenolensError, match="is 20x20 px; the classifier reads crops of 40 px"):
        clf.prepare([raws[0][:, :20, :20]], ["small.tif"])
    with pytest.raises(PhenolensError, match="'treated' is not a class"):
        clf.class_index("treated", "--target")


def test_a_finished_classifier_is_replaced_only_with_overwrite(trained, sim, tmp_path):
    mine = trained / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(PhenolensError, match="holds a trained classifier already; pass --overwrite"):
        from phenolens.run.classifier import ClassifierSettings, train_condition_classifier

        train_condition_classifier(sim, trained, ClassifierSettings(steps=2), progress=False)
    # replayed from the saved config, with --overwrite: same options (3 channels), notes.txt kept
    assert main(["classifier", "train", str(sim), str(trained), "--config", str(trained.parent / "clf.json"),
                 "--steps", "2", "--overwrite"]) == 0
    assert mine.read_text() == "mine"
    assert json.loads((trained / "phenolens_classifier.json").read_text())["channels"] == [0, 3, 2]


@pytest.mark.parametrize("argv, message", [
    (["--heldout", "1"], "--heldout 1.0: must be a share"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--conditions", "control,treated"], "names treated, not found"),
])
def test_bad_options_are_one_line(sim, tmp_path, capsys, argv, message):
    assert main(["classifier", "train", str(sim), str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phenolens classifier: error:") and message in err and "\n" not in err


def test_output_inside_the_data_and_a_one_image_condition_are_refused(sim, tmp_path):
    from phenolens.data.simulate import simulate
    from phenolens.run.classifier import ClassifierSettings, train_condition_classifier

    with pytest.raises(PhenolensError, match="lies inside the input"):
        train_condition_classifier(sim, sim / "clf", ClassifierSettings(steps=1), progress=False)
    one = simulate(tmp_path / "one", conditions=["a", "b"], per_condition=1, size=32, progress=False)
    with pytest.raises(PhenolensError, match="condition 'a' has 1 image"):
        train_condition_classifier(one, tmp_path / "o", ClassifierSettings(steps=1), progress=False)


def test_evaluation_counts():
    from phenolens.run.classifier import evaluation, format_evaluation

    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    ev = evaluation(proba, np.array([0, 1, 1, 1]), ["a", "b"])
    assert ev["accuracy"] == 0.75 and ev["per_class"] == {"a": 1.0, "b": pytest.approx(2 / 3)}
    assert ev["confusion"] == {"a": {"a": 1, "b": 0}, "b": {"a": 1, "b": 2}} and ev["chance"] == 0.75
    assert "held-out accuracy 75.0 % on 4 images (a 100 %, b 67 %" in format_evaluation(ev)


def test_config_of_the_nested_command_is_checked_by_its_own_options(sim, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"shape": "vgg"}))
    assert main(["classifier", "train", str(sim), str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "'shape' (--shape)" in capsys.readouterr().err
    bad.write_text(json.dumps({"preset": "tiny"}))
    assert main(["classifier", "train", str(sim), str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "unknown option 'preset' for `phenolens classifier train`" in capsys.readouterr().err
