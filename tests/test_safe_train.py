"""`train` / `finetune` never lose a user's files, refuse what they cannot train right, and say why
(issue 9: items 1, 3, 4, 8, 10, 11 and the "Also" lines on file modes, phenolens.json and condition order).

Every run is tiny (16 px crops, 2 steps) so the whole file takes well under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import fails_with, run_cli, write_blob_images
from conftest import snapshot as _snapshot

# a constant schedule: these runs are extended by resuming with more --steps (a cosine one is refused)
FAST = ["--steps", "2", "--size", "16", "--batch-size", "2", "--checkpoint-every", "1", "--warmup-steps", "1",
        "--lr-schedule", "constant"]


def snapshot(root: Path) -> dict[str, str]:
    return _snapshot(root, folders=True)  # a stray empty folder (checkpoints/) counts too


@pytest.fixture
def data(tmp_path) -> Path:
    return write_blob_images(tmp_path / "proj" / "data", conditions=["ctrl", "treated"], per_condition=2, size=16)


# ------------------------------------------------------------------------------------ item 1
def test_item1_train_into_the_parent_of_the_data_is_refused_and_nothing_changes(data):
    project = data.parent
    (project / "notes.txt").write_text("the user's")
    before = snapshot(project)
    for extra in ([], ["--overwrite"]):
        fails_with(run_cli("train", data, data / "..", *FAST, *extra), "contains")
    assert snapshot(project) == before


def test_item1_overwrite_never_touches_a_folder_of_user_files(data, tmp_path):
    user = tmp_path / "results"
    (user / "sub").mkdir(parents=True)
    (user / "figure.png").write_bytes(b"\x89PNG irreplaceable")
    (user / "sub" / "table.csv").write_text("a,b\n1,2\n")
    before = snapshot(user)
    fails_with(run_cli("train", data, user, *FAST, "--overwrite"), str(user), "not empty")
    assert snapshot(user) == before


def test_item1_overwrite_removes_only_what_training_wrote(data, tmp_path):
    model = tmp_path / "model"
    code, _, err = run_cli("train", data, model, *FAST, "--sample-every", "2")
    assert code == 0, err
    inventory = json.loads((model / ".phenolens.json").read_text())
    assert inventory["kind"] == "model"
    for written in ("checkpoints", "train_log.csv", "unet", "scheduler", "phenolens.json",
                    "samples/step-0000002.png"):
        assert written in inventory["files"], (written, inventory)
    # the user keeps notes beside the model, and even inside one of its folders
    (model / "notes.txt").write_text("lab book")
    (model / "figures").mkdir()
    (model / "figures" / "loss.png").write_bytes(b"mine")
    (model / "samples" / "picked.png").write_bytes(b"mine too")
    old_ckpt = model / "checkpoints" / "step-0000002"
    assert old_ckpt.is_dir()

    code, _, err = run_cli("train", data, model, *FAST[:1], "1", *FAST[2:], "--overwrite")
    assert code == 0, err
    assert (model / "notes.txt").read_text() == "lab book"
    assert (model / "figures" / "loss.png").read_bytes() == b"mine"
    assert not old_ckpt.exists() and (model / "checkpoints" / "step-0000001").is_dir()
    # in samples/ only phenolens's own pictures went (this run sampled none)
    assert (model / "samples" / "picked.png").read_bytes() == b"mine too"
    assert not (model / "samples" / "step-0000002.png").exists()


def test_item1_a_model_folder_from_an_older_phenolens_is_adopted_keeping_user_files(data, tmp_path):
    model = tmp_path / "model"
    assert run_cli("train", data, model, *FAST)[0] == 0
    (model / ".phenolens.json").unlink()  # written before output folders had a marker
    (model / "notes.txt").write_text("lab book")
    code, _, err = run_cli("train", data, model, *FAST, "--overwrite")
    assert code == 0, err
    assert (model / "notes.txt").read_text() == "lab book"
    assert "notes.txt" not in json.loads((model / ".phenolens.json").read_text())["files"]
    assert (model / "unet").is_dir() and (model / "phenolens.json").is_file()


def test_item1_a_finished_model_is_not_replaced_without_overwrite(data, tmp_path):
    model = tmp_path / "model"
    assert run_cli("train", data, model, *FAST)[0] == 0
    shutil.rmtree(model / "checkpoints")  # a model handed over without its checkpoints
    before = snapshot(model)
    fails_with(run_cli("train", data, model, *FAST), "already holds a trained model", "--overwrite")
    assert snapshot(model) == before


# ------------------------------------------------------------------------------------ item 3
@pytest.mark.parametrize("where", ["data/model", "data/ctrl", "data", "data/ctrl/model"])
def test_item3_model_folder_in_the_training_data_is_refused(data, where):
    target = data.parent / where
    before = snapshot(data)
    line = fails_with(run_cli("train", data, target, *FAST))
    assert "inside" in line or "is the input" in line, line
    assert snapshot(data) == before  # no checkpoints/ folder for the next `train` to take for a condition


def test_item3_manifest_data_keeps_models_out_of_the_image_folders(data, tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,condition\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(data.rglob("*.tif"))))
    fails_with(run_cli("train", manifest, data / "treated" / "model", *FAST), "inside")
    assert not (data / "treated" / "model").exists()
    code, _, err = run_cli("train", manifest, tmp_path / "model", *FAST)  # beside the manifest: fine
    assert code == 0, err


# ------------------------------------------------------------------------------------ item 4
def test_item4_mixed_8_and_16_bit_training_images_are_refused(data, tmp_path):
    eight = data / "treated" / "img8.tif"
    tifffile.imwrite(eight, np.full((2, 16, 16), 100, np.uint8), photometric="minisblack")
    line = fails_with(run_cli("train", data, tmp_path / "model", *FAST), "uint8", "uint16", "img8.tif")
    assert str(data / "ctrl") in line  # one file of each kind is named
    assert not (tmp_path / "model" / "phenolens.json").exists()


def test_item4_integer_and_float_training_images_are_refused(data, tmp_path):
    tifffile.imwrite(data / "ctrl" / "scaled.tif", np.full((2, 16, 16), 0.5, np.float32), photometric="minisblack")
    fails_with(run_cli("train", data, tmp_path / "model", *FAST), "float", "uint16", "scaled.tif")


def test_item4_train_records_input_stats_after_channels_and_cond_dropout(data, tmp_path):
    model = tmp_path / "model"
    code, _, err = run_cli("train", data, model, *FAST, "--channels", "1,0", "--cond-dropout", "0.25")
    assert code == 0, err
    info = json.loads((model / "phenolens.json").read_text())
    raws = [tifffile.imread(p)[[1, 0]] for p in sorted(data.rglob("*.tif"))]
    assert info["input_stats"]["dtype"] == "uint16"
    assert info["input_stats"]["min"] == [float(min(r[c].min() for r in raws)) for c in range(2)]
    assert info["input_stats"]["max"] == [float(max(r[c].max() for r in raws)) for c in range(2)]
    assert info["cond_dropout"] == 0.25


# ------------------------------------------------------------------------------------ item 8
@pytest.fixture
def checkpointed(data, tmp_path) -> Path:
    model = tmp_path / "model"
    code, _, err = run_cli("train", data, model, *FAST)
    assert code == 0, err
    return model


@pytest.mark.parametrize("change, needle", [
    (["--lr", "5e-4"], "--lr"),
    (["--warmup-steps", "2"], "--warmup-steps"),
    (["--cond-dropout", "0.2"], "--cond-dropout"),
    (["--size", "8"], "--size"),
])
def test_item8_resume_refuses_changed_settings(data, checkpointed, change, needle):
    before = snapshot(checkpointed)
    args = _replace(FAST, ["--steps", "4", *change])
    line = fails_with(run_cli("train", data, checkpointed, *args, "--resume"), needle, "step-0000002")
    assert snapshot(checkpointed) == before, line


def test_item8_resume_refuses_changed_training_images(data, checkpointed):
    # the same settings and images still resume
    code, _, err = run_cli("train", data, checkpointed, *_replace(FAST, ["--steps", "3"]), "--resume")
    assert code == 0, err
    assert (checkpointed / "checkpoints" / "step-0000003").is_dir()
    path = sorted((data / "ctrl").glob("*.tif"))[0]
    img = tifffile.imread(path)
    img[0, 0, 0] += 1  # one pixel: same files, other content
    tifffile.imwrite(path, img, photometric="minisblack")
    fails_with(run_cli("train", data, checkpointed, *_replace(FAST, ["--steps", "4"]), "--resume"),
               "training images differ", "content")
    shutil.copy(path, data / "treated" / "extra.tif")  # and one more file
    fails_with(run_cli("train", data, checkpointed, *_replace(FAST, ["--steps", "4"]), "--resume"),
               "training images differ", "4 at the checkpoint, 5 now")


def test_item8_resume_refuses_other_normalisation_and_cosine_length(tmp_path):
    """At the trainer: normalisation (fitted on the data) and, for a cosine schedule, the step count."""
    import torch

    from phenolens.data.normalize import Normalizer
    from phenolens.errors import PhenolensError
    from phenolens.models.unet import build_unet
    from phenolens.train.trainer import TrainConfig, train
    from diffusers import DDPMScheduler

    class Fake:
        n_channels, size, augment = 1, 16, True

        def __init__(self, high: float) -> None:
            self.normalizer = Normalizer(low=[0.0], high=[high])

        def __len__(self) -> int:
            return 2

        def batch(self, indices, generator):
            return torch.zeros(len(indices), 1, 16, 16), torch.zeros(len(indices), dtype=torch.long)

    def run(high: float, **kw):
        torch.manual_seed(0)
        unet = build_unet("tiny", channels=1, size=16, num_conditions=1)
        cfg = TrainConfig(**{**dict(steps=2, batch_size=2, checkpoint_every=1, warmup_steps=0, lr_schedule="cosine"), **kw})
        train(unet, DDPMScheduler(), Fake(high), tmp_path / "m", cfg, null_label=1, progress=False,
              resume=(tmp_path / "m" / "checkpoints").is_dir())

    run(100.0)
    with pytest.raises(PhenolensError, match=r"normalization\.high \[100\.0\] -> \[200\.0\]"):
        run(200.0, steps=2)
    with pytest.raises(PhenolensError, match=r"--steps \(the length of the cosine schedule\) 2 -> 4"):
        run(100.0, steps=4)


def _replace(args: list[str], change: list[str]) -> list[str]:
    """ARGS with each `--opt value` of CHANGE replaced (or added)."""
    args = list(args)
    for opt, value in zip(change[::2], change[1::2]):
        if opt in args:
            args[args.index(opt) + 1] = value
        else:
            args += [opt, value]
    return args


# ------------------------------------------------------------------------------- items 10, 11
@pytest.mark.parametrize("value", ["1", "1.5", "-0.1"])
def test_item10_ema_decay_outside_0_1_is_refused(data, tmp_path, value):
    fails_with(run_cli("train", data, tmp_path / "model", *FAST, "--ema-decay", value), "--ema-decay")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_item11_lr_not_positive_is_refused(data, tmp_path, value):
    fails_with(run_cli("train", data, tmp_path / "model", *FAST, "--lr", value), "--lr")
    assert not (tmp_path / "model").exists()


def test_item11_unwritable_model_folder_is_one_line_naming_it(data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    fails_with(run_cli("train", data, blocker / "model", *FAST), str(blocker / "model"), "cannot write")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            fails_with(run_cli("train", data, locked / "model", *FAST), str(locked / "model"))
        finally:
            locked.chmod(0o700)


# ---------------------------------------------------------------------------------- Also: modes
def test_also_saved_model_files_follow_the_umask(data, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, err = run_cli("train", data, tmp_path / "model", *FAST, "--sample-every", "2")
    finally:
        os.umask(old)
    assert code == 0, err
    files = [p for p in (tmp_path / "model").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any("checkpoints" in p.parts for p in files)
    wrong = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o644}
    assert not wrong, wrong


# -------------------------------------------------------------------- Also: misleading messages
def test_also_phenolens_json_unlike_its_network_is_blamed_not_the_image(tiny_model, blob_data, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    info = json.loads((model / "phenolens.json").read_text())
    info["n_channels"] = 3  # the network takes 2
    info["normalization"]["low"].append(0.0)
    info["normalization"]["high"].append(1.0)
    (model / "phenolens.json").write_text(json.dumps(info))
    line = fails_with(run_cli("translate", model, blob_data / "ctrl", tmp_path / "out", "--steps", "2",
                              "--inversion-iters", "1"), str(model / "phenolens.json"), "3", "2")
    assert "image" not in line.split(";")[0].replace(str(model), ""), line


# ------------------------------------------------------------------------ Also: condition order
def test_also_train_prints_the_condition_order_it_stores(tmp_path):
    data = write_blob_images(tmp_path / "doses", conditions=["control", "low", "mid", "high"], per_condition=1,
                             size=16)
    code, out, err = run_cli("train", data, tmp_path / "model", *FAST)
    assert code == 0, err
    stored = json.loads((tmp_path / "model" / "phenolens.json").read_text())["conditions"]
    lines = [ln for ln in out.splitlines() if ln.startswith("conditions, in this order: ")]
    assert len(lines) == 1, out
    assert lines[0].startswith(f"conditions, in this order: {', '.join(stored)} (")
    assert "--conditions" in lines[0]
    code, out, _ = run_cli("train", data, tmp_path / "m2", *FAST, "--conditions", "high,mid,low,control")
    assert code == 0 and "conditions, in this order: high, mid, low, control (from --conditions)" in out


# ----------------------------------------------------------------------------- finetune (latent)
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from phenolens.models.latent import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny-sd2")


def test_item4_finetune_records_input_stats_and_the_loader_blames_its_json(tmp_path, tiny_base):
    from phenolens.errors import PhenolensError
    from phenolens.methods.phenldiff import PhenLDiff

    data = write_blob_images(tmp_path / "rgb", conditions=["a", "b"], per_condition=2, size=32, channels=3)
    model = tmp_path / "ft"
    old = os.umask(0o022)
    try:
        code, out, err = run_cli("finetune", data, model, "--base", tiny_base, "--steps", "1", "--batch-size", "2",
                                 "--size", "32", "--warmup-steps", "0", "--cond-dropout", "0.1")
    finally:
        os.umask(old)
    assert code == 0, err
    assert "conditions, in this order: a, b" in out
    info = json.loads((model / "phenolens.json").read_text())
    raws = [tifffile.imread(p) for p in sorted(data.rglob("*.tif"))]
    assert info["input_stats"]["dtype"] == "uint16" and info["cond_dropout"] == 0.1
    assert info["input_stats"]["max"] == [float(max(r[c].max() for r in raws)) for c in range(3)]
    assert {"adapter", "condition_embeddings.safetensors", "phenolens.json", "checkpoints"} <= \
        set(json.loads((model / ".phenolens.json").read_text())["files"])
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in model.rglob("*.safetensors"))

    info["n_channels"] = 5
    (model / "phenolens.json").write_text(json.dumps(info))
    with pytest.raises(PhenolensError, match=r"phenolens\.json: .*n_channels.*5"):
        PhenLDiff.from_pretrained(model)
