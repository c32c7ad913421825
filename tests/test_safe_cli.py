"""Issue 9, the command line: --config replay, option checks, and one line instead of a traceback.

Most tests replace a command's function by a recorder (monkeypatching `phenolens.cli.cmd_*`), so
they check what the CLI hands to the command without running it: fast, and exact.
"""

from __future__ import annotations

import argparse
import errno
import json
from pathlib import Path

import pytest
import torch

import phenolens.cli as cli
from conftest import run_cli

FAST = ["--steps", "2", "--inversion-iters", "1"]
IGNORED = {"config", "save_config", "invocation", "func"}


def one_line_error(result, *needles: str) -> str:
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err, err
    line = err.strip()
    assert len(line.splitlines()) == 1, line
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture
def recorded(monkeypatch):
    """Replace every cmd_* by a recorder: returns the list of Namespaces the commands received."""
    calls: list[argparse.Namespace] = []
    for name in dir(cli):
        if name.startswith("cmd_"):
            monkeypatch.setattr(cli, name, lambda args: calls.append(args))
    return calls


def options(ns: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(ns).items() if k not in IGNORED}


def write_config(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values))
    return path


# ------------------------------------------------------------------ item 7: --config replay
def test_item7_flag_unlike_its_destination_wins_over_the_config(recorded, tmp_path):
    cfg = write_config(tmp_path / "c.json", {"source": "ctrl", "steps": 7})
    assert run_cli("translate", "m", "i", "o", "--from", "dose1", "--config", cfg)[0] == 0
    assert recorded[-1].source == "dose1"  # today the file's "ctrl" silently wins
    assert recorded[-1].steps == 7

    cfg = write_config(tmp_path / "m.json", {"judges": True, "judge_steps": 5})
    assert run_cli("measure", "run", "--no-judges", "--config", cfg)[0] == 0
    assert recorded[-1].judges is False
    assert recorded[-1].judge_steps == 5


def test_item7_abbreviated_option_wins_over_the_config(recorded, tmp_path):
    cfg = write_config(tmp_path / "c.json", {"steps": 50, "batch_size": 4})
    assert run_cli("translate", "m", "i", "o", "--ste", "3", "--config", cfg)[0] == 0
    assert recorded[-1].steps == 3
    assert recorded[-1].batch_size == 4


@pytest.mark.parametrize("key,value,needle", [
    ("steps", "three", "'steps'"),
    ("steps", 2.5, "'steps'"),
    ("steps", True, "'steps'"),
    ("inversion", "foo", "'inversion'"),
    ("to", "dose1", "'to'"),              # nargs="+": a list, as --save-config writes it
    ("overwrite", "yes", "'overwrite'"),  # a switch takes a JSON boolean
    ("guidance_scale", "strong", "'guidance_scale'"),
    ("batch_size", None, "'batch_size'"),  # null only where the option has no default
    ("input", 3, "'input'"),
])
def test_item7_bad_config_value_is_one_line_naming_file_and_key(recorded, tmp_path, key, value, needle):
    cfg = write_config(tmp_path / "bad.json", {key: value})
    one_line_error(run_cli("translate", "m", "i", "o", "--config", cfg), "--config", "bad.json", needle)
    assert recorded == []


def test_item7_config_values_are_converted_like_the_command_line(recorded, tmp_path):
    cfg = write_config(tmp_path / "c.json", {"reference": "ref", "channel_names": "DNA, actin", "judge_steps": "4"})
    assert run_cli("measure", "run", "--config", cfg)[0] == 0
    assert recorded[-1].reference == Path("ref")  # a Path, as from the command line
    assert recorded[-1].channel_names == ["DNA", "actin"]  # split like --channel-names 'DNA, actin'
    assert recorded[-1].judge_steps == 4


def test_item7_unknown_config_key_is_refused(tmp_path):
    cfg = write_config(tmp_path / "c.json", {"stepz": 3})
    one_line_error(run_cli("translate", "m", "i", "o", "--config", cfg), "stepz")


def test_item7_required_option_may_come_from_the_config(recorded, tmp_path):
    cfg = write_config(tmp_path / "c.json", {"base": "some/base"})
    assert run_cli("finetune", "data", "model", "--config", cfg)[0] == 0
    assert recorded[-1].base == "some/base"


