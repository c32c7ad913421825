"""The core every method shares (issue 10): the method registry, the edit column, edit-friendly DDPM
inversion through the command line, what --seed means, no rendering of an edit that changes nothing,
no prints from library code and no touching of the caller's random state."""

from __future__ import annotations

import csv
import hashlib
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import CONDITIONS, run_cli

FAST = ["--steps", "4", "--inversion-iters", "2"]
# the columns index.csv had before edits existed: none may go
OLD_COLUMNS = ["source_path", "source_condition", "target_condition", "output_path", "recon_mse", "recon_psnr",
               "change_mse", "kind", "reconstruction_path", "clipped_fraction", "recon_mae_raw", "recon_mse_raw",
               "source_dtype", "model_hash", "source_size", "source_mtime_ns"]


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def digest(folder: Path, translations_only: bool = False) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.tif")) if not (translations_only and p.name == "reconstruction.tif")}


# ------------------------------------------------------------------------------ a toy method
def _toy_class():
    """A new method, all of it in this file (built in a function: phenolens is imported by the tests)."""
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.methods.core import NamedConditionModel
    from phenolens.models.store import load_info

    class Toy(NamedConditionModel):
        """An identity "model": ε = 0 whatever the condition, so DDIM moves an image along a straight
        line and back; it records the labels the network is called with."""

        seen: list[int] = []

        @classmethod
        def from_pretrained(cls, model_dir, device=None):
            return cls(load_info(Path(model_dir)), make_scheduler(prediction_type="epsilon"), device="cpu")

        def network(self):
            def fn(x, t, condition):
                Toy.seen.extend(int(v) for v in condition["class_labels"])
                return torch.zeros_like(x)
            return fn

        def label_condition(self, labels):
            return {"class_labels": labels}

        def spatial_factor(self):
            return 1

    return Toy


def _toy_model_dir(root: Path, data: Path) -> Path:
    from phenolens.data.io import read_image
    from phenolens.data.normalize import Normalizer
    from phenolens.models.store import ModelInfo, save_info

    images = [read_image(p)[0] for p in sorted(data.glob("*/*.tif"))]
    model_dir = root / "toy-model"
    model_dir.mkdir()
    save_info(model_dir, ModelInfo(conditions=list(CONDITIONS), n_channels=2, image_size=24,
                                   normalization=Normalizer.fit(images).to_dict(), method="toy"))
    return model_dir


def test_a_method_registered_from_outside_translates_through_the_cli(blob_data, tmp_path, monkeypatch):
    from phenolens.methods import registry

    model_dir = _toy_model_dir(tmp_path, blob_data)
    code, _, err = run_cli("translate", model_dir, blob_data / "ctrl", tmp_path / "refused", *FAST)
    assert code == 2 and "'toy'" in err and "phenolens.json" in err and "phendiff" in err  # not known yet

    Toy = _toy_class()
    monkeypatch.setitem(registry.METHODS, "toy", "placeholder:Removed")  # so the entry goes after the test
    registry.register("toy", Toy.from_pretrained)  # the one line a new method adds
    out = tmp_path / "run"
    code, _, err = run_cli("translate", model_dir, blob_data / "ctrl", out, "--to", "dose1", "ctrl", *FAST)
    assert code == 0, err
    rows = read_rows(out / "index.csv")
    assert len(rows) == 4 * 2
    assert sorted({r["edit"] for r in rows}) == ["to=ctrl", "to=dose1"]
    for r in rows:
        assert r["edit"] == f"to={r['target_condition']}"
        assert float(r["recon_psnr"]) > 60  # ε = 0: inversion and rendering are exact scalings
        recon, res = (tifffile.imread(out / r[k]).astype(int) for k in ("reconstruction_path", "output_path"))
        assert np.abs(recon - res).max() <= 1  # the identity renders every condition alike
    # the edit reached the network: renders under dose1 (label 1); nothing under dose2 (label 2)
    assert {0, 1} <= set(Toy.seen) and 2 not in Toy.seen


