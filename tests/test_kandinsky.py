"""DIFFusion on Kandinsky 2.2 (paper 004 §3) with tiny random-weight components built from configs and
saved as local decoder and prior repositories (no download): guided EF-DDPM inversion -> edit -> render,
LoRA domain tuning through the CLI (adapter only, resumable) and translation of the tuned folder, and the
one-line errors a user meets."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import run_cli, write_blob_images

FAST_TUNE = ["--batch-size", "2", "--size", "32", "--warmup-steps", "1", "--lr", "1e-3", "--ema-decay", "0.9"]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    from phenolens.models.kandinsky import save_tiny_repositories

    return save_tiny_repositories(tmp_path_factory.mktemp("kandinsky"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_blob_images(tmp_path_factory.mktemp("blobs"), conditions=["ctrl", "treated"], per_condition=4,
                             size=32, channels=2)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, repos, data):
    decoder, prior = repos
    model_dir = tmp_path_factory.mktemp("tuned") / "k"
    code, out, err = run_cli("finetune", data, model_dir, "--method", "kandinsky", "--base", decoder, "--prior", prior,
                             "--steps", "2", "--checkpoint-every", "1", *FAST_TUNE)
    assert code == 0, err
    return model_dir, out


def _images(folder):
    from phenolens.data.io import read_image

    return [read_image(p)[0] for p in sorted(folder.glob("*.tif"))]


def test_guided_ef_ddpm_inversion_edit_render(tuned, data):
    """(a) Under guidance (inversion and generation alike, App. B.3) the EF-DDPM reconstruction is exact in
    latent space; an ω ≠ 0 edit changes the image; ω = 0 gives the reconstruction."""
    from phenolens.diffusion.inversion import InversionSettings
    from phenolens.methods.kandinsky import Kandinsky

    model = Kandinsky.from_pretrained(tuned[0], device="cpu")
    assert model.guide_inversion and model.latent
    means = model.mean_embeddings({c: [(p, img) for p, img in zip(sorted((data / c).glob("*.tif")), _images(data / c))]
                                   for c in ("ctrl", "treated")})
    for m in means.means.values():  # eq. 7 averages unit vectors
        assert 0 < float(m.norm()) <= 1 + 1e-5
    model.use_class_means(means, omega=2.0)
    raws = _images(data / "ctrl")[:2]
    gens = [torch.Generator().manual_seed(i) for i in range(len(raws))]
    result = model.translate(raws, "ctrl", ["to=treated,omega=2", "to=treated,omega=0"], guidance_scale=3.0,
                             inversion=InversionSettings(method="ef-ddpm", steps=10), generator=gens)
    assert np.all(result.latent_recon_mse < 1e-8), result.latent_recon_mse
    assert np.all(result.latent_change_mse["to=treated,omega=2"] > 1e-3)
    edited, recon = result.translations["to=treated,omega=2"], result.reconstructions
    assert all(np.abs(e - r).max() > 0 for e, r in zip(edited, recon))
    assert all(np.array_equal(e, r) for e, r in zip(result.translations["to=treated,omega=0"], recon))

    # the decoder's input: ĉ = c + ω·Δc on unit vectors, scaled back to the image's own embedding length
    x0, _ = model.to_model_space(raws)
    own = model.condition(x0, ["ctrl", "ctrl"])
    edit = model.parse_edit("to=treated,omega=2")
    got = model.edited(own, edit, ["ctrl", "ctrl"], x0)["image_embeds"]
    c = torch.nn.functional.normalize(own["image_embeds"], dim=-1)
    want = (c + 2.0 * (means.means["treated"] - means.means["ctrl"])) * own["image_embeds"].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(model.embedding_condition(c, own)["image_embeds"], own["image_embeds"])
    # the null condition is the embedding of an all-zero CLIP input, one row per image
    from phenolens.models.kandinsky import zero_embed

    null = model.null_condition(3)["image_embeds"]
    assert null.shape[0] == 3 and torch.equal(null[1:2], zero_embed(model.image_encoder))


def test_lora_finetune_saves_adapter_only_resumes_and_translates(tuned, repos, data, tmp_path):
    """(b) `finetune --method kandinsky` trains LoRA on the attention and added key/value projections only,
    saves the adapter alone, resumes exactly, and its folder translates through the CLI."""
    from safetensors.torch import load_file

    from phenolens.models.kandinsky import LORA_TARGETS

    model_dir, out = tuned
    info = json.loads((model_dir / "phenolens.json").read_text())
    assert info["method"] == "kandinsky" and info["base"] == str(repos[0])
    assert info["adaptation"]["prior"] == str(repos[1]) and info["cond_dropout"] == 0.1
    trainable = info["training"]["trainable_parameters"]
    assert f"training {trainable:,} of" in out
    saved = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                   if p.is_file() and "checkpoints" not in p.parts)
    assert not any(s.startswith(("unet/", "movq/", "image_encoder/")) for s in saved), saved
    adapter = load_file(str(model_dir / "adapter" / "adapter.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    layers = {k.split(".lora_")[0] for k in adapter}
    assert all(layer.endswith(tuple("." + t for t in LORA_TARGETS)) for layer in layers), layers
    for kind in ("add_k_proj", "add_v_proj", "to_q", "to_out.0"):
        assert any(layer.endswith(kind) for layer in layers), kind
    assert sum(v.numel() for v in adapter.values()) == trainable

    decoder, prior = repos
    common = ["--method", "kandinsky", "--base", decoder, "--prior", prior, "--checkpoint-every", "2", *FAST_TUNE]
    assert run_cli("finetune", data, tmp_path / "straight", "--steps", "4", *common)[0] == 0
    assert run_cli("finetune", data, tmp_path / "split", "--steps", "2", *common)[0] == 0
    code, _, err = run_cli("finetune", data, tmp_path / "split", "--steps", "4", "--resume", *common)
    assert code == 0, err
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if ".lora_B." in k)

    run = tmp_path / "run"
    code, _, err = run_cli("translate", model_dir, data / "ctrl", run, "--from", "ctrl", "--edit", "to=treated,omega=2",
                           "--inversion", "ef-ddpm", "--steps", "8", "--guidance-scale", "2", "--mean-images", "2",
                           "--mean-data", data)
    assert code == 0, err
    with open(run / "index.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "translation"]
    assert len(rows) == 4 and all(r["edit"] == "to=treated,omega=2" for r in rows)
    assert max(float(r["latent_recon_mse"]) for r in rows) < 1e-8
    assert min(float(r["latent_change_mse"]) for r in rows) > 1e-3
    assert (run / "class_means.safetensors").is_file()

    minimal = tmp_path / "minimal"
    code, _, err = run_cli("translate", model_dir, data / "ctrl", minimal, "--from", "ctrl", "--to", "treated",
                           "--omega", "2", "--inversion", "ef-ddpm", "--steps", "6", "--guidance-scale", "2",
                           "--minimal-edit", "--strengths", "2", "--judge-steps", "3", "--judge-data", data,
                           "--mean-images", "2", "--mean-data", data)
    assert code == 0, err
    with open(minimal / "index.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "translation"]
    assert len(rows) == 4 and all(r["t_skip"] != "" for r in rows)


@pytest.mark.parametrize("which", ["--base", "--prior"])
def test_hub_id_offline_is_one_line(repos, data, tmp_path, monkeypatch, which):
    """(c) A hub id that is not cached, with HF_HUB_OFFLINE=1: exit 2, one line, naming the id and the option."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    decoder, prior = repos
    hub = "nobody-here/not-a-kandinsky"
    given = {"--base": hub, "--prior": prior} if which == "--base" else {"--base": decoder, "--prior": hub}
    code, _, err = run_cli("finetune", data, tmp_path / "m", "--method", "kandinsky", "--base", given["--base"],
                           "--prior", given["--prior"], "--steps", "1", *FAST_TUNE)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert hub in err and which in err and "download" in err


