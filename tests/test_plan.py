"""`phenolens.run.plan`: the dry-run plan of a translate run, checked against real runs whose UNet calls
are counted, on a tiny random-weight model and simulated images."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import snapshot

CONDS = ["control", "mid", "high"]
STEPS = 4
# fixed-point with a tolerance: the plan's count comes from one calibration batch; over the whole run the
# images of the other batches converge within this fraction of it (stated in the plan's docstring)
FIXED_POINT_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Simulated cells, 3 per condition at 32 px, plus one 40 px image per condition (a second shape)."""
    from phenolens.data.simulate import simulate

    root = tmp_path_factory.mktemp("plan")
    sim = simulate(root / "sim", conditions=CONDS, per_condition=3, size=32, seed=2, progress=False, workers=1)
    big = simulate(root / "big", conditions=CONDS, per_condition=1, size=40, seed=3, progress=False, workers=1)
    for cond in CONDS:
        for p in sorted((big / cond).glob("*.tif")):
            shutil.copy(p, sim / cond / f"big_{p.name}")
    return sim


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data) -> Path:
    """A PhenDiff model with random weights on 2 of the simulator's channels (a narrow UNet: cheap calls)."""
    from diffusers import UNet2DModel

    from phenolens.data.io import read_image
    from phenolens.data.normalize import Normalizer
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.models.store import ModelInfo, save_model

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(0)
        unet = UNet2DModel(sample_size=32, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                           layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                           num_class_embeds=len(CONDS) + 1).eval()
    images = [read_image(p, channels=[0, 1])[0] for p in sorted(data.glob("*/*.tif"))]
    info = ModelInfo(conditions=list(CONDS), n_channels=2, image_size=32, channels=[0, 1],
                     normalization=Normalizer.fit(images).to_dict(), cond_dropout=0.1)
    out = tmp_path_factory.mktemp("planmodel") / "model"
    save_model(out, unet, make_scheduler(), info)
    return out


def settings(model_dir, data, **kw):
    from phenolens.run.translate import TranslateSettings

    base = dict(model_dir=str(model_dir), input=str(data), steps=STEPS, batch_size=4, guidance_scale=1.0)
    return TranslateSettings(**{**base, **kw})


def counted_run(monkeypatch, s, out: Path, cls=None) -> Counter:
    """Run translate with every UNet call of a CLS model (default PhenDiff) counted: rows -> calls."""
    from phenolens.methods.phendiff import PhenDiff
    from phenolens.run.translate import run_translate

    cls = cls or PhenDiff
    calls: Counter = Counter()
    original = cls.network

    def network(self):
        fn = original(self)

        def counted(x, t, condition):
            calls[int(x.shape[0])] += 1
            return fn(x, t, condition)

        return counted

    with monkeypatch.context() as m:
        m.setattr(cls, "network", network)
        run_translate(s, out, device="cpu", progress=False)
    return calls


def forwards(calls: Counter) -> int:
    return sum(rows * n for rows, n in calls.items())


@pytest.mark.parametrize("kw", [dict(), dict(targets=["high"], skip=1), dict(source="control", batch_size=3)],
                         ids=["all-targets", "one-target-skip", "one-source"])
def test_ddim_counts_equal_a_counted_run(monkeypatch, model_dir, data, tmp_path, kw, one_thread):
    from phenolens.run.plan import plan_translate

    s = settings(model_dir, data, inversion="ddim", **kw)
    plan = plan_translate(s, device="cpu")
    calls = counted_run(monkeypatch, s, tmp_path / "run")
    assert plan.inversion_basis == "exact"
    assert plan.forwards_total == forwards(calls)
    assert plan.unet_calls == sum(calls.values())
    assert set(plan.timings) <= set(calls)  # timed at row counts the run really uses
    S = STEPS - s.skip
    assert plan.inversion_forwards_per_image == S
    n_images = 3 * 4 if s.source is None else 4
    assert plan.images == n_images
    # per image: its reconstruction, plus each target other than its own condition
    targets = s.targets or CONDS
    sources = CONDS if s.source is None else [s.source]
    own = sum(t in sources for t in targets) / len(sources)  # targets equal to the image's condition, on average
    assert plan.render_forwards_per_image == pytest.approx(S * (1 + len(targets) - own))