# ------------------------------------------------------------------------------- index.csv
def test_index_has_the_edit_and_inversion_cost_and_every_old_column(tiny_model, blob_data, tmp_path):
    out = tmp_path / "run"
    args = ("translate", tiny_model, blob_data, out, "--to", "ctrl", "dose2", *FAST)
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    rows = read_rows(out / "index.csv")
    assert len(rows) == 12 * 2
    assert all(col in rows[0] for col in OLD_COLUMNS + ["edit", "inversion_forwards"])
    for r in rows:
        assert r["edit"] == f"to={r['target_condition']}"
        assert int(r["inversion_forwards"]) > 0
    assert "network calls per image" in stdout  # the run reports what inversion cost
    # an index.csv of a phenolens before edits: its rows are kept as done and get their edit
    old = [{k: v for k, v in r.items() if k not in ("edit", "inversion_forwards")} for r in rows]
    with (out / "index.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(old[0]))
        w.writeheader()
        w.writerows(old)
    before = digest(out)
    assert run_cli(*args)[0] == 0
    assert digest(out) == before
    assert [r["edit"] for r in read_rows(out / "index.csv")] == [r["edit"] for r in rows]


# ------------------------------------------------------------------------------------ EF-DDPM
@pytest.mark.parametrize("skip", [0, 10])
def test_ef_ddpm_reconstructs_exactly_at_every_skip(tiny_model, blob_data, tmp_path, skip):
    out = tmp_path / "run"
    code, _, err = run_cli("translate", tiny_model, blob_data / "ctrl", out, "--to", "ctrl", "dose2",
                           "--inversion", "ef-ddpm", "--steps", "12", "--skip", str(skip))
    assert code == 0, err
    rows = read_rows(out / "index.csv")
    assert len(rows) == 8
    for r in rows:
        assert float(r["recon_psnr"]) >= 60, r
        assert int(r["inversion_forwards"]) == 12 - skip  # one call per step rendered
    changed = [float(r["change_mse"]) for r in rows if r["kind"] == "translation"]
    assert min(changed) > 100 * max(float(r["recon_mse"]) for r in rows)  # and the edit does change the image


def test_skip_out_of_range_is_one_clear_line(tiny_model, blob_data, tmp_path):
    code, _, err = run_cli("translate", tiny_model, blob_data / "ctrl", tmp_path / "run", "--inversion", "ef-ddpm",
                           "--steps", "4", "--skip", "4")
    assert code == 2 and "--skip" in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------- --seed
def test_seed_changes_nothing_for_deterministic_inversion(tiny_model, blob_data, tmp_path):
    out = tmp_path / "run"
    args = ("translate", tiny_model, blob_data / "ctrl", out, "--to", "dose1", *FAST)
    assert run_cli(*args, "--seed", "1")[0] == 0
    before = digest(out)
    index = (out / "index.csv").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")}
    code, _, err = run_cli(*args, "--seed", "2")  # no --overwrite needed: the seed is not used
    assert code == 0, err
    assert digest(out) == before and (out / "index.csv").read_text() == index
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")} == mtimes  # nothing was redone


def test_seed_is_the_ef_ddpm_noise_draw(tiny_model, blob_data, tmp_path):
    def run(name, seed, *extra):
        args = ("translate", tiny_model, blob_data / "ctrl", tmp_path / name, "--to", "dose1", "--inversion",
                "ef-ddpm", "--steps", "6", "--seed", str(seed), *extra)
        return run_cli(*args)

    assert run("a", 1)[0] == 0
    code, _, err = run("a", 2)
    assert code == 2 and "seed" in err and "--overwrite" in err  # another draw: refused
    assert run("b", 2)[0] == 0 and run("c", 1)[0] == 0
    a, b, c = (digest(tmp_path / n, translations_only=True) for n in "abc")
    assert a == c  # same seed, same files
    assert len(a) == 4 and all(a[k] != b[k] for k in a)  # another seed, other translations
    assert run("a", 2, "--overwrite")[0] == 0
    assert digest(tmp_path / "a", translations_only=True) == b


def test_ef_ddpm_draw_does_not_depend_on_where_the_files_live(tiny_model, blob_data, tmp_path):
    """The noise comes from the pixels, not the path: a copied dataset (another machine, a re-run of a
    shipped validation) gets the same translations."""
    copy = tmp_path / "elsewhere" / "ctrl"
    shutil.copytree(blob_data / "ctrl", copy)
    for name, folder in (("here", blob_data / "ctrl"), ("there", copy)):
        code, _, err = run_cli("translate", tiny_model, folder, tmp_path / name, "--to", "dose1",
                               "--inversion", "ef-ddpm", "--steps", "6", "--seed", "3")
        assert code == 0, err
    here, there = (digest(tmp_path / n, translations_only=True) for n in ("here", "there"))
    # output folder names carry a hash of the source path: compare the files' contents
    assert len(here) == 4 and sorted(here.values()) == sorted(there.values())


def test_ef_ddpm_output_does_not_depend_on_the_batch_size(tiny_model, blob_data, tmp_path):
    for name, batch in (("one", "1"), ("all", "4")):
        code, _, err = run_cli("translate", tiny_model, blob_data / "ctrl", tmp_path / name, "--to", "dose1",
                               "--inversion", "ef-ddpm", "--steps", "6", "--seed", "3", "--batch-size", batch)
        assert code == 0, err
    one, every = read_rows(tmp_path / "one" / "index.csv"), read_rows(tmp_path / "all" / "index.csv")
    assert [r["source_path"] for r in one] == [r["source_path"] for r in every]
    for r1, r4 in zip(one, every):
        x1 = tifffile.imread(tmp_path / "one" / r1["output_path"]).astype(int)
        x4 = tifffile.imread(tmp_path / "all" / r4["output_path"]).astype(int)
        assert np.abs(x1 - x4).max() <= 1  # equal up to the last bit of float batching


# ----------------------------------------------------------------------- no render of no change
def _counted(model):
    """Wrap MODEL's network so that every call's labels are recorded (one list per call)."""
    calls: list[list[int]] = []
    network = model.network

    def counting():
        fn = network()

        def call(x, t, condition):
            calls.append(condition["class_labels"].tolist())
            return fn(x, t, condition)
        return call

    model.network = counting
    return calls


def _ctrl_images(blob_data):
    from phenolens.data.io import read_image

    return [read_image(p)[0] for p in sorted((blob_data / "ctrl").glob("*.tif"))]


def test_a_target_equal_to_the_source_is_not_rendered(tiny_model, blob_data):
    from phenolens.diffusion.inversion import InversionSettings
    from phenolens.methods.phendiff import PhenDiff

    model = PhenDiff.from_pretrained(tiny_model, device="cpu")
    calls = _counted(model)
    images = _ctrl_images(blob_data)
    steps = 4
    result = model.translate(images, "ctrl", ["ctrl", "dose1"], inversion=InversionSettings(method="ddim", steps=steps))
    # inversion, the reconstruction, dose1: one call per step each; ctrl is the reconstruction
    assert len(calls) == 3 * steps
    assert calls[2 * steps:] == [[1] * 4] * steps and [0] * 4 in calls[:2 * steps]
    assert result.render_forwards.tolist() == [2 * steps] * 4
    assert result.inversion_forwards.tolist() == [steps] * 4
    assert all(np.array_equal(a, b) for a, b in zip(result.translations["ctrl"], result.reconstructions))

    # mixed sources: an edit renders only the images it changes
    calls.clear()
    result = model.translate(images, ["ctrl", "ctrl", "dose1", "dose1"], ["to=dose1"],
                             inversion=InversionSettings(method="ddim", steps=steps))
    assert len(calls) == 3 * steps and calls[2 * steps:] == [[1, 1]] * steps
    assert result.render_forwards.tolist() == [2 * steps, 2 * steps, steps, steps]
    assert np.array_equal(result.translations["to=dose1"][2], result.reconstructions[2])


def test_skip_sweep_from_one_inversion_matches_one_translation_per_skip(tiny_model, blob_data):
    """sweep_skip (DIFFusion's edits of decreasing strength) renders each T_skip from the path of one
    inversion; with a deterministic inversion that is what inverting to each T_skip alone gives."""
    from phenolens.diffusion.inversion import InversionSettings
    from phenolens.methods.phendiff import PhenDiff

    model = PhenDiff.from_pretrained(tiny_model, device="cpu")
    images = _ctrl_images(blob_data)[:2]
    # (late starts only: on this random-weight network fixed-point inversion converges for the last few steps)
    inv = InversionSettings(method="fixed-point", steps=8, tol=0.0, iters=30)
    sweep = model.sweep_skip(images, "ctrl", "dose2", [5, 7, 6], inversion=inv)
    assert sweep.skips == [7, 6, 5] and sweep.recon_mse.max() < 1e-9
    for k in sweep.skips:
        one = model.translate(images, "ctrl", ["dose2"], inversion=InversionSettings(
            method="fixed-point", steps=8, tol=0.0, iters=30, skip=k))
        for a, b in zip(sweep.outputs[k], one.translations["dose2"]):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * float(np.abs(b).max()))
    assert sweep.change_mse[7].mean() < sweep.change_mse[5].mean()  # a later start keeps closer to the source


