"""DIFFusion's embedded default (issue 13, items 1 and 3): a UNet conditioned on its own L2-normalised image
embedding, class means over --mean-images per condition (eq. 7), the edit ĉ = c + ω·Δc (eq. 6) through the
core's EF-DDPM inversion and `translate`."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from phenolens.cli import main
from phenolens.data.io import read_image


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from phenolens.data.simulate import simulate

    return simulate(tmp_path_factory.mktemp("dfn") / "sim", conditions=["control", "mid", "high"], per_condition=6,
                    size=32, seed=5, progress=False)


@pytest.fixture(scope="module")
def model(sim):
    out = sim.parent / "dfn"
    assert main(["train", str(sim), str(out), "--method", "diffusion", "--channels", "0,1,3", "--steps", "12",
                 "--batch-size", "4", "--code-dim", "8", "--checkpoint-every", "6"]) == 0
    return out


def test_trains_an_embedded_model_without_a_classifier(model, sim):
    from phenolens.methods.diffusion_embedding import DIFFusion
    from phenolens.methods.registry import load_model_for

    info = json.loads((model / "phenolens.json").read_text())
    assert info["method"] == "diffusion" and info["semantic"]["unit_norm"] and info["semantic"]["lambda_cls"] == 0
    assert not (model / "classifier").exists()
    m = load_model_for(model)
    assert isinstance(m, DIFFusion) and m.conditions == ["control", "mid", "high"] and m.classifier is None
    x0, _ = m.to_model_space([read_image(sim / "mid" / f"mid_{i:05d}.tif", channels=[0, 1, 3])[0] for i in range(3)])
    c = m.embedding(x0)
    assert c.shape == (3, 8)
    np.testing.assert_allclose(c.norm(dim=-1).detach().numpy(), 1.0, rtol=1e-5)  # "normalize ... with L2 norm"


def test_edit_is_eq6_with_eq7_means(model, sim):
    from phenolens.methods.diffusion_embedding import DIFFusion, TowardCondition

    m = DIFFusion.from_pretrained(model)
    raws = {c: [(p, read_image(p, channels=[0, 1, 3])[0]) for p in sorted((sim / c).glob("*.tif"))[:4]]
            for c in m.conditions}
    means = m.mean_embeddings(raws)
    for c, items in raws.items():  # eq. 7: the mean of the unit-length embeddings of each condition
        x0, _ = m.to_model_space([r for _, r in items])
        np.testing.assert_allclose(means.means[c].numpy(), m.embedding(x0).mean(0).detach().numpy(), atol=1e-6)
    m.use_class_means(means, omega=1.5)
    edit = m.parse_edit("high")
    assert isinstance(edit, TowardCondition) and edit.label == "to=high,omega=1.5"
    assert m.parse_edit("to=mid,omega=-1").omega == -1.0  # any pair, either way along Δc
    x0, _ = m.to_model_space([r for _, r in raws["control"][:2]])
    cond = m.edited(m.condition(x0, ["control"] * 2), edit, ["control", "mid"], x0)
    c = m.embedding(x0)
    want = torch.stack([c[0] + 1.5 * (means.means["high"] - means.means["control"]),
                        c[1] + 1.5 * (means.means["high"] - means.means["mid"])])
    np.testing.assert_allclose(cond["class_labels"].detach().numpy(), m.encoder.embed(want).detach().numpy(), atol=1e-6)
    assert edit.is_identity("high") and TowardCondition("high", 0.0).is_identity("control")


def test_translate_ef_ddpm_writes_edits_and_class_means(model, sim, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = ["translate", str(model), str(sim / "control"), str(out), "--from", "control", "--to", "high",
            "--inversion", "ef-ddpm", "--steps", "10", "--skip", "3", "--mean-images", "3", "--mean-data", str(sim)]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "index.csv")))
    assert {r["edit"] for r in rows} == {"to=high,omega=2"} and len(rows) == 6
    assert max(float(r["recon_mse"]) for r in rows) < 1e-8  # EF-DDPM: exact under the image's own embedding
    assert min(float(r["change_mse"]) for r in rows) > 1e-6  # the edit changed the images
    used = json.loads((out / "class_means.json").read_text())
    assert sorted(used) == ["control", "high", "mid"] and all(len(v) == 3 for v in used.values())
    saved = load_file(out / "class_means.safetensors")
    assert saved["high"].shape == (8,) and 0 < float(saved["high"].norm()) <= 1 + 1e-6
    stamp = (out / "class_means.safetensors").stat().st_mtime_ns
    assert main(args) == 0  # a re-run resumes: the means are read back, not computed again
    assert (out / "class_means.safetensors").stat().st_mtime_ns == stamp
    code, _, err = run_cli(*args[:-4], "--mean-images", "4", "--mean-data", str(sim))
    assert code == 2 and "other settings (mean_images)" in err, err


def test_omega_zero_is_the_reconstruction(model, sim, tmp_path):
    from phenolens.methods.diffusion_embedding import DIFFusion

    m = DIFFusion.from_pretrained(model)
    raws = {c: [(p, read_image(p, channels=[0, 1, 3])[0]) for p in sorted((sim / c).glob("*.tif"))[:2]]
            for c in m.conditions}
    m.use_class_means(m.mean_embeddings(raws), omega=0)
    images = [r for _, r in raws["control"]]
    t = m.translate(images, "control", ["high"])
    for a, b in zip(t.translations["high"], t.reconstructions):  # keyed as given; ω 0 renders nothing new
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("extra, message", [
    (["--mean-images", "0"], "--mean-images 0: must be at least 1"),
    (["--omega", "nan"], "--omega nan: must be a finite number"),
    (["--edit", "to=high,omega=1", "--omega", "2"], "one ω per run"),
])
def test_bad_diffusion_options(model, sim, tmp_path, extra, message):
    code, _, err = run_cli("translate", model, sim / "control", tmp_path / "r", "--from", "control", "--to", "high",
                           "--steps", "4", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_edit_names_omega_as_index_csv_writes_it(model, sim, tmp_path):
    out = tmp_path / "e"
    assert main(["translate", str(model), str(sim / "control"), str(out), "--from", "control", "--edit",
                 "to=mid,omega=1.5", "--steps", "4", "--mean-images", "2", "--mean-data", str(sim)]) == 0
    rows = list(csv.DictReader(open(out / "index.csv")))
    assert {r["edit"] for r in rows} == {"to=mid,omega=1.5"} and json.loads((out / "run.json").read_text())["omega"] == 1.5


def test_diffusion_options_refused_for_other_methods(tiny_model, blob_data, tmp_path):
    code, _, err = run_cli("translate", tiny_model, blob_data, tmp_path / "r", "--omega", "2")
    assert code == 2 and "are for a DIFFusion model" in err and len(err.strip().splitlines()) == 1, err


def test_lambda_cls_refused_for_diffusion(sim, tmp_path):
    code, _, err = run_cli("train", sim, tmp_path / "m", "--method", "diffusion", "--lambda-cls", "0.5")
    assert code == 2 and "DIFFusion's model has none" in err, err


def test_minimal_edit_keeps_the_highest_t_skip_the_judges_flip(model, sim, tmp_path):
    """--minimal-edit (DIFFusion §4.2): per image, the first edit from the highest T_skip down that the oracle
    ensemble assigns to the target (else the strongest), with the whole sweep in sweep.csv; a re-run resumes."""
    from phenolens.run.minimal_edit import sweep_skips

    out = tmp_path / "min"
    args = ["translate", str(model), str(sim / "control"), str(out), "--from", "control", "--to", "high",
            "--inversion", "ef-ddpm", "--steps", "10", "--minimal-edit", "--strengths", "4", "--judge-steps", "20",
            "--judge-data", str(sim), "--mean-data", str(sim), "--mean-images", "3"]
    assert main(args) == 0
    skips = sweep_skips(10, 4)
    assert skips == [9, 6, 3, 0]
    rows = [r for r in csv.DictReader(open(out / "index.csv")) if r["kind"] == "translation"]
    sweep = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 6 and len(sweep) == 6 * len(skips)
    for r in rows:
        mine = {int(s["t_skip"]): s for s in sweep if s["source_path"] == r["source_path"]}
        assert sorted(mine, reverse=True) == skips
        flips = [k for k in skips if mine[k]["flipped"] == "1"]
        want = flips[0] if flips else skips[-1]
        assert int(r["t_skip"]) == want and r["flipped"] == ("1" if flips else "0")
        assert r["change_mse"] == mine[want]["change_mse"] and r["flip_probability"] == mine[want]["flip_probability"]
        assert 0 < float(r["oracle_feature_distance"]) and -1 <= float(r["ssim"]) <= 1
    before = (out / "sweep.csv").read_text()
    assert main(args) == 0  # resumes: nothing to do, the sweep kept
    assert (out / "sweep.csv").read_text() == before


def test_minimal_edit_refuses_skip_and_workers(model, sim, tmp_path):
    base = ["translate", model, sim / "control", tmp_path / "m", "--from", "control", "--to", "high", "--steps", "4",
            "--minimal-edit"]
    code, _, err = run_cli(*base, "--skip", "2")
    assert code == 2 and "tries its own T_skip" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(*base, "--strengths", "0")
    assert code == 2 and "--strengths 0: must be at least 1" in err, err


def test_a_classifier_s_scores_join_the_embedding(sim, tmp_path):
    """--method diffusion --classifier: the embedding is [code, the classifier's probabilities], length 1."""
    from phenolens.methods.registry import load_model_for

    clf = tmp_path / "clf"
    assert main(["classifier", "train", str(sim), str(clf), "--steps", "5", "--channels", "0,1,3"]) == 0
    out = tmp_path / "dfn-c"
    assert main(["train", str(sim), str(out), "--method", "diffusion", "--classifier", str(clf), "--channels", "0,1,3",
                 "--steps", "2", "--batch-size", "4", "--code-dim", "8"]) == 0
    m = load_model_for(out)
    assert m.classifier is not None and (out / "classifier").is_dir() and m.encoder.sem_dim == 8 + 3
    images = [read_image(sim / "mid" / f"mid_{i:05d}.tif", channels=[0, 1, 3])[0] for i in range(2)]
    x0, _ = m.to_model_space(images)
    c = m.embedding(x0).detach()
    np.testing.assert_allclose(c.norm(dim=-1).numpy(), 1.0, rtol=1e-5)
    raw = torch.cat([m.encoder.encode(x0), torch.from_numpy(m.classifier.predict_proba(m.classifier.prepare(images)))
                     .float()], dim=-1).detach()
    np.testing.assert_allclose(c.numpy(), torch.nn.functional.normalize(raw, dim=-1).numpy(), atol=5e-3)


def test_guided_condition_is_classifier_free_guidance():
    from phenolens.diffusion.conditions import guidance_aware, guided_condition, take

    def net(x, t, cond):  # a toy network: its output is its condition, broadcast
        return x * 0 + cond["c"].view(-1, 1)

    fn = guidance_aware(net)
    x, t = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    c, u = {"c": torch.tensor([1.0, 2.0, 3.0])}, {"c": torch.tensor([0.5, 0.5, 0.5])}
    g = guided_condition(c, u, 4.0)
    want = 0.5 + 4.0 * (torch.tensor([1.0, 2.0, 3.0]) - 0.5)
    np.testing.assert_allclose(fn(x, t, g)[:, 0].numpy(), want.numpy())
    np.testing.assert_allclose(fn(x[:2], t[:2], take(g, [2, 0]))[:, 0].numpy(), want[[2, 0]].numpy())
    np.testing.assert_allclose(fn(x, t, c)[:, 0].numpy(), c["c"].numpy())  # unguided conditions pass through


def test_guidance_in_inversion_and_generation_keeps_the_reconstruction_exact(model, sim):
    """Trained with condition dropout (the default), a DIFFusion model guides inversion and rendering alike
    (paper App. B.3): EF-DDPM still reconstructs exactly, and guidance scales the edit up."""
    from phenolens.diffusion.inversion import InversionSettings
    from phenolens.methods.diffusion_embedding import DIFFusion

    assert json.loads((model / "phenolens.json").read_text())["cond_dropout"] == 0.1
    m = DIFFusion.from_pretrained(model)
    raws = {c: [(p, read_image(p, channels=[0, 1, 3])[0]) for p in sorted((sim / c).glob("*.tif"))[:3]]
            for c in m.conditions}
    m.use_class_means(m.mean_embeddings(raws), omega=2)
    images = [r for _, r in raws["control"]]
    inv = InversionSettings(method="ef-ddpm", steps=8)
    change = {}
    for scale in (1.0, 4.0):
        gens = [torch.Generator().manual_seed(i) for i in range(len(images))]
        t = m.translate(images, "control", ["high"], inversion=inv, guidance_scale=scale, generator=gens)
        assert t.recon_mse.max() < 1e-8, scale
        change[scale] = float(t.change_mse["high"].mean())
        if scale != 1:  # inversion, reconstruction and the edit: two network calls per step each
            assert (t.render_forwards == 4 * 8).all() and (t.inversion_forwards == 2 * 8).all()
    assert change[4.0] > change[1.0] > 0


def test_without_condition_dropout_guidance_is_refused(sim, tmp_path):
    out = tmp_path / "nodrop"
    assert main(["train", str(sim), str(out), "--method", "diffusion", "--channels", "0,1,3", "--steps", "2",
                 "--batch-size", "2", "--code-dim", "4", "--cond-dropout", "0"]) == 0
    code, _, err = run_cli("translate", str(out), str(sim / "control"), str(tmp_path / "run"), "--from", "control",
                           "--to", "high", "--inversion", "ef-ddpm", "--steps", "4", "--guidance-scale", "3",
                           "--mean-images", "2", "--mean-data", str(sim))
    assert code == 2 and "without condition dropout" in err and err.count("\n") <= 2, err


def test_mean_data_without_the_target_is_refused_before_translating(model, sim, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli("translate", str(model), str(sim / "control"), str(out), "--from", "control", "--to", "high",
                           "--inversion", "ef-ddpm", "--steps", "4", "--mean-images", "2", "--mean-data",
                           str(sim / "control"))
    assert code == 2 and "no images of high" in err and "--mean-data" in err, err
    assert not list(out.glob("*/*.tif"))  # nothing translated


def test_minimal_edit_sweeps_omega_weakest_first(model, sim, tmp_path):
    """--omega-sweep (issue 13 item 4, "and ω if asked"): the edits are ordered by ω, then by T_skip from the
    highest down; the first the judges flip is kept, its ω in index.csv's omega column."""
    out = tmp_path / "minw"
    assert main(["translate", str(model), str(sim / "control"), str(out), "--from", "control", "--to", "high",
                 "--inversion", "ef-ddpm", "--steps", "6", "--minimal-edit", "--strengths", "2", "--judge-steps", "20",
                 "--judge-data", str(sim), "--mean-data", str(sim), "--mean-images", "3",
                 "--omega-sweep", "8,0.5"]) == 0
    rows = [r for r in csv.DictReader(open(out / "index.csv")) if r["kind"] == "translation"]
    sweep = list(csv.DictReader(open(out / "sweep.csv")))
    assert {r["edit"] for r in rows} == {"to=high,omega=8"}  # the strongest tried
    assert {s["edit"] for s in sweep} == {"to=high,omega=0.5", "to=high,omega=8"} and len(sweep) == 6 * 2 * 2
    for r in rows:
        order = [s for w in ("0.5", "8") for s in sorted((s for s in sweep if s["source_path"] == r["source_path"]
                                                          and s["edit"] == f"to=high,omega={w}"),
                                                         key=lambda s: -int(s["t_skip"]))]
        flips = [s for s in order if s["flipped"] == "1"]
        want = flips[0] if flips else order[-1]
        assert (r["omega"], r["t_skip"]) == (want["edit"].split("omega=")[1], want["t_skip"])
        assert r["change_mse"] == want["change_mse"]


@pytest.mark.parametrize("extra, message", [
    (["--omega-sweep", "1,2", "--omega", "2", "--minimal-edit"], "--omega-sweep and --omega"),
    (["--omega-sweep", "1,2"], "--omega-sweep is for --minimal-edit"),
])
def test_bad_omega_sweep(model, sim, tmp_path, extra, message):
    code, _, err = run_cli("translate", str(model), str(sim / "control"), str(tmp_path / "r"), "--from", "control",
                           "--to", "high", "--inversion", "ef-ddpm", "--steps", "4", *extra)
    assert code == 2 and message in err, err