ROUND_TRIP = {
    "simulate": ["out", "--conditions", "a,b,c", "--per-condition", "3", "--size", "40", "--seed", "2", "--overwrite",
                 "--puncta"],
    "crop": ["screen.csv", "out", "--pattern", "{well}_w{channel}.tif", "--channel-names", "1=DNA,2=Actin",
             "--condition-from", "Metadata_Well", "--platemap", "map.txt", "--nuclei-channel", "DNA", "--scene", "all", "--timepoint", "1",
             "--z", "max", "--size", "64", "--scale", "0.5", "--nucleus-diameter", "12", "--labels", "labs",
             "--border", "pad", "--max-overlap", "0.5", "--illumination", "--normalize", "plate", "--workers", "2",
             "--overwrite"],
    "train": ["data", "model", "--preset", "small", "--size", "32", "--channels", "0,2", "--conditions", "x,y",
              "--steps", "9", "--lr", "0.001", "--no-ema", "--cond-dropout", "0.1", "--resume", "--lr-schedule", "cosine",
              "--prediction-type", "epsilon", "--timestep-spacing", "trailing", "--skip-bad"],
    "finetune": ["data", "model", "--base", "b", "--mode", "svdiff", "--rank", "2", "--lora-alpha", "3",
                 "--prompt", "a=one", "--prompt", "b=two", "--size", "64", "--conditioning", "learned",
                 "--no-augment"],
    "translate": ["model", "input", "out", "--to", "b", "c", "--from", "a", "--steps", "3", "--inversion", "ddim",
                  "--inversion-iters", "0", "--guidance-scale", "2", "--batch-size", "3", "--device", "cpu",
                  "--skip-bad", "--overwrite", "--dry-run", "--render-precision", "bf16"],
    "measure": ["run", "--reference", "ref", "--channel-names", "a,b", "--nuclei-channel", "1",
                "--cell-channel", "0", "--nucleus-diameter", "9.5", "--masks", "masks", "--profile", "full",
                "--max-reference", "7", "--no-judges", "--judge-steps", "4", "--workers", "2"],
    "validate": ["model", "held", "out", "--source", "a", "--max-sources", "5", "--top", "4", "--steps", "3",
                 "--guidance-scale", "1.5", "--batch-size", "2", "--channel-names", "a,b", "--nuclei-channel", "1",
                 "--cell-channel", "0", "--nucleus-diameter", "9.5", "--profile", "full", "--no-judges",
                 "--workers", "2", "--device", "cpu", "--overwrite"],
    "report": ["run", "--out", "page.html", "--max-images", "3", "--top-features", "2", "--order", "a,b"],
    "memorization": ["data", "out", "--model-a", "ma", "--model-b", "mb", "--base", "b", "--mode", "full",
                     "--channels", "0,1", "--size", "40", "--threshold", "0.8", "--no-augment", "--device", "cpu"],
    "demo": ["there", "--train", "--model", "m", "--steps", "5", "--n-images", "2", "--overwrite"],
    "classifier train": ["data", "out", "--conditions", "x,y", "--channels", "0,2", "--shape", "mobilenet_v2",
                         "--steps", "9", "--batch-size", "4", "--lr", "0.01", "--heldout", "0.3", "--seed", "3",
                         "--device", "cpu", "--overwrite"],
    "classifier import": ["mine.pt", "out", "--size", "68", "--classes", "a,b", "--channels", "2,0", "--offset", "1,2",
                          "--scale", "300", "--overwrite"],
    "classifier evaluate": ["clf", "data", "--out", "p.csv"],
    "teach": ["run", "out", "--all", "--max-pairs", "3", "--frames", "4", "--quiz-data", "q", "--quiz-items", "5",
              "--seed", "2", "--overwrite"],
    "directions": ["model", "data", "out", "-k", "4", "--alpha", "2.5", "--tau", "0.3", "--lambda-reg", "0.5",
                   "--steps", "7", "--batch-size", "9", "--lr", "0.01", "--seed", "2", "--device", "cpu", "--overwrite"],
    "explain": ["model", "dirs", "data", "out", "--target", "b", "--alpha", "1.5", "--threshold", "0.2", "--n-samples", "5",
                "--max-directions", "2", "--steps", "9", "--batch-size", "3", "--strip-images", "2", "--strip-points", "3",
                "--device", "cpu", "--overwrite"],
}


def _commands(parser=None, prefix=()):
    """Every runnable command as (words, parser), nested ones (`classifier train`) included."""
    for action in (parser or cli.build_parser())._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = list(_commands(sub, (*prefix, name)))
                yield from inner or [((*prefix, name), sub)]


def test_item7_round_trip_covers_every_subcommand():
    assert {" ".join(words) for words, _ in _commands()} == set(ROUND_TRIP)


@pytest.mark.parametrize("command", sorted(ROUND_TRIP))
def test_item7_save_config_replays_to_the_same_options(recorded, tmp_path, command):
    argv = ROUND_TRIP[command]
    cfg = tmp_path / "saved.json"
    words = command.split()
    assert run_cli(*words, *argv, "--save-config", cfg)[0] == 0
    # positionals are always named on the command line (demo's OUT is optional: the file's value is used)
    n_positional = {"simulate": 1, "measure": 1, "report": 1, "translate": 3, "validate": 3, "directions": 3, "explain": 4,
                    "demo": 0}.get(command, 2)
    positionals = argv[:n_positional]
    assert run_cli(*words, *positionals, "--config", cfg)[0] == 0
    first, replay = recorded
    assert options(replay) == options(first)
    assert replay.func is first.func


# ------------------------------------------------------------------ item 10 (CLI part)
def test_item10_inversion_iters_zero_with_fixed_point_is_refused(tiny_model, blob_data, tmp_path):
    line = one_line_error(run_cli("translate", tiny_model, blob_data / "ctrl", tmp_path / "o", "--steps", "2",
                                  "--inversion-iters", "0"), "--inversion-iters")
    assert "fixed-point" in line
    assert not (tmp_path / "o").exists()


