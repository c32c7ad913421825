"""Shared fixtures: a tiny dataset on disk and a tiny random-weight model built from a config.

No weights are downloaded: models come from `build_unet` with random weights, so tests check the
machinery (exactness, files, errors), and the demo / slow tests check what a trained model shows.
"""

from __future__ import annotations

import os
from pathlib import Path

# One thread per process: the tiny networks gain little from two, and two threads on a busy 2-core
# machine are many times slower (OpenMP workers wait for each other). Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import tifffile
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED_DATA = Path(os.environ.get("PHENOLENS_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
BBBC021 = SHARED_DATA / "bbbc021-cycloheximide"

CONDITIONS = ["ctrl", "dose1", "dose2"]


def write_blob_images(root: Path, conditions=CONDITIONS, per_condition: int = 4, size: int = 24,
                      channels: int = 2, seed: int = 0) -> Path:
    """uint16 channel-first TIFFs: a bright blob whose size grows with the condition index."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for ci, cond in enumerate(conditions):
        (root / cond).mkdir(parents=True, exist_ok=True)
        for i in range(per_condition):
            cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
            r = size * (0.15 + 0.08 * ci)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            img = np.stack([200 + 3000 * blob * (1 + 0.3 * c) + rng.normal(0, 20, blob.shape) for c in range(channels)])
            tifffile.imwrite(root / cond / f"img{i}.tif", np.clip(img, 0, 65535).astype(np.uint16),
                             photometric="minisblack")
    return root


@pytest.fixture(scope="session")
def blob_data(tmp_path_factory) -> Path:
    return write_blob_images(tmp_path_factory.mktemp("blobs"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, blob_data) -> Path:
    """A PhenDiff model with random weights, saved the way `phenolens train` saves one."""
    from phenolens.data.io import read_image
    from phenolens.data.normalize import Normalizer
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.models.store import ModelInfo, save_model
    from phenolens.models.unet import build_unet

    torch.manual_seed(0)
    unet = build_unet("tiny", channels=2, size=16, num_conditions=len(CONDITIONS))
    images = [read_image(p)[0] for p in sorted(blob_data.glob("*/*.tif"))]
    info = ModelInfo(conditions=list(CONDITIONS), n_channels=2, image_size=16,
                     normalization=Normalizer.fit(images).to_dict())
    model_dir = tmp_path_factory.mktemp("model") / "tiny"
    save_model(model_dir, unet, make_scheduler(), info)
    return model_dir


def accelerate_launch(n: int) -> list[str]:
    """The start of an `accelerate launch` command line of N CPU processes, on a free port (the default
    29500 may be taken by another launch on the machine). On a machine without GPUs `--multi_gpu` starts
    N processes over torchrun, joined over gloo; `--cpu --num_processes N` would start one."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]


def small_class_unet(attention: bool = True):
    """A class-conditional UNet2DModel (as `build_unet` makes), 2 channels, 16 px, narrowed to the fewest
    layers: diffusion tests run hundreds of forward passes, and a call of this one costs a quarter of
    the `tiny` preset's. Random weights from seed 0 (a local generator state: the caller's is kept)."""
    from diffusers import UNet2DModel

    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(0)
        return UNet2DModel(sample_size=16, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                           layers_per_block=1, down_block_types=down, up_block_types=up, norm_num_groups=4,
                           attention_head_dim=8, num_class_embeds=4).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: intra-op threads buy nothing, and on a loaded 2-core machine oversubscription makes
    a forward pass many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fails_with(code_out_err, *needles: str) -> str:
    """The CLI's answer to a user mistake: exit 2, one line on stderr holding every NEEDLE, no traceback."""
    code, _, err = code_out_err
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip()
    assert len(line.splitlines()) == 1, line
    for needle in needles:
        assert needle in line, line
    return line


def snapshot(root: Path, folders: bool = False) -> dict[str, str]:
    """Every file under ROOT -> sha256 of its bytes (and with FOLDERS every folder -> '<dir>'), to
    compare a tree before and after a command byte for byte."""
    import hashlib

    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif folders and p.is_dir():
            out[p.relative_to(root).as_posix()] = "<dir>"
    return out


def write_fake_run(sim: Path, run: Path, model_dir: Path, conditions, n_sources: int, targets=("high",)) -> Path:
    """A translate run over simulated data (a `phenolens simulate` folder) whose 'translations' are real
    images: to `high` = a real high image, to any other target = the source itself. Measure and report
    tests use it to know the truth without running a model."""
    import csv
    import json
    import shutil

    run.mkdir(parents=True)
    model_dir.mkdir(parents=True)
    (model_dir / "phenolens.json").write_text(json.dumps(dict(conditions=list(conditions), n_channels=4,
                                                              training=dict(data=str(sim)))))
    (run / "run.json").write_text(json.dumps(dict(model_dir=str(model_dir), steps=50)))
    rows = []
    sources = sorted((sim / "control").glob("*.tif"))[:n_sources]
    highs = sorted((sim / "high").glob("*.tif"))[-n_sources:]
    for src, high in zip(sources, highs):
        folder = run / "control" / src.stem
        folder.mkdir(parents=True)
        shutil.copy(src, folder / "reconstruction.tif")
        outputs = [("control", "reconstruction", "reconstruction")]
        for target in targets:
            shutil.copy(high if target == "high" else src, folder / f"{target}.tif")
            outputs.append((target, target, "translation"))
        for target, name, kind in outputs:
            rows.append(dict(source_path=str(src), source_condition="control", target_condition=target,
                             output_path=f"control/{src.stem}/{name}.tif", recon_mse="0", recon_psnr="100",
                             change_mse="0.01", kind=kind, reconstruction_path=f"control/{src.stem}/reconstruction.tif"))
    with open(run / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return run


def run_cli(*argv) -> tuple[int, str, str]:
    """Run `phenolens ARGV` in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from phenolens.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, blob_data) -> Path:
    """A tiny PhenDiff model trained for a few hundred steps: a random network is no denoiser, so
    inversion exactness is only meaningful on a trained one."""
    from phenolens.methods.phendiff import PhenDiffTrainSettings, train_phendiff
    from phenolens.train.trainer import TrainConfig

    model_dir = tmp_path_factory.mktemp("trained") / "model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_phendiff(blob_data, model_dir, PhenDiffTrainSettings(preset="tiny", size=16),
                       TrainConfig(steps=300, batch_size=8, lr=1e-3, warmup_steps=20, checkpoint_every=10**6),
                       progress=False)
    finally:
        torch.set_num_threads(threads)
    return model_dir
