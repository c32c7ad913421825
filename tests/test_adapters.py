"""The four Phen-LDiff fine-tuning modes (phenolens.models.adapters) on a tiny random UNet2DConditionModel:
what trains, exactness at initialisation, save -> fresh base -> load reproducing outputs bit for bit,
and the LoRA size on a full-size Stable Diffusion 2 UNet built on the meta device (no memory)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from phenolens.errors import PhenolensError
from phenolens.models.adapters import (
    MODES, count_parameters, frozen_weights, load_adaptation, load_trained, prepare_unet, save_adaptation,
    size_in_bytes, trained_state_dict,
)

TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True, norm_num_groups=8,
)

# Stable Diffusion 2 UNet (stabilityai/stable-diffusion-2 unet/config.json)
SD2 = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 5, 32, generator=g)
    target = torch.randn(2, 4, 16, 16, generator=g)
    return x, t, ctx, target


def run(unet, inputs) -> torch.Tensor:
    x, t, ctx, _ = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def train(unet, inputs, steps: int = 3, lr: float = 1e-2) -> None:
    x, t, ctx, target = inputs
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=ctx).sample, target)
        loss.backward()
        opt.step()


def trainable_names(unet) -> list[str]:
    return [n for n, p in unet.named_parameters() if p.requires_grad]


def roundtrip(tmp_path, unet, description, inputs) -> UNet2DConditionModel:
    """save -> fresh base -> load; the loaded UNet must give the fine-tuned outputs bit for bit."""
    nbytes = save_adaptation(tmp_path / "adapter", unet, description)
    assert nbytes == size_in_bytes(trained_state_dict(unet, description["mode"]))
    fresh = tiny_unet()
    loaded = load_adaptation(tmp_path / "adapter", fresh)
    assert loaded == json.loads(json.dumps(description))
    assert torch.equal(run(fresh, inputs), run(unet, inputs))
    return fresh


# ----------------------------------------------------------------------------------- lora
def test_lora_trains_only_adapters_and_reloads_exactly(tmp_path, inputs):
    base = tiny_unet()
    unet = copy.deepcopy(base)
    desc = prepare_unet(unet, "lora", rank=4)
    json.dumps(desc)  # JSON-able
    names = trainable_names(unet)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    adapted = {n.split(".lora_")[0] for n in names}
    assert len(adapted) == desc["layers"]
    assert {n.rsplit(".", 1)[-1] for n in adapted} >= {"to_q", "to_k", "to_v", "proj_in", "proj_out"}
    assert any(n.endswith("to_out.0") for n in adapted) and any(n.endswith("ff.net.0.proj") for n in adapted)
    assert any(n.endswith("ff.net.2") for n in adapted)
    trainable, total = count_parameters(unet)
    assert (desc["trainable"], desc["total"]) == (trainable, total)
    print(f"\nlora r=4 tiny UNet: {trainable} trainable of {total} ({desc['layers']} layers, base {desc['base_total']})")

    assert torch.equal(run(unet, inputs), run(base, inputs))  # B = 0: the fresh adapter is the base
    train(unet, inputs)
    assert not torch.equal(run(unet, inputs), run(base, inputs))

    state = trained_state_dict(unet, "lora")
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert sum(t.numel() for t in state.values()) == trainable
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in state.values())
    roundtrip(tmp_path, unet, desc, inputs)


def test_lora_alpha_default_and_custom():
    desc = prepare_unet(tiny_unet(), "lora", rank=2)
    assert (desc["rank"], desc["alpha"]) == (2, 2.0)
    assert prepare_unet(tiny_unet(), "lora", rank=2, alpha=8)["alpha"] == 8.0


def test_lora_is_under_one_percent_of_the_sd2_unet():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2)
    base_bytes = size_in_bytes(dict(unet.named_parameters()))
    desc = prepare_unet(unet, "lora", rank=4)
    lora = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert lora and all(".lora_" in n for n in lora)
    lora_bytes = size_in_bytes(lora)
    ratio = lora_bytes / base_bytes
    print(f"\nSD-2 UNet: base {desc['base_total']} params = {base_bytes / 2**20:.1f} MiB; LoRA r=4 "
          f"{desc['trainable']} params on {desc['layers']} layers = {lora_bytes / 2**20:.2f} MiB; "
          f"ratio {100 * ratio:.3f} %")
    assert desc["base_total"] > 800_000_000  # it is the full-size UNet (~866M)
    assert ratio < 0.01


# ----------------------------------------------------------------------------------- svdiff
def test_svdiff_is_exact_at_zero_trains_only_shifts_and_reloads_exactly(tmp_path, inputs):
    base = tiny_unet()
    unet = copy.deepcopy(base)
    desc = prepare_unet(unet, "svdiff")
    json.dumps(desc)
    layers = {n: m for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert desc["layers"] == len(layers)

    # δ = 0: every weight is the original bit for bit, hence so are the outputs
    prepared = dict(unet.named_modules())
    for name, module in layers.items():
        assert torch.equal(prepared[name].weight, module.weight), name
    assert torch.equal(run(unet, inputs), run(base, inputs))

    names = trainable_names(unet)
    assert names and all(n.endswith(".parametrizations.weight.0.delta") for n in names)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if n.endswith(".original"))
    n_singular = {name: min(m.weight.shape[0], m.weight[0].numel()) for name, m in layers.items()}
    trainable, total = count_parameters(unet)
    assert trainable == sum(n_singular.values()) == desc["trainable"]
    print(f"\nsvdiff tiny UNet: {trainable} trainable of {total} ({desc['layers']} layers)")

    train(unet, inputs, lr=1e-1)
    out = run(unet, inputs)
    assert not torch.equal(out, run(base, inputs))
    with frozen_weights(unet):  # weights computed once, same outputs
        assert torch.equal(run(unet, inputs), out)
        assert torch.equal(run(unet, inputs), out)

    state = trained_state_dict(unet, "svdiff")
    assert {k: v.shape for k, v in state.items()} == {k: (n,) for k, n in n_singular.items()}
    assert any(v.abs().sum() > 0 for v in state.values())
    nbytes = save_adaptation(tmp_path / "adapter", unet, desc)
    # the SVDs are recomputed with one pinned thread, whatever the caller's setting
    threads = torch.get_num_threads()
    fresh = tiny_unet()
    torch.set_num_threads(2)
    try:
        load_adaptation(tmp_path / "adapter", fresh)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(run(fresh, inputs), out)
    assert nbytes == 4 * trainable


# ----------------------------------------------------------------------------------- attention / full
def test_attention_trains_only_attention_modules(tmp_path, inputs):
    unet = tiny_unet()
    desc = prepare_unet(unet, "attention")
    names = trainable_names(unet)
    assert names and all(".attn1." in n or ".attn2." in n for n in names)
    expected = [n for n, _ in unet.named_parameters() if ".attn1." in n or ".attn2." in n]
    assert sorted(names) == sorted(expected)
    assert not any(".norm" in n or ".ff." in n or "proj_in" in n for n in names)
    trainable, total = count_parameters(unet)
    assert desc["trainable"] == trainable and desc["layers"] == 8
    print(f"\nattention tiny UNet: {trainable} trainable of {total}")
    train(unet, inputs)
    assert sorted(trained_state_dict(unet, "attention")) == sorted(names)
    # the method module stores extra keys beside the description; they travel along
    roundtrip(tmp_path, unet, dict(desc, conditioning="prompt", prompts={"ctrl": "a cell"}), inputs)


def test_full_trains_everything(tmp_path, inputs):
    unet = tiny_unet()
    desc = prepare_unet(unet, "full")
    trainable, total = count_parameters(unet)
    assert trainable == total == desc["trainable"] == desc["base_total"]
    print(f"\nfull tiny UNet: {trainable} trainable of {total}")
    train(unet, inputs, steps=1, lr=1e-3)
    assert set(trained_state_dict(unet, "full")) == {n for n, _ in unet.named_parameters()}
    roundtrip(tmp_path, unet, desc, inputs)


# ----------------------------------------------------------------------------------- errors
def test_bad_mode_rank_alpha():
    with pytest.raises(PhenolensError, match=r"--mode 'dora'.*lora, svdiff, attention, full"):
        prepare_unet(tiny_unet(), "dora")
    for rank in (0, -1, 2.5):
        with pytest.raises(PhenolensError, match="--rank"):
            prepare_unet(tiny_unet(), "lora", rank=rank)
    with pytest.raises(PhenolensError, match="alpha"):
        prepare_unet(tiny_unet(), "lora", alpha=0)
    assert MODES == ("lora", "svdiff", "attention", "full")


def test_prepare_twice_and_mode_mismatch():
    unet = tiny_unet()
    prepare_unet(unet, "svdiff")
    with pytest.raises(PhenolensError, match="fresh base"):
        prepare_unet(unet, "lora")
    with pytest.raises(PhenolensError, match="--mode 'lora'.*svdiff"):
        trained_state_dict(unet, "lora")
    with pytest.raises(PhenolensError, match="prepare_unet"):
        trained_state_dict(tiny_unet(), "lora")


@pytest.mark.parametrize("mode", MODES)
def test_load_with_missing_or_unexpected_key(mode):
    unet = tiny_unet()
    desc = prepare_unet(unet, mode, rank=2)
    state = trained_state_dict(unet, mode)
    dropped = sorted(state)[0]
    partial = {k: v for k, v in state.items() if k != dropped}
    with pytest.raises(PhenolensError, match=r"missing 1 key\(s\): " + dropped.replace(".", r"\.")):
        load_trained(tiny_unet(), desc, partial)
    with pytest.raises(PhenolensError, match=r"unexpected 1 key\(s\): extra\.weight"):
        load_trained(tiny_unet(), desc, dict(state, **{"extra.weight": torch.zeros(1)}))
    with pytest.raises(PhenolensError, match="shape differs"):
        load_trained(tiny_unet(), desc, dict(state, **{dropped: torch.zeros(1)}))


def test_load_adaptation_file_errors(tmp_path):
    with pytest.raises(PhenolensError, match="adapter.json: not found"):
        load_adaptation(tmp_path / "nothing", tiny_unet())
    unet = tiny_unet()
    desc = prepare_unet(unet, "lora", rank=2)
    save_adaptation(tmp_path / "a", unet, desc)
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(dict(desc, rank=3)))
    with pytest.raises(PhenolensError, match="different saves"):
        load_adaptation(tmp_path / "a", tiny_unet())
