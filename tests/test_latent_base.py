"""The pretrained-base loader of Phen-LDiff (`phenolens.models.latent`), on a tiny random-weight
Stable-Diffusion-2-shaped pipeline built locally: nothing is downloaded."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phenolens.errors import PhenolensError
from phenolens.models.latent import (
    LatentBase,
    build_tiny_base,
    encode_prompts,
    load_base,
    sd2_unet_config,
    sd2_vae_config,
)

WEIGHT_FILES = ["vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny-sd2")


@pytest.fixture(scope="module")
def loaded(tiny_base) -> LatentBase:
    return load_base(tiny_base)


def copy_base(tiny_base: Path, dest: Path) -> Path:
    shutil.copytree(tiny_base, dest)
    return dest


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message, message
    return message


# ----------------------------------------------------------------------------------- building
def test_build_is_deterministic_and_seeded(tmp_path, tiny_base):
    again = build_tiny_base(tmp_path / "again", seed=0)
    other = build_tiny_base(tmp_path / "other", seed=1)
    for name in WEIGHT_FILES:
        a, b, c = (load_file(str(d / name)) for d in (tiny_base, again, other))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a), name
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (tiny_base / name).read_text() == (again / name).read_text()


def test_load_base_loads_all_components(loaded, tiny_base):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(loaded.vae, AutoencoderKL)
    assert isinstance(loaded.unet, UNet2DConditionModel)
    assert isinstance(loaded.text_encoder, CLIPTextModel)
    assert isinstance(loaded.tokenizer, CLIPTokenizer)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.source == str(tiny_base)
    assert loaded.vae_scale_factor == 2 and loaded.latent_channels == 4
    assert loaded.scaling_factor == pytest.approx(0.18215)
    assert loaded.prediction_type == "epsilon"
    cfg = loaded.scheduler.config  # SD2's schedule
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert cfg.num_train_timesteps == 1000 and cfg.steps_offset == 1 and cfg.timestep_spacing == "leading"
    assert not cfg.clip_sample and not cfg.set_alpha_to_one
    assert loaded.unet.config.use_linear_projection and loaded.unet.config.cross_attention_dim == 32
    assert loaded.tokenizer.model_max_length == 77 and loaded.tokenizer.pad_token == "!"


def test_load_base_v_prediction_subset_and_dtype(tmp_path):
    base = build_tiny_base(tmp_path / "v", prediction_type="v_prediction", seed=3)
    lb = load_base(str(base), components=("vae", "unet", "scheduler"), dtype=torch.float16)
    assert lb.prediction_type == "v_prediction"
    assert lb.text_encoder is None and lb.tokenizer is None
    assert lb.unet.dtype == torch.float16 and lb.vae.dtype == torch.float16
    only = load_base(base, components=("vae", "unet"))
    assert only.scheduler is None
    with pytest.raises(ValueError, match="scheduler was not loaded"):
        only.prediction_type


def test_stable_diffusion_pipeline_loads_and_runs(tiny_base):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a fluorescence microscopy image of ctrl cells", num_inference_steps=2, height=32, width=32,
               output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)
    assert bool((out.images >= 0).all() and (out.images <= 1).all())


# ------------------------------------------------------------------------------------ prompts
def test_encode_prompts_shape_and_prompts_differ(loaded):
    prompts = ["a fluorescence microscopy image of ctrl cells", "a fluorescence microscopy image of dose1 cells", ""]
    ids = [loaded.tokenizer(p).input_ids for p in prompts]
    assert ids[0] != ids[1]
    emb = encode_prompts(loaded.text_encoder, loaded.tokenizer, prompts)
    assert emb.shape == (3, 77, 32) and not emb.requires_grad
    assert not torch.allclose(emb[0], emb[1])
    long = encode_prompts(loaded.text_encoder, loaded.tokenizer, ["cells " * 200])  # truncated, not refused
    assert long.shape == (1, 77, 32)
    # the pipeline's own encoder gives the same embedding: SD2 uses the last hidden state, no clip skip
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=loaded.vae, unet=loaded.unet, text_encoder=loaded.text_encoder,
                                   tokenizer=loaded.tokenizer, scheduler=loaded.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    ref, _ = pipe.encode_prompt(prompts[:1], "cpu", 1, False)
    torch.testing.assert_close(emb[:1], ref)


# ------------------------------------------------------------------------------------- errors
def clear_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_hub_id_offline_fails_fast_with_download_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PhenolensError) as excinfo:
        load_base("nobody-here/not-a-model")
    assert time.perf_counter() - start < 5
    message = one_line_error(excinfo)
    assert "nobody-here/not-a-model" in message and "download" in message
    assert "--local-dir DIR" in message and "--base DIR" in message


def test_hub_unreachable_without_offline_env(monkeypatch):
    import huggingface_hub

    clear_offline(monkeypatch)

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    start = time.perf_counter()
    with pytest.raises(PhenolensError, match="cannot be reached") as excinfo:
        load_base("nobody-here/not-a-model")
    assert time.perf_counter() - start < 5
    assert "download" in one_line_error(excinfo)


def test_hub_model_not_found(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    class NotFound(RepositoryNotFoundError):
        def __init__(self):
            Exception.__init__(self, "404 Client Error. Repository Not Found")

    def not_found(*args, **kwargs):
        raise NotFound()

    clear_offline(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "model_info", not_found)
    with pytest.raises(PhenolensError, match="no such model on the Hugging Face hub") as excinfo:
        load_base("nobody-here/not-a-model")
    one_line_error(excinfo)


@pytest.mark.parametrize("path", ["./no/such/base", "/no/such/base", "~/no-such-base-dir", "a/b/c"])
def test_missing_path_is_no_such_directory(path):
    with pytest.raises(PhenolensError, match="no such directory") as excinfo:
        load_base(path)
    one_line_error(excinfo)


def test_missing_path_object_is_no_such_directory(tmp_path):
    with pytest.raises(PhenolensError, match="no such directory"):
        load_base(tmp_path / "nothing")


def test_invalid_hub_id():
    with pytest.raises(PhenolensError, match="not a Hugging Face hub id"):
        load_base("not a model id")


def test_directory_missing_unet(tmp_path, tiny_base):
    base = copy_base(tiny_base, tmp_path / "no-unet")
    shutil.rmtree(base / "unet")
    with pytest.raises(PhenolensError, match=r"no unet/ folder") as excinfo:
        load_base(base)
    assert "vae/, unet/, text_encoder/, tokenizer/ and scheduler/" in one_line_error(excinfo)


def test_pipeline_without_text_encoder(tmp_path, tiny_base):
    base = copy_base(tiny_base, tmp_path / "no-te")
    shutil.rmtree(base / "text_encoder")
    with pytest.raises(PhenolensError, match=r"no text_encoder/ folder"):
        load_base(base)
    lb = load_base(base, components=("vae", "unet", "scheduler"))  # not needed: fine
    assert lb.text_encoder is None


def test_wrong_model_class(tmp_path, tiny_base):
    base = copy_base(tiny_base, tmp_path / "pixel-unet")
    config = json.loads((base / "unet" / "config.json").read_text())
    config["_class_name"] = "UNet2DModel"
    (base / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PhenolensError, match=r"unet/ holds UNet2DModel, not a text-conditioned UNet") as excinfo:
        load_base(base)
    one_line_error(excinfo)


def test_phenolens_model_is_not_a_base(tiny_model):
    with pytest.raises(PhenolensError, match="is a phenolens model, not a pretrained pipeline"):
        load_base(tiny_model)


def test_mismatched_text_encoder(tmp_path, tiny_base):
    base = copy_base(tiny_base, tmp_path / "mismatch")
    shutil.rmtree(base / "text_encoder")
    wide = build_tiny_base(tmp_path / "wide", cross_attention_dim=48)
    shutil.copytree(wide / "text_encoder", base / "text_encoder")
    with pytest.raises(PhenolensError, match="32-dimensional text embeddings but text_encoder/ makes 48"):
        load_base(base)


# --------------------------------------------------------------------------- full-size configs
@pytest.mark.parametrize("variant", ["base", "768-v"])
def test_sd2_full_size_configs_build_on_meta(variant):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd2_unet_config(variant))
        vae = AutoencoderKL(**sd2_vae_config(variant))
    assert next(unet.parameters()).device.type == "meta"
    n_unet = sum(p.numel() for p in unet.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    assert 860e6 < n_unet < 870e6, n_unet  # published SD2 UNet: 865,910,724
    assert 83e6 < n_vae < 84e6, n_vae  # published SD2 VAE: 83,653,863
    assert unet.config.sample_size == (64 if variant == "base" else 96)
    assert unet.config.upcast_attention == (variant == "768-v")
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.scaling_factor == 0.18215
