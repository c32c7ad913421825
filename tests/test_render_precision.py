"""`translate(render_precision=...)`: bf16 target renders behind an option, on a tiny random-weight model.

The default ("fp32") must be what translate always gave, bit for bit; "bf16" renders only the edits under
bfloat16 autocast (the inversion and the reconstruction stay fp32, so `recon_mse` is still the exactness
check) and gives float32 images close to the fp32 ones; anything else is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

STEPS = 10


@pytest.fixture(scope="module")
def model(tiny_model, one_thread):
    from phenolens.methods.phendiff import PhenDiff

    return PhenDiff.from_pretrained(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def raws(blob_data):
    from phenolens.data.io import read_image

    return [read_image(p)[0] for p in sorted((blob_data / "ctrl").glob("*.tif"))]


def _translate(model, raws, **kw):
    from phenolens.diffusion.inversion import InversionSettings

    return model.translate(raws, "ctrl", ["dose1", "dose2"], inversion=InversionSettings(method="ddim", steps=STEPS),
                           **kw)


@pytest.fixture(scope="module")
def results(model, raws):
    """None: the argument not given at all."""
    return {p: _translate(model, raws, **({} if p is None else {"render_precision": p}))
            for p in (None, "fp32", "bf16")}


def _model_space(model, images) -> np.ndarray:
    return np.stack([model.normalizer.to_model(img) for img in images])


def test_fp32_is_the_default_bit_for_bit(results):
    plain, fp32 = results[None], results["fp32"]
    for a, b in zip(plain.reconstructions, fp32.reconstructions):
        assert np.array_equal(a, b)
    for key in plain.translations:
        for a, b in zip(plain.translations[key], fp32.translations[key]):
            assert a.dtype == np.float32 and np.array_equal(a, b)
        assert np.array_equal(plain.change_mse[key], fp32.change_mse[key])
    assert np.array_equal(plain.recon_mse, fp32.recon_mse)


def test_bf16_renders_only_the_edits(results):
    fp32, bf16 = results["fp32"], results["bf16"]
    # inversion and reconstruction untouched: recon_mse is still the fp32 exactness check
    for a, b in zip(fp32.reconstructions, bf16.reconstructions):
        assert np.array_equal(a, b)
    assert np.array_equal(fp32.recon_mse, bf16.recon_mse)
    assert np.array_equal(fp32.inversion_forwards, bf16.inversion_forwards)
    assert np.array_equal(fp32.render_forwards, bf16.render_forwards)


def test_bf16_translations_differ_but_are_close(model, results):
    fp32, bf16 = results["fp32"], results["bf16"]
    for key in ("dose1", "dose2"):
        assert all(t.dtype == np.float32 for t in bf16.translations[key])
        a, b = _model_space(model, fp32.translations[key]), _model_space(model, bf16.translations[key])
        diff = np.abs(a - b)
        # measured on this model (10 DDIM steps, seed-0 random tiny UNet, CPU), in [-1, 1] units: mean 0.0064-0.0070,
        # 99th percentile 0.19-0.21, max 1.26 (a random network amplifies the ~4e-3 relative error of bf16's
        # 8-bit mantissa step after step, and a few pixels cross the clip); change_mse moves by < 0.5 %
        assert diff.mean() > 1e-5, "bf16 render gave the fp32 images: autocast did not apply"
        assert diff.mean() < 0.03, diff.mean()
        assert np.quantile(diff, 0.99) < 0.5, np.quantile(diff, 0.99)
        # the change measured against the source barely moves
        rel = np.abs(bf16.change_mse[key] - fp32.change_mse[key]) / fp32.change_mse[key]
        assert rel.max() < 0.05, rel


def test_bf16_with_guidance_and_mixed_sources(model, raws):
    """Guided edits (network called on [cond, null] under autocast) and an identity edit (a source equal to
    its target is its reconstruction, never rendered) also work in bf16."""
    from phenolens.diffusion.inversion import InversionSettings

    sources = ["ctrl", "dose1", "ctrl", "dose1"][:len(raws)]
    kw = dict(inversion=InversionSettings(method="ddim", steps=4), guidance_scale=2.0)
    a = model.translate(raws, sources, ["dose1"], **kw)
    b = model.translate(raws, sources, ["dose1"], render_precision="bf16", **kw)
    for i, s in enumerate(sources):
        if s == "dose1":  # identity: the reconstruction, fp32 in both
            assert np.array_equal(a.translations["dose1"][i], b.translations["dose1"][i])
            assert np.array_equal(b.translations["dose1"][i], b.reconstructions[i])
        else:
            assert not np.array_equal(a.translations["dose1"][i], b.translations["dose1"][i])


@pytest.mark.parametrize("bad", ["bf32", "fp16", "BF16", "", None])
def test_unknown_precision_is_refused(model, raws, bad):
    from phenolens.diffusion.inversion import InversionSettings

    with pytest.raises(ValueError, match="render precision"):
        model.translate(raws[:1], "ctrl", ["dose1"], inversion=InversionSettings(method="ddim", steps=2),
                        render_precision=bad)
    with pytest.raises(ValueError, match="render precision"):
        model.sweep_skip(raws[:1], "ctrl", "dose1", [1], inversion=InversionSettings(method="ddim", steps=2),
                         render_precision=bad)


def test_at_precision_leaves_fp32_alone_and_upcasts_bf16():
    from phenolens.methods.core import at_precision

    seen = {}

    def net(x, t, cond):
        seen["dtype"] = torch.nn.functional.linear(x, torch.eye(x.shape[-1])).dtype
        return torch.nn.functional.linear(x, torch.eye(x.shape[-1]))

    x = torch.randn(2, 3)
    assert at_precision(net, "fp32", "cpu") is net
    out = at_precision(net, "bf16", "cpu")(x, torch.zeros(2, dtype=torch.long), {})
    assert seen["dtype"] == torch.bfloat16 and out.dtype == torch.float32
    assert torch.allclose(out, x, atol=2e-2) and not torch.equal(out, x)


def test_translate_render_precision_bf16_keeps_the_reconstruction_and_moves_the_translation(tiny_model, blob_data,
                                                                                            tmp_path):
    """The CLI option reaches the model: bf16 leaves reconstruction files bit-identical, changes translations a little,
    and a re-run with the other precision is refused (it changes the numbers)."""
    from conftest import run_cli
    from phenolens.data.io import read_image

    src = blob_data / "ctrl"
    args = ["--to", "dose2", "--steps", "3", "--inversion", "ddim", "--guidance-scale", "1"]
    outs = {}
    for precision in ("fp32", "bf16"):
        outs[precision] = tmp_path / precision
        code, _, err = run_cli("translate", tiny_model, src, outs[precision], *args, "--render-precision", precision)
        assert code == 0, err
    recon = sorted(outs["fp32"].glob("ctrl/*/reconstruction.tif"))
    moved = sorted(outs["fp32"].glob("ctrl/*/to-dose2.tif"))
    assert recon and len(recon) == len(moved)
    for p in recon:
        assert np.array_equal(read_image(p)[0], read_image(outs["bf16"] / p.relative_to(outs["fp32"]))[0])
    assert any(not np.array_equal(read_image(p)[0], read_image(outs["bf16"] / p.relative_to(outs["fp32"]))[0])
               for p in moved)
    code, _, err = run_cli("translate", tiny_model, src, outs["bf16"], *args, "--render-precision", "fp32")
    assert code == 2 and "render_precision" in err
