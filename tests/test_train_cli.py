"""`phenolens train` end to end on tiny data: saved layout, metadata, config replay, multi-process."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import torch
from PIL import Image

from conftest import accelerate_launch, run_cli, write_blob_images

TRAIN = ["--steps", "3", "--size", "16", "--batch-size", "2", "--checkpoint-every", "2"]


def test_train_saves_a_diffusers_model_with_metadata(tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["DMSO", "low", "high"], per_condition=3)
    model = tmp_path / "model"
    code, _, err = run_cli("train", data, model, *TRAIN, "--conditions", "DMSO,low,high", "--channels", "1,0",
                           "--sample-every", "3")
    assert code == 0, err
    info = json.loads((model / "phenolens.json").read_text())
    assert info["conditions"] == ["DMSO", "low", "high"]
    assert info["channels"] == [1, 0] and info["n_channels"] == 2 and info["image_size"] == 16
    assert len(info["normalization"]["low"]) == 2
    assert "phenolens train" in info["training"]["command"] and info["version"]
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # the model is safetensors only (checkpoints hold optimiser state, loaded with weights_only=True)
    assert not [p for p in model.rglob("*") if p.suffix in (".bin", ".pt", ".pkl") and "checkpoints" not in p.parts]
    assert (model / "train_log.csv").read_text().count("\n") >= 2
    samples = np.asarray(Image.open(model / "samples" / "step-0000003.png"))
    assert samples.shape == (3 * 16, 4 * 16, 3)  # a row of 4 samples per condition

    from phenolens.methods.phendiff import PhenDiff

    loaded = PhenDiff.from_pretrained(model)
    assert loaded.conditions == ["DMSO", "low", "high"]
    # the channel order chosen at training is applied when reading files for translation
    out = tmp_path / "run"
    code, _, err = run_cli("translate", model, data / "DMSO", out, "--steps", "2", "--to", "high")
    assert code == 0, err


def test_saved_config_replays_the_same_command(tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["a", "b"], per_condition=2)
    cfg = tmp_path / "train.json"
    assert run_cli("train", data, tmp_path / "m1", *TRAIN, "--seed", "5", "--save-config", cfg)[0] == 0
    saved = json.loads(cfg.read_text())
    assert saved["seed"] == 5 and saved["steps"] == 3
    # replay into another model folder: same weights
    assert run_cli("train", "--config", cfg, data, tmp_path / "m2")[0] == 0
    from safetensors.torch import load_file

    w1 = load_file(tmp_path / "m1" / "unet" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(tmp_path / "m2" / "unet" / "diffusion_pytorch_model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_no_augment_is_recorded_and_replayed(tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["a", "b"], per_condition=2)
    cfg = tmp_path / "train.json"
    code, _, err = run_cli("train", data, tmp_path / "m1", *TRAIN, "--no-augment", "--save-config", cfg)
    assert code == 0, err
    assert json.loads(cfg.read_text())["no_augment"] is True
    info = json.loads((tmp_path / "m1" / "phenolens.json").read_text())
    assert info["training"]["config"]["augment"] is False
    assert run_cli("train", "--config", cfg, data, tmp_path / "m2")[0] == 0
    assert json.loads((tmp_path / "m2" / "phenolens.json").read_text())["training"]["config"]["augment"] is False
    # default: augmented, as before the option existed
    assert run_cli("train", data, tmp_path / "m3", *TRAIN)[0] == 0
    assert json.loads((tmp_path / "m3" / "phenolens.json").read_text())["training"]["config"]["augment"] is True


def test_accelerate_launch_two_processes_cpu(tmp_path):
    """Data-parallel training under `accelerate launch`; the model loads in a single process."""
    data = write_blob_images(tmp_path / "d", conditions=["a", "b"], per_condition=2)
    model = tmp_path / "model"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # accelerate 1.x starts ONE process for `--cpu --num_processes 2` (several CPU processes need an MPI
    # hostfile); `--multi_gpu` uses torchrun, and the trainer falls back to CPU (gloo) with no GPU.
    cmd = [*accelerate_launch(2), "-m", "phenolens", "train", str(data), str(model), *TRAIN]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from phenolens.methods.phendiff import PhenDiff

    loaded = PhenDiff.from_pretrained(model)
    assert loaded.info.training["config"]["batch_size"] == 2
    assert loaded.info.training["num_processes"] == 2
    assert all(torch.isfinite(p).all() for p in loaded.unet.parameters())


def test_cosine_schedule_decays_and_constant_does_not(tmp_path):
    import csv

    data = write_blob_images(tmp_path / "d", per_condition=2, size=16)
    lrs = {}
    for schedule in ("constant", "cosine"):
        code, _, err = run_cli("train", data, tmp_path / schedule, "--steps", "30", "--batch-size", "2",
                               "--warmup-steps", "1", "--lr", "0.001", "--lr-schedule", schedule,
                               "--checkpoint-every", "100")
        assert code == 0, err
        with open(tmp_path / schedule / "train_log.csv", newline="") as fh:
            lrs[schedule] = [float(r["lr"]) for r in csv.DictReader(fh)]
    assert lrs["constant"] == [0.001] * len(lrs["constant"])
    assert lrs["cosine"][0] > lrs["cosine"][-1] and lrs["cosine"][-1] < 0.0002


def test_defaults_are_the_measured_recipe(tmp_path):
    """Without options, `train` uses the recipe of README "Training recipe" (src/phenolens/train/recipe.py):
    ε-prediction, batch 32, cosine decay from 1e-3 on `tiny`; --zero-terminal-snr alone switches to v."""
    data = write_blob_images(tmp_path / "d", conditions=["a", "b"], per_condition=2, size=16)
    code, _, err = run_cli("train", data, tmp_path / "m", "--steps", "2", "--checkpoint-every", "100")
    assert code == 0, err
    info = json.loads((tmp_path / "m" / "phenolens.json").read_text())
    config = info["training"]["config"]
    assert (config["batch_size"], config["lr"], config["lr_schedule"]) == (32, 1e-3, "cosine")
    assert config["cond_dropout"] == 0.1 and config["augment"] is True and config["ema"] is True
    scheduler = json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon"
    # and `translate` guides its edits by default, as measured for this recipe (README "Edit strength")
    code, _, err = run_cli("translate", tmp_path / "m", data / "a", tmp_path / "run", "--steps", "2", "--to", "b")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["guidance_scale"] == 2.0
    code, _, err = run_cli("train", data, tmp_path / "z", "--steps", "1", "--batch-size", "2", "--zero-terminal-snr",
                           "--preset", "small", "--checkpoint-every", "100")
    assert code == 0, err
    scheduler = json.loads((tmp_path / "z" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    assert json.loads((tmp_path / "z" / "phenolens.json").read_text())["training"]["config"]["lr"] == 2e-4
    code, _, err = run_cli("train", data, tmp_path / "e", "--steps", "1", "--zero-terminal-snr",
                           "--prediction-type", "epsilon")
    assert code != 0 and "--zero-terminal-snr needs --prediction-type v_prediction" in err