def test_item10_inversion_iters_zero_is_fine_with_ddim(recorded):
    assert run_cli("translate", "m", "i", "o", "--inversion", "ddim", "--inversion-iters", "0")[0] == 0


# ------------------------------------------------------------------ item 11 (CLI part)
def test_item11_save_config_creates_a_missing_parent_folder(recorded, tmp_path):
    target = tmp_path / "new" / "deeper" / "run.json"
    assert run_cli("translate", "m", "i", "o", "--steps", "3", "--save-config", target)[0] == 0
    assert json.loads(target.read_text())["steps"] == 3


def test_item11_save_config_where_nothing_can_be_written_is_one_line(recorded, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    one_line_error(run_cli("translate", "m", "i", "o", "--save-config", blocker / "run.json"), "--save-config")
    one_line_error(run_cli("translate", "m", "i", "o", "--save-config", tmp_path), "--save-config", "folder")
    assert blocker.read_text() == "mine"
    assert recorded == []


def _device_commands() -> list[str]:
    return sorted(" ".join(words) for words, sub in _commands()
                  if any("--device" in a.option_strings for a in sub._actions))


DEVICE_ARGS = {"translate": ["m", "i", "o"], "memorization": ["data", "out"], "validate": ["m", "h", "o"],
               "classifier train": ["data", "out"], "directions": ["m", "d", "o"],
               "explain": ["m", "d", "i", "o"]}


def test_item11_device_options_are_all_checked():
    assert set(_device_commands()) == set(DEVICE_ARGS)


@pytest.mark.parametrize("command", sorted(DEVICE_ARGS))
def test_item11_unknown_device_is_one_line_naming_device(recorded, command):
    one_line_error(run_cli(*command.split(), *DEVICE_ARGS[command], "--device", "banana"), "--device", "banana")
    assert recorded == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", sorted(DEVICE_ARGS))
def test_item11_cuda_without_cuda_is_one_line(recorded, command):
    one_line_error(run_cli(*command.split(), *DEVICE_ARGS[command], "--device", "cuda"), "--device", "CUDA")
    one_line_error(run_cli(*command.split(), *DEVICE_ARGS[command], "--device", "cuda:3"), "--device")
    assert recorded == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_item11_cuda_index_beyond_the_devices_is_one_line(recorded):
    one_line_error(run_cli("translate", "m", "i", "o", "--device", f"cuda:{torch.cuda.device_count()}"), "--device")


def test_item11_cpu_device_is_accepted(recorded):
    assert run_cli("translate", "m", "i", "o", "--device", "cpu")[0] == 0


@pytest.mark.parametrize("err,needles", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/a.tif"),
     ["cannot write /data/run/a.tif", "No space left on device"]),
    (PermissionError(errno.EACCES, "Permission denied", "/data/run"), ["/data/run", "Permission denied"]),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/index.csv"),
     ["cannot write /mnt/ro/index.csv", "Read-only file system"]),
    (OSError(errno.ENOSPC, "No space left on device"), ["cannot write", "No space left on device"]),
])
def test_item11_os_error_escaping_a_command_is_one_line(monkeypatch, err, needles):
    def boom(args):
        raise err

    monkeypatch.setattr(cli, "cmd_translate", boom)
    line = one_line_error(run_cli("translate", "m", "i", "o"), *needles)
    assert line.startswith("phenolens translate: error: ")


def test_item11_memory_error_is_one_line_naming_memory(monkeypatch):
    def boom(args):
        raise MemoryError("Unable to allocate 838. GiB for an array with shape (30000, 30000)")

    monkeypatch.setattr(cli, "cmd_translate", boom)
    one_line_error(run_cli("translate", "m", "i", "o"), "out of memory", "838", "--batch-size")


def test_item11_a_bug_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "cmd_translate", bug)
    with pytest.raises(ValueError, match="a bug"):
        run_cli("translate", "m", "i", "o")


# ------------------------------------------------------------------ Also: --help tells the truth
def _all_actions():
    for words, sub in _commands():
        for a in sub._actions:
            yield " ".join(words), a


def test_also_every_overwrite_help_says_only_what_phenolens_wrote_is_removed():
    helps = {name: a.help for name, a in _all_actions() if "--overwrite" in a.option_strings}
    assert helps, "no --overwrite option found"
    for name, text in helps.items():
        assert "phenolens wrote" in text and "never touched" in text, f"{name} --overwrite: {text}"


def test_also_help_of_checked_options_states_their_range():
    helps = {(name, a.option_strings[0]): a.help for name, a in _all_actions() if a.option_strings}
    assert "at least 1" in helps[("translate", "--inversion-iters")]
    assert "[0, 1)" in helps[("train", "--ema-decay")]
    assert "refused" in helps[("translate", "--device")]
    assert "missing parent folder is created" in helps[("translate", "--save-config")]