def test_more_than_three_channels_refused(repos, tmp_path):
    """(d) MoVQ and CLIP see RGB: 4 channels are refused in one line naming --channels."""
    decoder, prior = repos
    four = write_blob_images(tmp_path / "four", conditions=["a", "b"], per_condition=2, size=32, channels=4)
    code, _, err = run_cli("finetune", four, tmp_path / "m4", "--method", "kandinsky", "--base", decoder, "--prior",
                           prior, "--steps", "1", *FAST_TUNE)
    assert code == 2 and "--channels" in err and "4 channels" in err and len(err.strip().splitlines()) == 1, err


def test_method_options_are_checked(repos, data, tmp_path):
    decoder, prior = repos
    code, _, err = run_cli("finetune", data, tmp_path / "a", "--method", "kandinsky", "--base", decoder, "--steps", "1")
    assert code == 2 and "--prior" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli("finetune", data, tmp_path / "b", "--base", decoder, "--prior", prior, "--steps", "1")
    assert code == 2 and "--prior is for --method kandinsky" in err, err
    code, _, err = run_cli("finetune", data, tmp_path / "c", "--method", "kandinsky", "--base", prior, "--prior",
                           prior, "--steps", "1")
    assert code == 2 and "unet/" in err and len(err.strip().splitlines()) == 1, err
