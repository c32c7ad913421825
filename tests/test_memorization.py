"""The memorisation check (Phen-LDiff Fig. 4): split, scores, outputs and errors, on tiny random models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONDITIONS, run_cli, write_blob_images
from phenolens.data.records import discover
from phenolens.errors import PhenolensError
from phenolens.measure.memorization import dihedral, nearest_training, paired_cosine
from phenolens.run.memorization import memorization_check, split_halves


def _paths(records) -> set[Path]:
    return {Path(r.path).resolve() for r in records}


@pytest.fixture(scope="module")
def split_data(tmp_path_factory) -> Path:
    return write_blob_images(tmp_path_factory.mktemp("split"), per_condition=7, size=16, seed=3)


def test_halves_disjoint_stratified_deterministic(split_data):
    records = discover(split_data)
    a, b = split_halves(records, seed=0)
    assert not _paths(a) & _paths(b)
    for cond in CONDITIONS:  # 7 per condition: 3 + 3, one left out
        assert sum(r.condition == cond for r in a) == 3
        assert sum(r.condition == cond for r in b) == 3
    a2, b2 = split_halves(list(reversed(records)), seed=0)  # listing order does not matter
    assert _paths(a2) == _paths(a) and _paths(b2) == _paths(b)
    a3, _ = split_halves(records, seed=1)
    assert _paths(a3) != _paths(a)


def test_paired_and_nearest_scores():
    rng = np.random.default_rng(0)
    train = [rng.normal(size=(2, 12, 12)).astype(np.float32) for _ in range(5)]
    gens = np.stack([train[3], dihedral(torch.from_numpy(train[1]), 5).numpy(), rng.normal(size=(2, 12, 12))])
    near = nearest_training(gens, train)
    # a generation that IS a training image (or one of its augmented views) scores 1
    np.testing.assert_allclose(near.cosine[:2], 1.0, atol=1e-9)
    assert near.index[:2].tolist() == [3, 1] and near.transform[0] == 0 and near.transform[1] == 5
    assert -1 <= near.cosine[2] < 0.9
    # a crop of a larger training image is found at its offset
    big = rng.normal(size=(2, 20, 20))
    near = nearest_training(big[None, :, 4:16, 6:18], train + [big])
    assert near.index[0] == 5 and near.offset[0].tolist() == [4, 6]
    np.testing.assert_allclose(near.cosine, 1.0, atol=1e-9)
    # the mean is subtracted: an offset or a positive rescaling changes nothing, a negation flips the sign
    x = rng.normal(size=(4, 2, 8, 8))
    np.testing.assert_allclose(paired_cosine(x, 3 * x + 5), 1.0, atol=1e-12)
    np.testing.assert_allclose(paired_cosine(x, -x), -1.0, atol=1e-12)


def _random_model(root: Path, data: Path, seed: int) -> Path:
    """A tiny random-weight PhenDiff model, saved like conftest's `tiny_model`."""
    from phenolens.data.io import read_image
    from phenolens.data.normalize import Normalizer
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.models.store import ModelInfo, save_model
    from phenolens.models.unet import build_unet

    torch.manual_seed(seed)
    unet = build_unet("tiny", channels=2, size=16, num_conditions=len(CONDITIONS))
    images = [read_image(p)[0] for p in sorted(data.glob("*/*.tif"))]
    info = ModelInfo(conditions=list(CONDITIONS), n_channels=2, image_size=16,
                     normalization=Normalizer.fit(images).to_dict())
    save_model(root, unet, make_scheduler(), info)
    return root


def test_cli_end_to_end_with_given_models(tmp_path, blob_data, tiny_model):
    other = _random_model(tmp_path / "other", blob_data, seed=1)
    out = tmp_path / "mem"
    code, stdout, stderr = run_cli("memorization", blob_data, out, "--model-a", tiny_model, "--model-b", other,
                                   "--n-per-condition", 2, "--sample-steps", 4)
    assert code == 0, stderr
    for name in ("half_a.csv", "half_b.csv", "memorization.csv", "memorization.json", "histograms.png", "pairs.png"):
        assert (out / name).is_file(), name
    assert not _paths(discover(out / "half_a.csv")) & _paths(discover(out / "half_b.csv"))
    rows = list(csv.DictReader((out / "memorization.csv").open()))
    assert len(rows) == 2 * len(CONDITIONS) * 2
    half = {"a": _paths(discover(out / "half_a.csv")), "b": _paths(discover(out / "half_b.csv"))}
    for r in rows:
        assert -1 <= float(r["generalization_cosine"]) <= 1 and -1 <= float(r["memorization_cosine"]) <= 1
        assert Path(r["nearest_training_image"]).resolve() in half[r["model"]]  # from its own half
    summary = json.loads((out / "memorization.json").read_text())
    assert summary["n_pairs"] == 6 and 0 <= summary["memorization"]["fraction_memorized"] <= 1
    assert "generalisation" in stdout


