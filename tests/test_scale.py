"""The scale cells are learnt and translated at (issue 11): training defaults to the data's own size and
never resizes unasked; translation processes images at the scale the model learnt and says so."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import torch

from conftest import CONDITIONS, run_cli, write_blob_images

TRAIN = ("--steps", "1", "--batch-size", "2", "--warmup-steps", "1", "--checkpoint-every", "10")


def test_own_size_is_the_smallest_short_side_rounded_down_to_the_network_multiple():
    from phenolens.data.dataset import own_size, upscaled_shape
    from phenolens.errors import PhenolensError

    raws = [np.zeros((2, 30, 41)), np.zeros((2, 35, 33))]
    assert own_size(raws, 4) == 28 and own_size(raws, 1) == 30
    with pytest.raises(PhenolensError, match="smaller than the network's downsampling"):
        own_size([np.zeros((1, 3, 3))], 4)
    assert upscaled_shape(24, 36, 32) == (32, 48)  # short side reaches 32, aspect kept
    assert upscaled_shape(40, 50, 32) == (40, 50)  # already large enough: untouched


def test_train_defaults_to_the_data_size_and_resizes_nothing(tmp_path):
    data = write_blob_images(tmp_path / "d", per_condition=2, size=24)
    code, out, err = run_cli("train", data, tmp_path / "m", *TRAIN)
    assert code == 0, err
    info = json.loads((tmp_path / "m" / "phenolens.json").read_text())
    assert info["image_size"] == 24 and info["size_rule"] == "own"
    assert info["input_stats"]["short_side"] == [24, 24]
    assert "the data's own size" in out and "resized" not in err


def test_asking_for_a_larger_size_warns_and_translate_resizes_the_same_way(tmp_path):
    data = write_blob_images(tmp_path / "d", per_condition=2, size=16)
    code, out, err = run_cli("train", data, tmp_path / "m", "--size", "24", *TRAIN)
    assert code == 0, err
    assert "resized up" in err and "--size 24" in err
    info = json.loads((tmp_path / "m" / "phenolens.json").read_text())
    assert info["image_size"] == 24 and info["size_rule"] == "resize-up"

    from phenolens.methods.phendiff import PhenDiff

    model = PhenDiff.from_pretrained(tmp_path / "m")
    assert model.model_scale(16, 20) == (24, 30)
    x, frame = model.to_model_space([np.full((2, 16, 20), 500, np.uint16)])
    assert x.shape[-2:] == (24, 32) and frame.resized  # resized up to 24x30, then padded to a multiple of 4

    code, out, err = run_cli("translate", tmp_path / "m", data / CONDITIONS[0], tmp_path / "run",
                             "--to", CONDITIONS[1], "--steps", "2")
    assert code == 0, err
    assert "resized up to 24x24 px" in err and "back to 16x16 px" in err
    with open(tmp_path / "run" / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:  # every output has its source's own size
        assert tifffile.imread(tmp_path / "run" / r["output_path"]).shape == (2, 16, 16)


def test_a_model_at_its_own_scale_translates_larger_and_smaller_images_unresized(tmp_path, tiny_model):
    from phenolens.methods.phendiff import PhenDiff

    model = PhenDiff.from_pretrained(tiny_model)
    model.info.size_rule = "own"
    for hw in ((12, 12), (40, 28)):
        x, frame = model.to_model_space([np.full((2, *hw), 500, np.uint16)])
        assert not frame.resized and x.shape[-2:] == hw
        back = model.crop_back(x, frame)
        assert torch.equal(back, model.normalized([np.full((2, *hw), 500, np.uint16)]))


def test_an_older_model_trained_on_larger_crops_earns_a_warning(tmp_path, tiny_model):
    small = write_blob_images(tmp_path / "small", per_condition=1, size=12)
    info = json.loads((tiny_model / "phenolens.json").read_text())
    assert info.get("size_rule") is None and info["image_size"] == 16  # the fixture writes no rule, like old models
    code, out, err = run_cli("translate", tiny_model, small / CONDITIONS[0], tmp_path / "run",
                             "--to", CONDITIONS[1], "--steps", "2")
    assert code == 0, err
    assert "smaller than the 16 px crops" in err and "retrain" in err
