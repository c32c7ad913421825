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
    assert main(["classifier", "train", str(sim), str(out), "--steps", "150", "--channels", "0,3,2",
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
    with pytest.raises(PhenolensError, match="holds a classifier already; pass --overwrite"):
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
    (["--channel-dropout", "1"], "--channel-dropout 1.0: must be a probability"),
    (["--conditions", "control,treated"], "names treated, not found"),
])
def test_bad_options_are_one_line(sim, tmp_path, capsys, argv, message):
    assert main(["classifier", "train", str(sim), str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phenolens classifier: error:") and message in err and "\n" not in err


def test_channel_dropout_blanks_stains_but_always_keeps_one():
    import torch

    from phenolens.models.classifier import blank_channels

    x = torch.rand(4000, 4, 3, 3)
    y = blank_channels(x, 0.5, torch.Generator().manual_seed(0))
    blank = (y == -1).all(-1).all(-1)
    assert not blank.all(1).any()  # every image keeps a stain to be classified by
    assert torch.equal(y[~blank], x[~blank])  # the kept stains are untouched
    # a stain goes when it is drawn (p) and is not the one kept (3 in 4)
    assert abs(blank.float().mean().item() - 0.5 * 3 / 4) < 0.02
    assert torch.equal(blank_channels(x, 0.0, torch.Generator()), x)


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


class _TinyNet(__import__("torch").nn.Module):
    """A user's own classifier: any torch module whose forward maps (B, C, H, W) to logits."""

    def __init__(self, n_channels: int, n_classes: int):
        import torch

        super().__init__()
        self.conv = torch.nn.Conv2d(n_channels, 8, 3)
        self.head = torch.nn.Linear(8, n_classes)

    def forward(self, x):
        return self.head(self.conv(x).relu().mean((-2, -1)))


def test_import_a_torchscript_classifier_and_evaluate_it(sim, tmp_path, capsys):
    import torch

    from phenolens.models.condition_classifier import ConditionClassifier

    torch.manual_seed(0)
    net = _TinyNet(2, 2).eval()
    torch.jit.save(torch.jit.script(net), str(tmp_path / "mine.pt"))
    assert main(["classifier", "import", str(tmp_path / "mine.pt"), str(tmp_path / "clf"), "--size", "32",
                 "--classes", "control,high", "--channels", "3,0", "--offset", "100,0", "--scale", "1000"]) == 0
    clf = ConditionClassifier.from_pretrained(tmp_path / "clf")
    assert clf.classes == ["control", "high"] and clf.info.format == "torchscript"
    raw = read_image(sim / "high" / "high_00000.tif", channels=[3, 0])[0]
    crop = raw[:, 4:36, 4:36]  # centre 32 px of 40
    expected = net(torch.from_numpy((crop - np.array([100, 0])[:, None, None]) / 1000).float()[None]).softmax(1)
    np.testing.assert_allclose(clf.predict_proba(clf.prepare([raw])), expected.detach().numpy(), atol=1e-5)
    # evaluate: every image of DATA, rows written, accuracy matches them
    assert main(["classifier", "evaluate", str(tmp_path / "clf"), str(sim), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    acc = np.mean([r["condition"] == r["predicted"] for r in rows])
    assert len(rows) == 40 and f"accuracy {100 * acc:.1f} % on 40 images" in capsys.readouterr().out


class _StainOneNet(__import__("torch").nn.Module):
    """A classifier that looks at stain 1 only: bright means "high"."""

    def forward(self, x):
        high = (x[:, 1].mean((-2, -1)) - 500) / 100
        return __import__("torch").stack([-high, high], 1)


def test_evaluate_per_stain_finds_the_stain_a_classifier_uses(tmp_path, capsys):
    import tifffile
    import torch

    rng = np.random.default_rng(0)
    for cond, level in (("control", 100), ("high", 1000)):
        (tmp_path / "data" / cond).mkdir(parents=True)
        for k in range(4):
            img = np.stack([rng.integers(0, 2000, (16, 16)), np.full((16, 16), level)]).astype(np.uint16)
            tifffile.imwrite(tmp_path / "data" / cond / f"{cond}_{k}.tif", img)
    torch.jit.save(torch.jit.trace(_StainOneNet(), torch.zeros(2, 2, 16, 16)), str(tmp_path / "one.pt"))
    assert main(["classifier", "import", str(tmp_path / "one.pt"), str(tmp_path / "clf"), "--size", "16",
                 "--classes", "control,high", "--channels", "0,1", "--scale", "1"]) == 0
    capsys.readouterr()
    assert main(["classifier", "evaluate", str(tmp_path / "clf"), str(tmp_path / "data"), "--per-stain"]) == 0
    out = capsys.readouterr().out
    assert "accuracy 100.0 % on 8 images" in out
    # stain 1 alone classifies as well as both; without it every image looks like control (half right)
    assert "file channel 0: 50.0 % with this stain alone, 100.0 % without it" in out
    assert "file channel 1: 100.0 % with this stain alone, 50.0 % without it" in out


@pytest.mark.parametrize("argv, message", [
    (["--classes", "a,b,c", "--channels", "0,1"], "names 3 class(es) (a, b, c) but SOURCE"),
    (["--classes", "a,b"], "channel count is unknown; give --channels"),
    (["--classes", "a,b", "--channels", "0,1,2"], "fails on a batch of 3-channel 32 px images"),
    (["--classes", "a,a", "--channels", "0,1"], "need 2 or more distinct names"),
    (["--classes", "a,b", "--channels", "0,1", "--scale", "0"], "--scale: values must be above 0"),
    (["--classes", "a,b", "--channels", "0,1", "--offset", "1,2,3"], "one per channel (2); got 3"),
    (["--classes", "a,b", "--channels", "0,1", "--offset", "x"], "--offset x: expected numbers"),
])
def test_import_checks_the_declaration_against_the_network(tmp_path, capsys, argv, message):
    import torch

    torch.jit.save(torch.jit.script(_TinyNet(2, 2)), str(tmp_path / "mine.pt"))
    assert main(["classifier", "import", str(tmp_path / "mine.pt"), str(tmp_path / "o"), "--size", "32", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "o" / "phenolens_classifier.json").exists()


def test_import_a_transformers_folder_takes_its_labels_and_refuses_placeholders(tmp_path, capsys):
    from phenolens.models.classifier import build_classifier
    from phenolens.models.condition_classifier import ConditionClassifier

    model = build_classifier(4, 2)
    model.save_pretrained(tmp_path / "tf")
    assert main(["classifier", "import", str(tmp_path / "tf"), str(tmp_path / "o"), "--size", "40"]) == 2
    assert "give --classes" in capsys.readouterr().err
    model.config.id2label = {0: "DMSO", 1: "CHX"}
    model.save_pretrained(tmp_path / "tf")
    assert main(["classifier", "import", str(tmp_path / "tf"), str(tmp_path / "o"), "--size", "40"]) == 0
    assert ConditionClassifier.from_pretrained(tmp_path / "o").classes == ["DMSO", "CHX"]
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    assert main(["classifier", "import", str(tmp_path / "bad.pt"), str(tmp_path / "o2"), "--size", "40"]) == 2
    assert "not a TorchScript model" in capsys.readouterr().err


def test_evaluate_refuses_data_whose_conditions_are_not_its_classes(trained, tmp_path, capsys):
    from phenolens.data.simulate import simulate

    other = simulate(tmp_path / "d", conditions=["control", "treated"], per_condition=1, size=40, progress=False)
    assert main(["classifier", "evaluate", str(trained), str(other)]) == 2
    err = capsys.readouterr().err
    assert "condition(s) treated are not classes of the classifier" in err and "high, control" in err
    assert main(["classifier", "evaluate", str(tmp_path / "nothing"), str(other)]) == 2
    assert "no such classifier folder" in capsys.readouterr().err