def test_ef_ddpm_code_restarted_on_its_path_still_reconstructs_exactly(tiny_model, blob_data):
    from phenolens.diffusion.inversion import InversionSettings
    from phenolens.methods.phendiff import PhenDiff

    model = PhenDiff.from_pretrained(tiny_model, device="cpu")
    x0, _ = model.to_model_space(_ctrl_images(blob_data)[:2])
    cond = model.condition(x0, ["ctrl", "ctrl"])
    code = model.invert(x0, cond, InversionSettings(method="ef-ddpm", steps=6), generator=torch.Generator().manual_seed(0))
    path = {}
    full = model.render(code, cond, trajectory=path)
    assert sorted(path) == list(range(6)) and torch.equal(path[0], code.x)
    for k in (1, 3, 5):
        torch.testing.assert_close(model.render(code.restart(k, path[k]), cond), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="can restart at steps 0 to 5"):
        code.restart(6, path[5])


# ----------------------------------------------------------------------------- no prints
@pytest.fixture
def library_logging(monkeypatch, caplog):
    """Library messages as a script sees them: no console handler (an earlier CLI test in this process
    installs one on the "phenolens" logger), records kept by caplog."""
    logger = logging.getLogger("phenolens")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="phenolens")
    return caplog


def test_library_code_does_not_print(blob_data, tiny_model, tmp_path, capsys, library_logging):
    from phenolens.methods.phendiff import PhenDiffTrainSettings, train_phendiff
    from phenolens.run.translate import TranslateSettings, run_translate
    from phenolens.train.trainer import TrainConfig

    capsys.readouterr()
    train_phendiff(blob_data, tmp_path / "model", PhenDiffTrainSettings(size=16),
                   TrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=100), progress=False)
    run_translate(TranslateSettings(model_dir=str(tiny_model), input=str(blob_data / "ctrl"), targets=["dose1"],
                                    steps=2, inversion_iters=1), tmp_path / "run", progress=False)
    run_translate(TranslateSettings(model_dir=str(tiny_model), input=str(blob_data / "ctrl"), targets=["dose1"],
                                    steps=2, inversion="ef-ddpm"), tmp_path / "run-ef", progress=False)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert "conditions, in this order: ctrl, dose1, dose2" in library_logging.text  # logged, not lost


