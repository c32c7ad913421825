"""DiffEx's semantic model (issue 12, items 2-3): z_sem = [encoder(x), classifier scores] conditions the
UNet, trained with eq. 3 through the shared trainer, saved whole, and inverted exactly given z_sem."""

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

    return simulate(tmp_path_factory.mktemp("dx") / "sim", conditions=["control", "high"], per_condition=12,
                    size=32, seed=4, progress=False)


@pytest.fixture(scope="module")
def classifier(sim):
    out = sim.parent / "clf"
    assert main(["classifier", "train", str(sim), str(out), "--steps", "30", "--channels", "0,1,3"]) == 0
    return out


@pytest.fixture(scope="module")
def model(sim, classifier):
    out = sim.parent / "dx"
    assert main(["train", str(sim), str(out), "--method", "diffex", "--classifier", str(classifier), "--channels",
                 "0,1,3", "--steps", "20", "--batch-size", "4", "--code-dim", "8", "--checkpoint-every", "10"]) == 0
    return out


def test_saved_whole_and_reconstructs_exactly_given_z_sem(model, sim):
    from phenolens.methods.diffex import DiffEx
    from phenolens.methods.registry import load_model_for

    m = load_model_for(model)
    assert isinstance(m, DiffEx) and m.conditions == ["control", "high"]
    info = json.loads((model / "phenolens.json").read_text())
    assert info["method"] == "diffex" and info["semantic"]["code_dim"] == 8 and info["cond_dropout"] == 0.0
    images = [read_image(sim / "high" / f"high_{i:05d}.tif", channels=[0, 1, 3])[0] for i in range(3)]
    t = m.translate(images, "high", edits=[])
    psnr = 10 * np.log10(4 / t.recon_mse)  # [-1, 1] images: peak-to-peak 2
    assert psnr.min() > 45, psnr  # fixed-point inversion given z_sem: exact however little the model trained
    # z_sem ends with the classifier's probabilities of the image, read as the classifier reads raw files
    x0, _ = m.to_model_space(images)
    z = m.semantic_code(x0)
    assert z.shape == (3, 8 + 2)
    expected = m.classifier.predict_proba(m.classifier.prepare(images))
    # (not to 1e-6: the model's normalisation clips the brightest 0.1 % of pixels, which the classifier's keeps)
    np.testing.assert_allclose(z[:, -2:].detach().numpy(), expected, atol=5e-3)


def test_per_stain_views_give_one_classifier_axis_per_stain(sim, classifier, tmp_path):
    """--classifier-views per-stain: z_sem = [code, C(x | stain c) for each stain, C(x)], each view the
    classifier's probabilities with the other stains at 0 raw units (as `classifier evaluate --per-stain`
    reads them), and saved in phenolens.json."""
    from phenolens.methods.registry import load_model_for

    out = tmp_path / "dx-ps"
    assert main(["train", str(sim), str(out), "--method", "diffex", "--classifier", str(classifier), "--channels",
                 "0,1,3", "--steps", "4", "--batch-size", "4", "--code-dim", "8", "--classifier-views",
                 "per-stain"]) == 0
    assert json.loads((out / "phenolens.json").read_text())["semantic"]["classifier_views"] == "per-stain"
    m = load_model_for(out)
    images = [read_image(sim / "high" / f"high_{i:05d}.tif", channels=[0, 1, 3])[0] for i in range(3)]
    x0, _ = m.to_model_space(images)
    z = m.semantic_code(x0).detach().numpy()
    assert z.shape == (3, 8 + 2 * (3 + 1)) and m.encoder.sem_dim == z.shape[1]
    clf = m.classifier
    for c in range(3):
        alone = [np.where((np.arange(3) != c)[:, None, None], 0, r) for r in images]
        np.testing.assert_allclose(z[:, 8 + 2 * c:10 + 2 * c], clf.predict_proba(clf.prepare(alone)), atol=5e-3)
    np.testing.assert_allclose(z[:, -2:], clf.predict_proba(clf.prepare(images)), atol=5e-3)
    assert np.abs(z[:, 8:10] - z[:, -2:]).max() > 1e-3  # a stain alone is not the whole image