def test_batches_follow_shapes(model_dir, data, one_thread):
    from phenolens.run.plan import plan_translate

    plan = plan_translate(settings(model_dir, data, inversion="ddim"), device="cpu")
    assert plan.shapes == {(32, 32): 9, (40, 40): 3}
    assert plan.batches == 3 + 1  # ceil(9 / 4) + ceil(3 / 4)


def test_guidance_doubles_the_rows_of_the_targets_only(monkeypatch, model_dir, data, tmp_path, one_thread):
    from phenolens.run.plan import plan_translate

    s1 = settings(model_dir, data, inversion="ddim")
    s2 = settings(model_dir, data, inversion="ddim", guidance_scale=2.0)
    p1, p2 = plan_translate(s1, device="cpu"), plan_translate(s2, device="cpu")
    # conditional and unconditional go through the UNet in one call of twice the rows: the same number
    # of calls, twice the image-forwards of every target (the reconstruction and the inversion unguided)
    assert p2.unet_calls == p1.unet_calls
    target_forwards = p1.render_forwards_per_image - STEPS
    assert p2.render_forwards_per_image == pytest.approx(STEPS + 2 * target_forwards)
    assert p2.inversion_forwards_per_image == p1.inversion_forwards_per_image
    calls = counted_run(monkeypatch, s2, tmp_path / "guided")
    assert p2.forwards_total == forwards(calls) and p2.unet_calls == sum(calls.values())
    assert max(calls) == 2 * 4  # a full batch's targets: 8 rows in one call
    assert max(p2.timings) == 8


def test_fixed_point_without_tolerance_is_exact(monkeypatch, model_dir, data, tmp_path, one_thread):
    from phenolens.run.plan import plan_translate

    s = settings(model_dir, data, inversion="fixed-point", inversion_iters=2, inversion_tol=0.0, solver="picard")
    plan = plan_translate(s, device="cpu", calibrate=False)
    calls = counted_run(monkeypatch, s, tmp_path / "run")
    assert plan.inversion_basis == "exact"
    assert plan.inversion_forwards_per_image == 1 + STEPS * 2  # one plain call (warm start), 2 per step
    assert plan.forwards_total == forwards(calls) and plan.unet_calls == sum(calls.values())


def test_fixed_point_calibrated_is_close_and_the_bound_is_an_upper_bound(monkeypatch, model_dir, data, tmp_path,
                                                                         one_thread):
    from phenolens.run.plan import plan_translate

    s = settings(model_dir, data, inversion="fixed-point", inversion_iters=4, inversion_tol=1e-3)
    calibrated = plan_translate(s, device="cpu")
    bound = plan_translate(s, device="cpu", calibrate=False)
    calls = counted_run(monkeypatch, s, tmp_path / "run")
    assert calibrated.inversion_basis == "calibrated" and calibrated.calibration["images"] == 4
    assert bound.inversion_basis == "upper bound"
    assert bound.inversion_forwards_per_image == 1 + STEPS * 4
    actual = forwards(calls)
    assert abs(calibrated.forwards_total - actual) <= FIXED_POINT_TOLERANCE * actual
    assert bound.forwards_total >= actual and bound.unet_calls >= sum(calls.values())


def test_estimate_is_positive_and_shared_by_processes(model_dir, data, tmp_path, one_thread):
    from phenolens.run.plan import format_plan, plan_translate

    uniform = tmp_path / "uniform" / "control"  # 4 images of one shape and condition: 2 batches of 2
    uniform.mkdir(parents=True)
    for p in sorted(data.glob("*/[!b]*.tif"))[:4]:
        shutil.copy(p, uniform / f"{p.parent.name}-{p.name}")
    s = settings(model_dir, uniform.parent, inversion="ddim", batch_size=2, targets=["high"])
    one = plan_translate(s, device="cpu")
    assert one.batches == 2 and one.forward_rows == 2
    assert one.estimated_seconds > 0 and one.seconds_per_forward > 0
    # with the same timings on 2 processes: one batch each, half the time
    two = plan_translate(s, device="cpu", world_size=2, timings=one.timings)
    assert two.world_size == 2 and two.forwards_total == one.forwards_total
    assert two.estimated_seconds < one.estimated_seconds
    assert two.estimated_seconds == pytest.approx(one.estimated_seconds / 2)
    assert "on 2 processes" in format_plan(two) and "on 2 processes" not in format_plan(one)