def test_the_cli_still_shows_information_on_stdout(blob_data, tmp_path):
    code, out, err = run_cli("train", blob_data, tmp_path / "model", "--size", "16", "--steps", "1",
                             "--batch-size", "2", "--warmup-steps", "1", "--checkpoint-every", "10")
    assert code == 0, err
    assert "conditions, in this order: ctrl, dose1, dose2" in out and "conditions, in this order" not in err


# -------------------------------------------------------------------------- the caller's RNG
def _rng_state():
    return torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()


def _assert_same(before, after, what: str):
    assert torch.equal(before[0], after[0]), f"{what} changed torch's global random state"
    assert before[1] == after[1], f"{what} changed Python's random state"
    assert np.array_equal(before[2], after[2]), f"{what} changed NumPy's global random state"


def test_training_and_translation_leave_the_global_rng_alone(blob_data, tiny_model, tmp_path):
    from phenolens.methods.phendiff import PhenDiffTrainSettings, train_phendiff
    from phenolens.run.translate import TranslateSettings, run_translate
    from phenolens.train.trainer import TrainConfig

    torch.manual_seed(1234)
    model_dir = tmp_path / "model"
    before = _rng_state()
    train_phendiff(blob_data, model_dir, PhenDiffTrainSettings(size=16),
                   TrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=1), progress=False)
    _assert_same(before, _rng_state(), "train")
    torch.manual_seed(99)  # another state than the checkpoint saved: resuming must not restore that one
    random.seed(7)
    np.random.seed(5)
    before = _rng_state()
    train_phendiff(blob_data, model_dir, PhenDiffTrainSettings(size=16),
                   TrainConfig(steps=3, batch_size=2, warmup_steps=1, checkpoint_every=1), resume=True, progress=False)
    _assert_same(before, _rng_state(), "train --resume")
    for inversion in ("fixed-point", "ef-ddpm"):
        before = _rng_state()
        run_translate(TranslateSettings(model_dir=str(tiny_model), input=str(blob_data / "ctrl"), targets=["dose1"],
                                        steps=2, inversion=inversion), tmp_path / inversion, progress=False)
        _assert_same(before, _rng_state(), f"translate --inversion {inversion}")


def test_classifiers_leave_the_global_rng_alone_and_depend_on_their_seed(tmp_path):
    from phenolens.measure.oracles import OracleEnsemble
    from phenolens.models.classifier import predict, train_classifier
    from phenolens.models.latent import build_tiny_base

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 2, 32, 32, generator=gen) * 2 - 1
    y = torch.arange(16) % 2

    before = _rng_state()
    clf = train_classifier(x, y, 2, steps=2, batch_size=4, seed=3, progress=False)
    _assert_same(before, _rng_state(), "train_classifier")
    torch.manual_seed(5)  # another global state: the same seed still gives the same classifier
    again = train_classifier(x, y, 2, steps=2, batch_size=4, seed=3, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), again.state_dict().values()))
    assert predict(clf, x).shape == (16,)

    before = _rng_state()
    oracles = OracleEnsemble.train(x, y, 2, steps=2, batch_size=4, seed=1, shapes=("mobilenet_v2",))
    _assert_same(before, _rng_state(), "OracleEnsemble.train")
    torch.manual_seed(6)  # MobileNetV2 has dropout: its masks, too, come from the seed
    again = OracleEnsemble.train(x, y, 2, steps=2, batch_size=4, seed=1, shapes=("mobilenet_v2",))
    assert np.array_equal(oracles.predict_proba(x), again.predict_proba(x))

    before = _rng_state()
    build_tiny_base(tmp_path / "base")
    _assert_same(before, _rng_state(), "build_tiny_base")