def test_kl_term_is_eq2_and_only_adds(model, sim):
    from phenolens.methods.diffex import DiffEx, SemanticDiffusion, semantic_loss

    m = DiffEx.from_pretrained(model)
    net = SemanticDiffusion(m.unet, m.encoder)
    x0, _ = m.to_model_space([read_image(sim / "control" / "control_00000.tif", channels=[0, 1, 3])[0]] * 2)
    kw = dict(classifier=m.classifier, model_norm=m.normalizer)
    plain = semantic_loss(net, m.scheduler, x0, torch.Generator().manual_seed(1), lambda_cls=0.0, **kw)
    with_kl = semantic_loss(net, m.scheduler, x0, torch.Generator().manual_seed(1), lambda_cls=1.0, **kw)
    assert with_kl.item() > plain.item()  # D_KL >= 0, and the estimate x̂0 of a barely trained model is off
    with_kl.backward()
    assert m.encoder.to_code.weight.grad is not None and m.encoder.to_code.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.classifier.model.parameters())  # frozen


def test_resume_is_exact(sim, classifier, tmp_path):
    from safetensors.torch import load_file

    args = ["--method", "diffex", "--classifier", str(classifier), "--channels", "0,1,3", "--batch-size", "4",
            "--code-dim", "8", "--lr-schedule", "constant", "--checkpoint-every", "2"]
    assert main(["train", str(sim), str(tmp_path / "a"), *args, "--steps", "4"]) == 0
    assert main(["train", str(sim), str(tmp_path / "b"), *args, "--steps", "2"]) == 0
    assert main(["train", str(sim), str(tmp_path / "b"), *args, "--steps", "4", "--resume"]) == 0
    for part in ("unet/diffusion_pytorch_model.safetensors", "encoder/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_whitened_space_steps_one_spread_and_stays_in_the_codes_span():
    """--whiten: a shift of α is α spreads of the codes (Mahalanobis length α), and never leaves their span
    (two probabilities that sum to 1 keep summing to 1)."""
    from phenolens.methods.diffex_directions import DirectionModels, code_spread

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(500, 3, generator=g)
    p = torch.sigmoid(latent[:, :1] * 2)
    z = torch.cat([latent @ torch.tensor([[1.0, 0.9, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 5.0]]), p, 1 - p], dim=1)
    models = DirectionModels(5, k=2)
    models.fit_standardization(z, whiten=True)
    assert models.mask.tolist() == [1, 1, 1, 1, 0]  # p and 1 - p: one component of no variance, left out
    zs = models.standardized(z)[:, :4]
    np.testing.assert_allclose(torch.cov(zs.T).numpy(), np.eye(4), atol=1e-4)
    assert code_spread(models.standardized(z)) == pytest.approx(2 * (499 / 500) ** 0.5, rel=1e-4)  # √(kept ones)
    moved = models.shift(z[:7], 1, 2.5)
    np.testing.assert_allclose((moved[:, 3] + moved[:, 4]).detach().numpy(), 1.0, atol=1e-5)
    cov = torch.cov(z.T.double())
    delta = (moved - z[:7]).double()
    mahalanobis = (delta @ torch.linalg.pinv(cov) * delta).sum(-1).sqrt()
    np.testing.assert_allclose(mahalanobis.detach().numpy(), 2.5, rtol=1e-3)


@pytest.mark.parametrize("extra, message", [
    ([], "--method diffex needs --classifier"),
    (["--classifier", "CLF", "--channels", "0,1,2"], "reads file channels [0, 1, 3], but training uses [0, 1, 2]"),
    (["--classifier", "CLF", "--channels", "0,1,3", "--cond-dropout", "0.1"], "--cond-dropout"),
    (["--classifier", "CLF", "--channels", "0,1,3", "--lambda-cls", "-1"], "--lambda-cls -1.0: must be 0 or more"),
    (["--classifier", "NOWHERE"], "no such classifier folder"),
])
def test_bad_options_are_one_line(sim, classifier, tmp_path, extra, message):
    extra = [str(classifier) if a == "CLF" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in extra]
    code, _, err = run_cli("train", sim, tmp_path / "m", "--method", "diffex", "--steps", "1", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_classifier_of_other_classes_is_refused(sim, classifier, tmp_path):
    from phenolens.data.simulate import simulate

    other = simulate(tmp_path / "o", conditions=["control", "treated"], per_condition=2, size=32, progress=False)
    code, _, err = run_cli("train", other, tmp_path / "m", "--method", "diffex", "--classifier", classifier,
                           "--channels", "0,1,3", "--steps", "1")
    assert code == 2 and "its classes (control, high) are not the data's conditions" in err, err
    assert not (tmp_path / "m" / "phenolens.json").exists()


def test_translate_to_a_condition_is_refused_by_a_diffex_model(model, sim, tmp_path):
    code, _, err = run_cli("translate", model, sim / "control", tmp_path / "t", "--to", "high", "--steps", "2")
    assert code == 2 and "edits along learnt directions; write direction=K,alpha=A" in err, err


# ------------------------------------------------------------------ directions (item 4)
def test_contrastive_loss_is_eq8():
    """Edits of one direction alike and of different directions apart give a lower loss than mixed ones,
    and the value matches eq. 8 written out by hand."""
    from phenolens.methods.diffex_directions import contrastive_loss

    torch.manual_seed(0)
    apart = torch.eye(3)[:, None, :].repeat(1, 4, 1) + 0.01 * torch.randn(3, 4, 3)
    mixed = torch.randn(3, 4, 3)
    assert contrastive_loss(apart, 0.5) < contrastive_loss(mixed, 0.5)
    f = torch.nn.functional.normalize(mixed, dim=-1)
    by_hand = []
    for k in range(3):
        for i in range(4):
            num = sum(torch.exp(f[k, i] @ f[k, j] / 0.5) for j in range(4) if j != i)
            den = sum(torch.exp(f[k, i] @ f[m, j] / 0.5) for j in range(4) for m in range(3) if m != k)
            by_hand.append(-torch.log(num / den))
    assert contrastive_loss(mixed, 0.5).item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-5)


def test_covariance_penalty_is_zero_only_for_uncorrelated_directions():
    from phenolens.methods.diffex_directions import covariance_penalty

    same = torch.randn(1, 8, 5).repeat(2, 1, 1)
    assert covariance_penalty(same) > 0.1
    orthogonal = torch.zeros(2, 1, 4)
    orthogonal[0, 0, :2] = torch.tensor([1.0, -1.0])
    orthogonal[1, 0, 2:] = torch.tensor([1.0, -1.0])
    assert covariance_penalty(orthogonal).item() == pytest.approx(0.0, abs=1e-12)


def test_directions_learn_resume_exactly_and_shift_by_alpha(model, sim, tmp_path):
    from phenolens.data.records import discover
    from phenolens.methods.diffex_directions import code_spread, load_directions
    from phenolens.run.directions import encode_codes, load_diffex

    args = ["-k", "3", "--batch-size", "8"]
    assert main(["directions", str(model), str(sim), str(tmp_path / "a"), *args, "--steps", "40"]) == 0
    assert main(["directions", str(model), str(sim), str(tmp_path / "b"), *args, "--steps", "20"]) == 0
    assert main(["directions", str(model), str(sim), str(tmp_path / "b"), *args, "--steps", "40"]) == 0  # extends
    (a, info_a), (b, info_b) = load_directions(tmp_path / "a"), load_directions(tmp_path / "b")
    assert info_b.steps_done == 40 and info_a.alpha == info_b.alpha > 0
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    z = torch.randn(5, info_a.dim)
    moved = a.shift(z, 1, 2.5) - z
    # eq. 4 in the standardised space z̃ = (z - mean) / std of the training codes: |shift / std| = α
    np.testing.assert_allclose((moved / a.scale).norm(dim=-1).detach().numpy(), 2.5, rtol=1e-5)
    codes = encode_codes(load_diffex(model), discover(sim), progress=False)
    np.testing.assert_allclose(a.scale.numpy(), codes.std(0).numpy(), rtol=1e-4)
    np.testing.assert_allclose(a.center.numpy(), codes.mean(0).numpy(), atol=1e-5)
    assert info_a.alpha == pytest.approx(code_spread(a.standardized(codes)), rel=1e-5)  # default α: their spread
    # --no-standardize: eq. 4 on z_sem as it is
    assert main(["directions", str(model), str(sim), str(tmp_path / "raw"), *args, "--steps", "5",
                 "--no-standardize"]) == 0
    raw, info_raw = load_directions(tmp_path / "raw")
    assert torch.equal(raw.scale, torch.ones(info_raw.dim)) and info_raw.alpha == pytest.approx(code_spread(codes))
    np.testing.assert_allclose((raw.shift(z, 1, 2.5) - z).norm(dim=-1).detach().numpy(), 2.5, rtol=1e-5)
    code, _, err = run_cli("directions", model, sim, tmp_path / "raw", *args, "--steps", "10")
    assert code == 2 and "standardize False -> True" in err, err
    # --whiten: the codes' principal components at unit spread; their probabilities' sum is no component
    assert main(["directions", str(model), str(sim), str(tmp_path / "w"), *args, "--steps", "5", "--whiten"]) == 0
    white, info_w = load_directions(tmp_path / "w")
    assert info_w.settings["whiten"] and 0 < white.mask.sum() < info_w.dim
    np.testing.assert_allclose(torch.cov(white.standardized(codes).T)[white.mask > 0][:, white.mask > 0].numpy(),
                               np.eye(int(white.mask.sum())), atol=1e-3)


@pytest.mark.parametrize("extra, message", [
    (["-k", "1"], "at least 2 directions"),
    (["--alpha", "0"], "--alpha 0.0: must be a number above 0"),
    (["--tau", "0"], "--tau 0.0: must be above 0"),
    (["--whiten", "--no-standardize"], "--whiten with --no-standardize"),
])
def test_directions_bad_options(model, sim, tmp_path, extra, message):
    code, _, err = run_cli("directions", model, sim, tmp_path / "d", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_directions_need_a_diffex_model_and_refuse_other_settings(model, sim, tmp_path, tiny_model):
    code, _, err = run_cli("directions", tiny_model, sim, tmp_path / "d")
    assert code == 2 and "directions live in the semantic space of a DiffEx model" in err, err
    assert main(["directions", str(model), str(sim), str(tmp_path / "d"), "-k", "2", "--steps", "2"]) == 0
    code, _, err = run_cli("directions", model, sim, tmp_path / "d", "-k", "3", "--steps", "2")
    assert code == 2 and "k 2 -> 3" in err and "--overwrite" in err, err


# ------------------------------------------------------------------ ranking and explain (items 5-6)
def test_rank_directions_is_algorithm_1():
    from phenolens.methods.diffex_directions import rank_directions

    change = np.zeros((4, 3, 2))
    change[:2, 1, 1] = 0.6          # direction 1 at -α raises p(target) on images 0 and 1
    change[2:, 0, 0] = 0.3          # direction 0 at +α on images 2 and 3
    change[:, 2, 0] = 0.2           # direction 2 a little on every image: a mean of 0.2 < 0.3
    ranked = rank_directions(change, threshold=0.1)
    assert [(d.direction, d.sign) for d in ranked][:2] == [(1, -1), (0, 1)]
    assert ranked[0].explained == [0, 1] and ranked[0].mean_change == pytest.approx(0.3)
    assert ranked[1].explained == [2, 3]  # images 0, 1 were explained already: the mean is over 2 and 3
    assert len(ranked) == 2  # no image left for direction 2
    assert rank_directions(change, threshold=0.5) == []  # no mean passes 0.5
    assert len(rank_directions(change, threshold=0.1, max_directions=1)) == 1
    # --keep-explained: every direction judged on all four images, so direction 2 (mean 0.2) comes second
    every = rank_directions(change, threshold=0.1, remove_explained=False)
    assert [(d.direction, d.sign) for d in every] == [(1, -1), (2, 1), (0, 1)]
    assert [d.mean_change for d in every] == pytest.approx([0.3, 0.2, 0.15])


def test_explain_end_to_end_and_its_bad_input(model, sim, tmp_path):
    import csv

    assert main(["directions", str(model), str(sim), str(tmp_path / "d"), "-k", "2", "--steps", "5"]) == 0
    code, out, err = run_cli("explain", model, tmp_path / "d", sim, tmp_path / "e", "--n-samples", "3", "--steps", "4",
                             "--threshold", "0", "--strip-images", "2", "--strip-points", "3")
    assert code == 0, err
    with open(tmp_path / "e" / "changes.csv", newline="") as fh:
        changes = list(csv.DictReader(fh))
    assert len(changes) == 3 * 2 * 2 and {r["condition"] for r in changes} == {"control"}  # not the target
    for r in changes:
        assert float(r["change"]) == pytest.approx(float(r["p_after"]) - float(r["p_before"]), abs=2e-4)
    with open(tmp_path / "e" / "ranking.csv", newline="") as fh:
        ranking = list(csv.DictReader(fh))
    for r in ranking:  # each kept direction's mean change is the mean of its rows over the images it was chosen on
        png = tmp_path / "e" / "strips" / f"rank-{r['rank']}-direction-{r['direction']}.png"
        from PIL import Image

        assert Image.open(png).size[0] > 7 * 32  # source, reconstruction, 3 alphas, 3 channel diffs
    assert "wrote" in out
    # the report of the explanation's run opens with the ranked directions and their strips
    code, _, err = run_cli("report", tmp_path / "e" / "run")
    assert code == 0, err
    page = (tmp_path / "e" / "run" / "report.html").read_text()
    assert "Directions (DiffEx)" in page
    assert all(r["edit"] in page for r in ranking) and page.count("alt='strip of") == len(ranking)
    # bad input: one clear line each
    for extra, message in ((["--alpha", "0"], "α = 0 moves nothing"), (["--target", "treated"], "'treated' is not a class"),
                           (["--skip", "50"], "--skip 50: must be from 0 to below --steps (50)"),
                           ([], "holds an explanation already")):
        code, _, err = run_cli("explain", model, tmp_path / "d", sim, tmp_path / "e", *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli("explain", model, tmp_path / "elsewhere", sim, tmp_path / "e2")
    assert code == 2 and "not a directions folder" in err, err
    # --skip reaches the run's record (what it does: test_explain_renders_from_a_later_step_or_with_ef_ddpm)
    code, _, err = run_cli("explain", model, tmp_path / "d", sim, tmp_path / "e3", "--n-samples", "3", "--steps", "4",
                           "--threshold", "0", "--keep-explained", "--skip", "3", "--strip-images", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "e3" / "run" / "run.json").read_text())["skip"] == 3


def test_explain_renders_from_a_later_step_or_with_ef_ddpm(model, sim, tmp_path):
    """explain --skip K renders each direction over the last steps-K steps only, so nearer the source;
    --inversion ef-ddpm keeps each image's noise maps (exact reconstructions, the same draw again)."""
    from phenolens.data.records import discover
    from phenolens.methods.diffex import DirectionEdit
    from phenolens.run.explain import ExplainSettings, _render, load_diffex

    assert main(["directions", str(model), str(sim), str(tmp_path / "d"), "-k", "2", "--steps", "5"]) == 0
    m = load_diffex(model, None)
    m.use_directions(tmp_path / "d")
    records = [r for r in discover(sim) if r.condition == "control"][:2]
    raws = [read_image(r.path, channels=[0, 1, 3])[0] for r in records]
    edits = [DirectionEdit(d, 3.0) for d in range(2)]
    mse = {skip: _render(m, records, raws, edits, ExplainSettings(steps=4, skip=skip), False)[2] for skip in (0, 3)}
    for e in edits:
        assert np.mean(mse[3][e.label]) < np.mean(mse[0][e.label])
    ef = [_render(m, records, raws, edits, ExplainSettings(steps=4, inversion="ef-ddpm", seed=1), False) for _ in "ab"]
    assert max(ef[0][2]["reconstruction"]) < 1e-8
    np.testing.assert_array_equal(ef[0][1][edits[0].label][0], ef[1][1][edits[0].label][0])


def test_directions_of_another_model_are_refused(model, sim, classifier, tmp_path):
    assert main(["train", str(sim), str(tmp_path / "other"), "--method", "diffex", "--classifier", str(classifier),
                 "--channels", "0,1,3", "--steps", "1", "--batch-size", "2", "--code-dim", "8", "--seed", "5"]) == 0
    assert main(["directions", str(tmp_path / "other"), str(sim), str(tmp_path / "d"), "-k", "2", "--steps", "2"]) == 0
    code, _, err = run_cli("explain", model, tmp_path / "d", sim, tmp_path / "e")
    assert code == 2 and "were learnt in the semantic space of another model" in err, err


def test_resume_with_another_classifier_is_refused(sim, classifier, tmp_path):
    other = tmp_path / "clf2"
    assert main(["classifier", "train", str(sim), str(other), "--steps", "5", "--channels", "0,1,3", "--seed", "3"]) == 0
    args = ["--method", "diffex", "--channels", "0,1,3", "--batch-size", "2", "--code-dim", "4", "--lr-schedule",
            "constant", "--checkpoint-every", "1"]
    assert main(["train", str(sim), str(tmp_path / "m"), *args, "--classifier", str(classifier), "--steps", "1"]) == 0
    code, _, err = run_cli("train", sim, tmp_path / "m", *args, "--classifier", other, "--steps", "2", "--resume")
    assert code == 2 and "does not match this run" in err and "classifier" in err, err