def test_model_against_itself_generalises_perfectly(tmp_path, blob_data, tiny_model):
    summary = memorization_check(blob_data, tmp_path / "self", model_a=tiny_model, model_b=tiny_model,
                                 n_per_condition=2, sample_steps=3, progress=False)
    rows = list(csv.DictReader((tmp_path / "self" / "memorization.csv").open()))
    np.testing.assert_allclose([float(r["generalization_cosine"]) for r in rows], 1.0, atol=1e-5)
    assert summary["generalization"]["min"] > 1 - 1e-5


def test_one_image_per_condition_is_an_error(tmp_path, tiny_model):
    data = write_blob_images(tmp_path / "one", per_condition=1, size=16)
    with pytest.raises(PhenolensError, match="at least 2 per condition"):
        split_halves(discover(data))
    code, _, stderr = run_cli("memorization", data, tmp_path / "out", "--model-a", tiny_model,
                              "--model-b", tiny_model)
    assert code == 2 and "at least 2 per condition" in stderr and "Traceback" not in stderr


def test_models_must_come_in_pairs(tmp_path, blob_data, tiny_model):
    code, _, stderr = run_cli("memorization", blob_data, tmp_path / "out", "--model-a", tiny_model)
    assert code == 2 and "--model-b" in stderr


def test_rerun_on_another_split_is_refused(tmp_path, blob_data):
    out = tmp_path / "out"
    (out / "model_a").mkdir(parents=True)  # as left by an earlier run with another --seed
    a, _ = split_halves(discover(blob_data), seed=1)
    from phenolens.run.memorization import write_manifest

    write_manifest(out / "half_a.csv", a)
    with pytest.raises(PhenolensError, match="another split"):
        memorization_check(blob_data, out, seed=0, steps=1, progress=False)


def test_no_augment_trains_both_models_without_flips_and_records_it(tmp_path, blob_data):
    summary = memorization_check(blob_data, tmp_path / "out", size=16, steps=2, batch_size=2, n_per_condition=1,
                                 sample_steps=2, augment=False, progress=False)
    assert summary["settings"]["augment"] is False
    assert [summary["per_model"][m]["augmented"] for m in "ab"] == [False, False]
    for m in "ab":
        info = json.loads((tmp_path / "out" / f"model_{m}" / "phenolens.json").read_text())
        assert info["training"]["config"]["augment"] is False
    # a rerun asking for augmentation does not silently reuse these models
    with pytest.raises(PhenolensError, match="augment False"):
        memorization_check(blob_data, tmp_path / "out", size=16, steps=2, batch_size=2, n_per_condition=1,
                           sample_steps=2, progress=False)


def test_models_trained_before_the_option_count_as_augmented(tmp_path, blob_data):
    """A model whose phenolens.json predates `augment` (always augmented) is reused only for augment=True."""
    from phenolens.run.memorization import MemorizationSettings, _train_or_reuse, write_manifest
    from phenolens.models.store import load_info, save_info

    manifest = tmp_path / "half_a.csv"
    write_manifest(manifest, split_halves(discover(blob_data))[0])
    model = _random_model(tmp_path / "model_a", blob_data, seed=0)
    info = load_info(model)
    settings = MemorizationSettings(size=16, steps=5)
    info.training = dict(data=str(manifest.resolve()), settings=dict(preset="tiny", size=16),
                         config=dict(steps=5, batch_size=settings.batch_size, lr=settings.lr, seed=0))
    save_info(model, info)
    assert _train_or_reuse(manifest, model, settings, progress=False) == "reused"
    settings.augment = False
    with pytest.raises(PhenolensError, match="augment True"):
        _train_or_reuse(manifest, model, settings, progress=False)
