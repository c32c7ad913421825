"""The shared training loop: exact resume after SIGKILL, data parallel, errors, learning, v-prediction.

Models are tiny random-weight UNets (16x16, one channel) and the dataset is a fake with the
`ImageSet` interface, so the tests check the machinery, not image quality. Subprocesses re-import this
module and call `_script_main`, so the script and the in-process runs share one definition.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest
import torch

from conftest import accelerate_launch
from phenolens.errors import PhenolensError

TESTS = Path(__file__).resolve().parent
SIZE = 16


class FakeSet:
    """`ImageSet`-like: random images (or one fixed image per class); flips drawn from the generator.

    When `record` is set, each process appends the indices it was asked for (to check data parallel).
    """

    n_channels = 1

    def __init__(self, n: int = 8, fixed_per_class: bool = False, record: Path | None = None) -> None:
        g = torch.Generator().manual_seed(123)
        self.labels = torch.arange(n) % 2
        if fixed_per_class:
            protos = torch.rand(2, 1, SIZE, SIZE, generator=g) * 2 - 1
            self.x = protos[self.labels]
        else:
            self.x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1
        self.fixed = fixed_per_class
        self.record = record

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.record is not None:
            with open(self.record.with_name(f"{self.record.name}-{os.environ.get('RANK', '0')}.txt"), "a") as f:
                f.write(" ".join(map(str, indices)) + "\n")
        x = self.x[list(indices)]
        flip = torch.rand(len(indices), generator=generator) < 0.5
        if not self.fixed:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.clone(), self.labels[list(indices)].clone()


def _unet():
    from phenolens.models.unet import build_unet

    torch.manual_seed(0)
    return build_unet("tiny", channels=1, size=SIZE, num_conditions=2)


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def _config(**kw):
    from phenolens.train.trainer import TrainConfig

    base = dict(steps=30, batch_size=2, lr=1e-3, warmup_steps=3, checkpoint_every=10, log_every=1,
                cond_dropout=0.2, ema_decay=0.9, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def _run(out: Path, steps: int, *, resume: bool = False, overwrite: bool = False, result: Path | None = None,
         model_dir: Path | None = None, record: Path | None = None, **kw):
    """Train and optionally dump raw + EMA final weights to `result` (safetensors)."""
    from safetensors.torch import save_file

    from phenolens.train.trainer import train

    ema_state: dict[str, torch.Tensor] = {}

    def on_save(model, step: int) -> None:
        ema_state.update({f"ema.{k}": v.detach().clone() for k, v in model.state_dict().items()})
        if model_dir is not None:
            model.save_pretrained(model_dir)

    trained = train(_unet(), _scheduler(), FakeSet(record=record), out, _config(steps=steps, **kw), null_label=2,
                    resume=resume, overwrite=overwrite, on_save=on_save, progress=False)
    if result is not None and ema_state:
        raw = {f"raw.{k}": v.detach().clone().contiguous() for k, v in trained.state_dict().items()}
        save_file({**raw, **{k: v.contiguous() for k, v in ema_state.items()}}, str(result))
    return trained


def _script_main(argv: list[str]) -> None:
    """Entry point for subprocesses: OUT STEPS RESUME(0/1) RESULT|- MODEL_DIR|- RECORD|-"""
    torch.set_num_threads(1)
    out, steps, resume, result, model_dir, record = argv
    opt = lambda s: None if s == "-" else Path(s)  # noqa: E731
    _run(Path(out), int(steps), resume=resume == "1", result=opt(result), model_dir=opt(model_dir),
         record=opt(record), checkpoint_every=5)


def _write_script(tmp_path: Path) -> Path:
    script = tmp_path / "run_train.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport test_trainer\n"
                      "test_trainer._script_main(sys.argv[1:])\n")
    return script


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def _log(out: Path) -> list[tuple[int, float]]:
    with (out / "train_log.csv").open(newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine two spinning threads make a step ~50x slower,
    and the subprocesses use one thread too, so in-process and subprocess runs do the same arithmetic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------- tests
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    from phenolens.train.trainer import list_checkpoints

    steps = 20
    script = _write_script(tmp_path)
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), str(steps), "0", "-", "-", "-"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoints" / "step-0000005").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = list_checkpoints(killed)
    assert done and done[-1][0] < steps, "the run finished before it was killed"

    # resume in this process (one thread, like the subprocess) and run the same length uninterrupted
    _run(killed, steps, resume=True, result=tmp_path / "resumed.safetensors", checkpoint_every=5)
    _run(ref, steps, result=tmp_path / "ref.safetensors", checkpoint_every=5)

    a, b = load_file(str(tmp_path / "resumed.safetensors")), load_file(str(tmp_path / "ref.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # the log continues without duplicated steps and replays the same losses
    log_a, log_b = _log(killed), _log(ref)
    assert [s for s, _ in log_a] == list(range(1, steps + 1)) == [s for s, _ in log_b]
    assert all(abs(x - y) <= 1e-4 * max(1.0, abs(y)) for (_, x), (_, y) in zip(log_a, log_b))
    # newest `keep_checkpoints` kept, final one included; no temporary folder left
    assert [s for s, _ in list_checkpoints(ref)] == [15, 20]
    assert not list((killed / "checkpoints").glob(".tmp-*"))


def test_accelerate_launch_two_cpu_processes(tmp_path):
    from diffusers import UNet2DModel

    from phenolens.train.trainer import _generator

    script = _write_script(tmp_path)
    out, model_dir, record = tmp_path / "out", tmp_path / "model", tmp_path / "idx"
    # `--cpu --num_processes 2` starts a single process without MPI; torchrun (--multi_gpu) starts two and
    # the trainer switches accelerate to multi-CPU (gloo) because this machine has no accelerator
    cmd = [*accelerate_launch(2), str(script), str(out), "3", "0", "-", str(model_dir), str(record)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    model = UNet2DModel.from_pretrained(model_dir)
    assert model.config.num_class_embeds == 3
    y = model(torch.zeros(1, 1, SIZE, SIZE), torch.tensor([5]), class_labels=torch.tensor([1])).sample
    assert y.shape == (1, 1, SIZE, SIZE)

    state = json.loads((out / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert state["fingerprint"]["num_processes"] == 2
    # each process took its own half of the same global draw of batch_size indices
    rows = [(tmp_path / f"idx-{r}.txt").read_text().split("\n")[0].split() for r in (0, 1)]
    full = torch.randint(len(FakeSet()), (2,), generator=_generator(7, 0, "idx", 0)).tolist()
    assert [int(v) for v in rows[0] + rows[1]] == full
    assert [s for s, _ in _log(out)] == [1, 2, 3]


def test_errors_on_resume_and_existing_checkpoints(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PhenolensError, match="nothing to resume"):
        _run(out, 2, resume=True, checkpoint_every=1)
    _run(out, 2, checkpoint_every=1)
    with pytest.raises(PhenolensError, match="--resume.*--overwrite"):
        _run(out, 4, checkpoint_every=1)
    with pytest.raises(PhenolensError, match=r"step-0000002.*batch_size 2 -> 4"):
        _run(out, 4, resume=True, checkpoint_every=1, batch_size=4)
    with pytest.raises(PhenolensError, match=r"step-0000002.*seed"):
        _run(out, 4, resume=True, checkpoint_every=1, seed=1)
    # an interrupted save (temporary folder, no state.json) is never taken for a checkpoint
    junk = out / "checkpoints" / ".tmp-step-0000003"
    junk.mkdir()
    _run(out, 3, resume=True, checkpoint_every=1)
    assert not junk.exists()
    assert [s for s, _ in _log(out)] == [1, 2, 3]
    _run(out, 1, overwrite=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    assert [s for s, _ in _log(out)] == [1]


def test_private_config_keys_never_decide_a_resume(tmp_path):
    """diffusers' `_use_default_values` is listed in a hash-seed order; a DiffEx model nests two such
    configs, so a resume in a new process was refused (found resuming a DiffEx run, issue 12)."""
    from types import SimpleNamespace

    from phenolens.train.trainer import _model_config, list_checkpoints

    def nested(order):
        return SimpleNamespace(config={"unet": {"_use_default_values": order, "width": 32},
                                       "encoder": {"_class_name": "E", "code_dim": 64}, "_top": 1})

    assert _model_config(nested(["a", "b"])) == _model_config(nested(["b", "a"])) == {
        "unet": {"width": 32}, "encoder": {"code_dim": 64}}
    # a checkpoint written with private keys in its fingerprint still resumes
    out = tmp_path / "out"
    _run(out, 2, checkpoint_every=1)
    _, folder = list_checkpoints(out)[-1]
    state = json.loads((folder / "state.json").read_text())
    state["fingerprint"]["model"]["_use_default_values"] = ["z", "y"]
    (folder / "state.json").write_text(json.dumps(state))
    _run(out, 3, resume=True, checkpoint_every=1)
    assert [s for s, _ in _log(out)] == [1, 2, 3]


def test_augment_option_round_trips_and_old_configs_still_load(tmp_path):
    from dataclasses import asdict

    from phenolens.train.trainer import TrainConfig, list_checkpoints, train

    assert TrainConfig().augment is True  # the default is unchanged
    off = TrainConfig(augment=False)
    assert TrainConfig(**json.loads(json.dumps(asdict(off)))) == off
    old = asdict(TrainConfig())
    del old["augment"]  # a config saved before the option existed
    assert TrainConfig(**old).augment is True
    # a checkpoint written before the option existed (no `augment` in its fingerprint) resumes as augmented
    out = tmp_path / "out"
    _run(out, 2, checkpoint_every=1)
    _, folder = list_checkpoints(out)[-1]
    state = json.loads((folder / "state.json").read_text())
    assert state["fingerprint"]["augment"] is True and state["config"]["augment"] is True
    del state["fingerprint"]["augment"], state["config"]["augment"]
    (folder / "state.json").write_text(json.dumps(state))
    _run(out, 3, resume=True, checkpoint_every=1)
    with pytest.raises(PhenolensError, match="augment True -> False"):
        _run(out, 4, resume=True, checkpoint_every=1, augment=False)
    # a dataset built with the other setting is refused, not silently trained on
    ds = FakeSet()
    ds.augment = True
    with pytest.raises(PhenolensError, match="augment=True.*augment=False"):
        train(_unet(), _scheduler(), ds, tmp_path / "other", _config(augment=False), null_label=2, progress=False)


def test_loss_decreases_on_fixed_images(tmp_path):
    from phenolens.train.trainer import train

    torch.manual_seed(0)
    steps = 60
    cfg = _config(steps=steps, batch_size=4, lr=2e-3, warmup_steps=5, checkpoint_every=0, cond_dropout=0.0)
    train(_unet(), _scheduler(), FakeSet(fixed_per_class=True), tmp_path, cfg, null_label=2, progress=False)
    losses = [v for _, v in _log(tmp_path)]
    assert len(losses) == steps
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_target_follows_prediction_type(prediction_type):
    """With a network that predicts zero, the loss is exactly mean(target^2) for eq. 4's target."""
    from types import SimpleNamespace

    from phenolens.train.trainer import diffusion_loss

    sched = _scheduler(prediction_type)
    x0 = torch.rand(3, 1, SIZE, SIZE) * 2 - 1
    zero = lambda x, t, class_labels: SimpleNamespace(sample=torch.zeros_like(x))  # noqa: E731
    loss = diffusion_loss(zero, sched, x0, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0, "sample": x0}
    assert torch.allclose(loss, target[prediction_type].pow(2).mean(), atol=1e-6)


def test_v_prediction_trains(tmp_path):
    from phenolens.train.trainer import train

    cfg = _config(steps=3, checkpoint_every=0, ema=False)
    seen = []
    out = train(_unet(), _scheduler("v_prediction"), FakeSet(), tmp_path, cfg, null_label=2, progress=False,
                on_save=lambda m, s: seen.append(s))
    assert seen == [3] and all(torch.isfinite(p).all() for p in out.parameters())
    state = json.loads((tmp_path / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert state["fingerprint"]["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("kw", [dict(grad_accum=2), dict(mixed_precision="bf16")])
def test_grad_accum_and_bf16_run(tmp_path, kw):
    from phenolens.train.trainer import train

    cfg = _config(steps=2, checkpoint_every=0, **kw)
    out = train(_unet(), _scheduler(), FakeSet(), tmp_path, cfg, null_label=2, progress=False)
    assert all(torch.isfinite(p).all() for p in out.parameters())
    assert [s for s, _ in _log(tmp_path)] == [1, 2]
