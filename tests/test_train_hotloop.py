"""The trainer's hot loop: no host sync per step, and K steps equal K/2 steps then a resume, bit for bit.

A host read of the loss (`.item()`, `float(t)`, `.tolist()`, ...) on a GPU makes the CPU wait for every
queued kernel, once per step. The CPU tests count such reads made from `phenolens/train/trainer.py`
on floating-point tensors (the loss; the CPU index draw `idx.tolist()` is integer and not counted);
the GPU test, skipped without CUDA, counts the syncs CUDA itself reports between the second and the
last step. Models are tiny random-weight UNets (16x16, one channel) on random images.
"""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path
from typing import Sequence

import pytest
import torch

from phenolens.errors import PhenolensError

SIZE = 16
HOST_READS = ("item", "tolist", "numpy", "__float__", "__bool__", "__format__")


class FakeSet:
    """`ImageSet`-like: random images in [-1, 1], two classes, a flip drawn from the generator."""

    n_channels = 1

    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(123)
        self.labels = torch.arange(n) % 2
        self.x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[list(indices)]
        flip = torch.rand(len(indices), generator=generator) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x), self.labels[list(indices)].clone()


def _unet():
    from phenolens.models.unet import build_unet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_unet("tiny", channels=1, size=SIZE, num_conditions=2)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def _config(**kw):
    from phenolens.train.trainer import TrainConfig

    base = dict(steps=8, batch_size=2, lr=1e-3, warmup_steps=2, checkpoint_every=0, log_every=1,
                cond_dropout=0.2, ema_decay=0.9, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def _log(out: Path) -> list[dict[str, str]]:
    with (out / "train_log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def count_host_reads(monkeypatch, run, source: str) -> int:
    """How many times RUN() reads a floating-point tensor back to Python from code in SOURCE."""
    calls = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename == source and self.is_floating_point():
                calls.append(sys._getframe(1).f_lineno)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    run()
    monkeypatch.undo()
    return len(calls)


# ----------------------------------------------------------------------------------------- tests
def test_loss_is_read_back_only_when_logged(tmp_path, monkeypatch):
    from phenolens.train import trainer

    steps, log_every = 40, 10

    def run():
        trainer.train(_unet(), _scheduler(), FakeSet(), tmp_path / "out", _config(steps=steps, log_every=log_every),
                      null_label=2, progress=False)

    reads = count_host_reads(monkeypatch, run, trainer.__file__)
    # one read of the pending losses and one of the logged (gathered) value per log step, nothing in between
    assert 0 < reads <= 2 * (steps // log_every), reads
    assert [int(r["step"]) for r in _log(tmp_path / "out")] == [10, 20, 30, 40]


def test_logging_off_still_reads_back_rarely(tmp_path, monkeypatch):
    from phenolens.train import trainer

    steps = 25

    def run():
        trainer.train(_unet(), _scheduler(), FakeSet(), tmp_path / "out", _config(steps=steps, log_every=0),
                      null_label=2, progress=False)

    reads = count_host_reads(monkeypatch, run, trainer.__file__)
    assert 0 < reads <= steps // trainer.SYNC_EVERY + 1, reads


def test_non_finite_loss_names_its_step_and_nothing_is_written_after_it(tmp_path):
    """The check is deferred to the next read, but it still names the first bad step, and neither the
    log nor a checkpoint gets a row or a folder from that step on."""
    from phenolens.train.trainer import diffusion_loss, list_checkpoints, train

    calls = []

    def loss_fn(*args):
        calls.append(1)
        loss = diffusion_loss(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    out = tmp_path / "out"
    with pytest.raises(PhenolensError, match=r"the loss became nan at step 3\b"):
        train(_unet(), _scheduler(), FakeSet(), out, _config(steps=20, log_every=4, checkpoint_every=2),
              null_label=2, loss_fn=loss_fn, progress=False)
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert _log(out) == []


@pytest.mark.parametrize("kw", [dict(), dict(grad_accum=2, log_every=2)])
def test_k_steps_equal_half_then_resume_bit_for_bit(tmp_path, kw):
    """In one process, K steps and K/2 steps + --resume to K give identical weights (raw and EMA), the
    same optimiser state and the same log. (test_trainer's SIGKILL test resumes across processes,
    at 1e-6.)"""
    from safetensors.torch import load_file

    from phenolens.train.trainer import CHECKPOINTS, EMA_NAME, checkpoint_name, train

    k = 8
    whole, split = tmp_path / "whole", tmp_path / "split"
    a = train(_unet(), _scheduler(), FakeSet(), whole, _config(steps=k, **kw), null_label=2, progress=False)
    train(_unet(), _scheduler(), FakeSet(), split, _config(steps=k // 2, **kw), null_label=2, progress=False)
    b = train(_unet(), _scheduler(), FakeSet(), split, _config(steps=k, **kw), null_label=2, resume=True,
              progress=False)

    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    fa, fb = whole / CHECKPOINTS / checkpoint_name(k), split / CHECKPOINTS / checkpoint_name(k)
    for name in ("model.safetensors", EMA_NAME):
        ta, tb = load_file(str(fa / name)), load_file(str(fb / name))
        assert ta.keys() == tb.keys() and ta
        assert all(torch.equal(ta[n], tb[n]) for n in ta), name
    oa = torch.load(fa / "optimizer.bin", weights_only=True)["state"]
    ob = torch.load(fb / "optimizer.bin", weights_only=True)["state"]
    assert oa.keys() == ob.keys()
    assert all(torch.equal(oa[i][s], ob[i][s]) for i in oa for s in oa[i])
    strip = lambda rows: [(r["step"], r["loss"], r["lr"]) for r in rows]  # noqa: E731
    assert strip(_log(whole)) == strip(_log(split))


def test_device_generator_on_cpu_is_the_generator_itself():
    """On the CPU the loss draws from the trainer's own generator, as earlier versions did (same bits);
    a device that cannot hold a generator leaves it untouched (the caller draws on the CPU)."""
    from phenolens.train.trainer import device_generator

    g = torch.Generator().manual_seed(5)
    assert device_generator(g, "cpu") is g and device_generator(g, torch.device("cpu")) is g
    state = g.get_state()
    assert device_generator(g, "meta") is g and torch.equal(g.get_state(), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_draws_replay_from_the_cpu_generator():
    from types import SimpleNamespace

    from phenolens.train.trainer import device_generator, diffusion_loss

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        first = torch.randn(64, generator=device_generator(g, "cuda"), device="cuda")
        return first, torch.randn(64, generator=device_generator(g, "cuda"), device="cuda")

    a, b = draw(1), draw(1)
    assert all(t.device.type == "cuda" for t in a)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # replays
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], draw(2)[0])  # a fresh stream per call / seed
    seen = []

    def net(x, t, class_labels):
        seen.append((x.device.type, t.device.type))
        return SimpleNamespace(sample=torch.zeros_like(x))

    x0 = torch.zeros(2, 1, SIZE, SIZE, device="cuda")
    diffusion_loss(net, _scheduler(), x0, torch.tensor([0, 1], device="cuda"), torch.Generator().manual_seed(3))
    assert seen == [("cuda", "cuda")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_hot_loop_does_not_sync_every_step(tmp_path):
    """CUDA's own sync report (torch.cuda.set_sync_debug_mode): between the second and the last loss
    call (set-up, the first step's allocations and the final checkpoint excluded), far fewer syncs than
    steps. Draws happen on the GPU: the loss sees timesteps on the model's device."""
    from phenolens.train.trainer import diffusion_loss, train

    steps, log_every = 30, 10
    marks: list[int] = []
    devices = []

    def loss_fn(unet, sched, x0, labels, g):
        marks.append(len(seen))
        devices.append(x0.device.type)
        return diffusion_loss(unet, sched, x0, labels, g)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(_unet(), _scheduler(), FakeSet(), tmp_path / "out", _config(steps=steps, log_every=log_every),
                  null_label=2, loss_fn=loss_fn, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert set(devices) == {"cuda"}
    syncs = [str(w.message)[:160] for w in seen[marks[1]:marks[-1]] if "synchroniz" in str(w.message)]
    assert len(syncs) <= 3 * (steps // log_every), syncs
