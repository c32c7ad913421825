"""Image metrics (MSE/PSNR/SSIM, FID, KID, feature extractors) and the oracle ensemble.

FID is checked against the closed form for Gaussians whose sample statistics are set exactly;
KID against a brute-force evaluation of the unbiased MMD² estimator; the oracles on an easy
synthetic task (bright vs dim blob) they must learn in a few dozen steps.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from phenolens.errors import PhenolensError
from phenolens.measure.image_metrics import (ClassifierFeatures, FeatureExtractor, InceptionFeatures, ProfileFeatures,
                                             cycle_loss, distribution_metrics, frechet_distance,
                                             kernel_inception_distance, mse, psnr, ssim)
from phenolens.measure.oracles import ORACLE_SHAPES, OracleEnsemble, build_oracle


def exact_gaussian(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n samples whose sample mean and (ddof=1) covariance are exactly `mean` and `cov`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: sample cov = I
    return z @ np.linalg.cholesky(cov).T + mean


# --- per-image metrics ---------------------------------------------------------------------------

def test_psnr_ssim_identical_and_ordered():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(0, 0.4, (3, 32, 32)), -1, 1)
    assert psnr(img, img) == np.inf
    assert ssim(img, img) == pytest.approx(1.0)
    assert mse(img, img) == 0.0
    slight = np.clip(img + rng.normal(0, 0.05, img.shape), -1, 1)
    strong = np.clip(img + rng.normal(0, 0.3, img.shape), -1, 1)
    assert psnr(img, slight) > psnr(img, strong) > 0
    assert 1.0 > ssim(img, slight) > ssim(img, strong)
    assert mse(img, slight) < mse(img, strong)
    # PSNR with the [-1, 1] range: 10·log10(2² / MSE)
    assert psnr(img, strong) == pytest.approx(10 * np.log10(4 / mse(img, strong)))
    # batches give one value per image
    batch_a, batch_b = np.stack([img, img]), np.stack([img, strong])
    assert psnr(batch_a, batch_b).shape == (2,) and psnr(batch_a, batch_b)[0] == np.inf
    assert ssim(batch_a, batch_b)[1] == pytest.approx(ssim(img, strong))
    assert cycle_loss(batch_a, batch_b) == pytest.approx(mse(img, strong) / 2)


def test_ssim_small_images_and_errors():
    rng = np.random.default_rng(1)
    for side in (3, 4, 5, 6, 7):
        img = rng.uniform(-1, 1, (2, side, side))
        assert ssim(img, img) == pytest.approx(1.0)
        assert ssim(img, rng.uniform(-1, 1, img.shape)) < 0.5
    with pytest.raises(ValueError, match="3×3"):
        ssim(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="shape"):
        mse(np.zeros((1, 4, 4)), np.zeros((1, 5, 5)))


# --- FID / KID -------------------------------------------------------------------------------------

def test_frechet_distance_matches_closed_form():
    d = 6
    rng = np.random.default_rng(0)
    a_mat = rng.normal(size=(d, d))
    cov = a_mat @ a_mat.T / d + 0.5 * np.eye(d)
    mu_a, mu_b = np.zeros(d), rng.normal(size=d)
    a = exact_gaussian(500, mu_a, cov, seed=1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # equal covariances: FID = ||μa − μb||²
    for scale in (0.5, 1.0, 2.0):
        b = exact_gaussian(400, scale * mu_b, cov, seed=2)
        assert frechet_distance(a, b) == pytest.approx(scale ** 2 * mu_b @ mu_b, rel=1e-6)
    # diagonal (commuting) covariances: the trace term is Σ (√σa − √σb)²
    var_a, var_b = rng.uniform(0.2, 2, d), rng.uniform(0.2, 2, d)
    a = exact_gaussian(300, mu_a, np.diag(var_a), seed=3)
    b = exact_gaussian(300, mu_b, np.diag(var_b), seed=4)
    expected = mu_b @ mu_b + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_singular_and_small():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(12, 64)) + 1.0  # fewer samples than dimensions
    fid = frechet_distance(a, b)
    assert np.isfinite(fid) and fid > 0
    assert frechet_distance(rng.normal(size=(5, 1)), rng.normal(size=(5, 1)) + 3) > 4  # one dimension
    with pytest.raises(PhenolensError, match="at least 2"):
        frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(5, 4)))
    with pytest.raises(ValueError, match="dimension"):
        frechet_distance(rng.normal(size=(5, 4)), rng.normal(size=(5, 3)))


def test_kid_unbiased_estimator_by_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 0.5
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kernel_inception_distance(x, y, subsets=3)  # full-size subsets: every subset is the set
    assert mean == pytest.approx(xx + yy - 2 * xy) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_vs_shifted_distribution():
    rng = np.random.default_rng(0)
    d = 16
    a, b = rng.normal(size=(400, d)), rng.normal(size=(400, d))
    same_mean, same_std = kernel_inception_distance(a, b, subsets=50, subset_size=200)
    shifted_mean, shifted_std = kernel_inception_distance(a, b + 0.5, subsets=50, subset_size=200)
    assert abs(same_mean) < 0.01
    assert shifted_mean > 0.1 and shifted_mean > 20 * abs(same_mean) and shifted_mean > 5 * shifted_std
    metrics = distribution_metrics(a, b + 0.5, kid_subsets=10)
    assert set(metrics) == {"fid", "kid_mean", "kid_std"}
    assert metrics["fid"] == pytest.approx(frechet_distance(a, b + 0.5))
    assert metrics["fid"] > frechet_distance(a, b)


def test_profile_features_standardise_by_reference():
    rng = np.random.default_rng(0)
    scales = np.array([1.0, 1e3, 1e-2, 5.0])  # CellProfiler-like mixed units
    real = rng.normal(size=(200, 4)) * scales + 10
    real[:, 3] = 7.0  # a constant feature
    gen = real.copy()
    gen[:, 2] += 0.5 * real[:, 2].std()  # shift of half a std in a tiny-unit feature
    prof = ProfileFeatures(real)
    np.testing.assert_allclose(prof.reference[:, :3].mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(prof.reference[:, :3].std(0), 1, atol=1e-9)
    assert frechet_distance(prof.reference, prof(real)) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(prof.reference, prof(gen)) == pytest.approx(0.25, rel=1e-3)  # (0.5 std)²
    bad = real.copy()
    bad[0, 1] = np.nan
    with pytest.raises(PhenolensError, match="NaN"):
        prof(bad)


def test_inception_features_needs_optional_package():
    if importlib.util.find_spec("pytorch_fid") is not None:
        pytest.skip("pytorch-fid is installed here")
    with pytest.raises(PhenolensError, match="pip install"):
        InceptionFeatures()


# --- oracles -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ORACLE_SHAPES)
def test_oracle_shapes_build_and_run(shape):
    torch.manual_seed(0)
    for channels, size in ((4, 48), (3, 32)):
        model = build_oracle(shape, channels, 3, size).eval()
        x = torch.rand(2, channels, size, size) * 2 - 1
        with torch.no_grad():
            logits = model(pixel_values=x).logits
            extractor = ClassifierFeatures(model)
            feats = extractor(x)
            # the features are what the classification head reads
            head = model.classifier(torch.from_numpy(feats))
        assert logits.shape == (2, 3) and torch.isfinite(logits).all()
        assert isinstance(extractor, FeatureExtractor)
        assert feats.ndim == 2 and len(feats) == 2
        torch.testing.assert_close(head, logits, atol=1e-5, rtol=1e-4)


def blob_images(n: int, size: int = 32, channels: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1: a bright blob; class 0: a dim one; random position and noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.arange(n) % 2
    images = []
    for label in labels:
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        r = size * rng.uniform(0.12, 0.18)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) * (1.4 if label else 0.7)
        images.append(np.stack([-0.8 + blob + rng.normal(0, 0.1, blob.shape) for _ in range(channels)]))
    return torch.tensor(np.clip(images, -1, 1), dtype=torch.float32), torch.tensor(labels)


def test_oracle_ensemble_learns_easy_task():
    x, y = blob_images(160, seed=0)
    x_test, y_test = blob_images(80, seed=1)
    ens = OracleEnsemble.train(x, y, 2, steps=40, batch_size=16, seed=0)
    assert list(ens.members) == list(ORACLE_SHAPES)
    acc = ens.accuracy(x_test, y_test)
    assert set(acc) == {*ORACLE_SHAPES, "ensemble"}
    assert acc["ensemble"] > 0.9, acc
    assert min(acc.values()) > 0.8, acc  # every shape learns (and survives eval-mode BatchNorm)
    proba = ens.predict_proba(x_test)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    assert ens.success_ratio(x_test[y_test == 1], 1) > 0.9
    assert ens.success_ratio(x_test[y_test == 0], 1) < 0.1
    feats = ens.features(x_test)
    assert feats.shape == (80, 128)  # the ResNet's pooled width
    assert frechet_distance(feats[y_test.numpy() == 1], feats[y_test.numpy() == 0]) > frechet_distance(
        feats[:40][y_test[:40].numpy() == 1], feats[40:][y_test[40:].numpy() == 1])
    with pytest.raises(ValueError, match="channel"):
        ens.predict(torch.zeros(1, 3, 32, 32))


def test_ensemble_vote_breaks_ties_by_mean_probability():
    ens = OracleEnsemble(members={}, n_classes=3)
    member_proba = {  # two votes split 1:1 between classes 0 and 2, class 2 more probable on average
        "a": np.array([[0.5, 0.2, 0.3], [0.1, 0.8, 0.1]]),
        "b": np.array([[0.1, 0.0, 0.9], [0.1, 0.8, 0.1]]),
    }
    np.testing.assert_array_equal(ens._vote(member_proba), [2, 1])
    member_proba["c"] = np.array([[0.6, 0.0, 0.4], [0.0, 0.1, 0.9]])  # now class 0 wins 2:1
    np.testing.assert_array_equal(ens._vote(member_proba), [0, 1])