def test_planner_writes_nothing(model_dir, data, tmp_path, monkeypatch, one_thread):
    from phenolens.run.plan import format_plan, plan_translate

    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    before = snapshot(data, folders=True), snapshot(model_dir, folders=True)
    plan = plan_translate(settings(model_dir, data, inversion="fixed-point", inversion_tol=1e-3), device="cpu")
    text = format_plan(plan)
    assert (snapshot(data, folders=True), snapshot(model_dir, folders=True)) == before
    assert not any(here.iterdir())
    for needle in ("12 image(s)", "3 target(s)", "UNet forwards", "per image", "in all", "estimated time",
                   "measured on cpu", "not counted"):
        assert needle in text, text


@pytest.fixture(scope="module")
def other_models(tmp_path_factory, data):
    """A Phen-LDiff model (latent: VAE around a cross-attention UNet) and a DIFFusion model (guidance folded
    into inversion and reconstruction too), both briefly trained on 3 of the simulator's channels."""
    from conftest import run_cli
    from phenolens.cli import main
    from phenolens.models.latent import build_tiny_base

    root = tmp_path_factory.mktemp("others")
    small = root / "small"
    for cond in CONDS:  # one shape: the latent model's training crops need no --size
        (small / cond).mkdir(parents=True)
        for p in sorted((data / cond).glob("[!b]*.tif")):
            shutil.copy(p, small / cond / p.name)
    base = build_tiny_base(root / "base")
    code, _, err = run_cli("finetune", small, root / "ldiff", "--base", base, "--mode", "lora", "--rank", "4",
                           "--channels", "0,1,3", "--steps", "4", "--batch-size", "4", "--warmup-steps", "1",
                           "--checkpoint-every", "100")
    assert code == 0, err
    assert main(["train", str(small), str(root / "dfn"), "--method", "diffusion", "--channels", "0,1,3", "--steps",
                 "4", "--batch-size", "4", "--code-dim", "8", "--checkpoint-every", "100"]) == 0
    return small, {"phenldiff": root / "ldiff", "diffusion": root / "dfn"}


@pytest.mark.parametrize("method,guidance", [("phenldiff", 1.0), ("diffusion", 2.0)])
def test_other_methods_count_exactly(monkeypatch, other_models, tmp_path, method, guidance, one_thread):
    from phenolens.methods.diffusion_embedding import DIFFusion
    from phenolens.methods.phenldiff import PhenLDiff
    from phenolens.run.plan import plan_translate
    from phenolens.run.translate import TranslateSettings

    small, dirs = other_models
    s = TranslateSettings(model_dir=str(dirs[method]), input=str(small), steps=STEPS, batch_size=4, inversion="ddim",
                          guidance_scale=guidance)
    plan = plan_translate(s, device="cpu")
    calls = counted_run(monkeypatch, s, tmp_path / "run", {"phenldiff": PhenLDiff, "diffusion": DIFFusion}[method])
    assert plan.forwards_total == forwards(calls) and plan.unet_calls == sum(calls.values())
    if method == "diffusion":  # guided: inversion and reconstruction 2 per step, like every target
        assert plan.guided_inversion and plan.inversion_forwards_per_image == 2 * STEPS
        assert plan.render_forwards_per_image == 2 * STEPS * (1 + 2)  # reconstruction + the 2 other conditions
    else:
        assert plan.vae_calls > 0 and "VAE" in plan.not_counted[1]


def test_translate_dry_run_prints_the_plan_and_writes_nothing(model_dir, data, tmp_path):
    from conftest import run_cli

    out = tmp_path / "never"
    code, printed, err = run_cli("translate", model_dir, data, out, "--dry-run", "--inversion", "ddim", "--steps", "3",
                                 "--device", "cpu")
    assert code == 0, err
    assert "UNet forwards" in printed and "estimated time" in printed
    assert not out.exists()
