"""Every bad input of issue 2 gets one clear line naming the file or option, exit 2, no traceback."""

from __future__ import annotations


from conftest import fails_with, run_cli, write_blob_images

FAST = ["--steps", "2", "--inversion-iters", "1"]
TRAIN = ["--steps", "2", "--size", "16", "--batch-size", "2", "--checkpoint-every", "1"]


def test_missing_path(tiny_model, tmp_path):
    fails_with(run_cli("translate", tiny_model, tmp_path / "nope", tmp_path / "out"), "nope")
    fails_with(run_cli("train", tmp_path / "nope", tmp_path / "m", *TRAIN), "nope")


def test_empty_condition_folder(tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["a", "b"], per_condition=2)
    (data / "empty").mkdir()
    fails_with(run_cli("train", data, tmp_path / "m", *TRAIN), "empty")


def test_fewer_than_two_conditions_for_training(tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["only"], per_condition=2)
    fails_with(run_cli("train", data, tmp_path / "m", *TRAIN), "2 conditions")


def test_truncated_image(tiny_model, tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["ctrl"], per_condition=2)
    bad = data / "ctrl" / "img1.tif"
    bad.write_bytes(bad.read_bytes()[:200])
    fails_with(run_cli("translate", tiny_model, data / "ctrl", tmp_path / "out", *FAST), "img1.tif")


def test_non_image_file(tiny_model, tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["ctrl"], per_condition=1)
    (data / "ctrl" / "notes.tif").write_text("this is not an image")
    fails_with(run_cli("translate", tiny_model, data / "ctrl", tmp_path / "out", *FAST), "notes.tif")


def test_skip_bad_lists_unreadable_files_instead_of_stopping(tiny_model, tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["ctrl"], per_condition=2)
    (data / "ctrl" / "broken.tif").write_text("garbage")
    out = tmp_path / "out"
    code, _, err = run_cli("translate", tiny_model, data / "ctrl", out, "--skip-bad", *FAST)
    assert code == 0, err
    report = (out / "skipped.csv").read_text()
    assert "broken.tif" in report
    assert (out / "index.csv").read_text().count("\n") == 1 + 2 * 3


def test_channel_count_unlike_the_models(tiny_model, tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["ctrl"], per_condition=1, channels=3)
    fails_with(run_cli("translate", tiny_model, data / "ctrl", tmp_path / "out", *FAST), "img0.tif", "3 channels")


def test_channels_out_of_range(tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["a", "b"], per_condition=2, channels=2)
    fails_with(run_cli("train", data, tmp_path / "m", "--channels", "0,5", *TRAIN), "--channels")


def test_unknown_condition_in_to(tiny_model, blob_data, tmp_path):
    fails_with(run_cli("translate", tiny_model, blob_data / "ctrl", tmp_path / "o", "--to", "dose9", *FAST),
               "--to", "dose9")


def test_unknown_source_condition(tiny_model, blob_data, tmp_path):
    fails_with(run_cli("translate", tiny_model, blob_data / "ctrl", tmp_path / "o", "--from", "nothing", *FAST),
               "--from", "nothing")


def test_not_a_phenolens_model(blob_data, tmp_path):
    (tmp_path / "somedir").mkdir()
    fails_with(run_cli("translate", tmp_path / "somedir", blob_data / "ctrl", tmp_path / "o"), "not a phenolens model")


def test_resume_from_incompatible_checkpoint(tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["a", "b"], per_condition=2)
    model = tmp_path / "m"
    assert run_cli("train", data, model, *TRAIN)[0] == 0
    fails_with(run_cli("train", data, model, *TRAIN, "--preset", "small", "--resume"), "checkpoint")


def test_no_silent_overwrite(tiny_model, blob_data, tmp_path):
    data = write_blob_images(tmp_path / "d", conditions=["a", "b"], per_condition=2)
    model = tmp_path / "m"
    assert run_cli("train", data, model, *TRAIN)[0] == 0
    fails_with(run_cli("train", data, model, *TRAIN), "--overwrite")
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("my results")
    fails_with(run_cli("translate", tiny_model, blob_data / "ctrl", out, *FAST), "--overwrite")
    assert (out / "precious.txt").read_text() == "my results"


def test_bad_config_file(tmp_path, blob_data, tiny_model):
    cfg = tmp_path / "c.json"
    cfg.write_text("{not json")
    fails_with(run_cli("translate", tiny_model, blob_data / "ctrl", tmp_path / "o", "--config", cfg), "--config")
