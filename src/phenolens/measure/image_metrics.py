"""Image metrics for translations: per-image fidelity, distribution distances, cycle consistency.

Per-image metrics (`mse`, `psnr`, `ssim`) compare an image with a reference of the same cell
(e.g. a reconstruction); distribution metrics (`frechet_distance`, `kernel_inception_distance`)
compare *sets* of images through features, as PhenDiff / DiffEx / DIFFusion report FID and KID
between translated and real target images. Features come from a pluggable `FeatureExtractor`:

- `ClassifierFeatures(model)`: pooled penultimate features of a classifier trained here (the
  oracle judges of `phenolens.measure.oracles`) -- always available, fits any channel count;
- `InceptionFeatures()`: the ImageNet InceptionV3 of the FID paper, from the optional
  `pytorch-fid` package (not a dependency; its weights must already be on disk);
- `ProfileFeatures(reference)`: a precomputed per-image feature table (a CellProfiler-style
  profile), standardised by the reference set.

Images are float numpy arrays C×H×W or B×C×H×W in [-1, 1] (torch BCHW for feature extractors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from phenolens.errors import PhenolensError

#: Width of the [-1, 1] intensity range: the peak signal of PSNR and the `data_range` of SSIM.
DATA_RANGE = 2.0


# ---------------------------------------------------------------------------------------------
# Per-image metrics
# ---------------------------------------------------------------------------------------------

def _pair(a, b) -> tuple[np.ndarray, np.ndarray, bool]:
    """Both images as float64 B×C×H×W, and whether the input was a single C×H×W image."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (3, 4):
        raise ValueError(f"expected C×H×W or B×C×H×W images, got shape {a.shape}")
    single = a.ndim == 3
    return (a[None], b[None], True) if single else (a, b, False)


def _out(values: np.ndarray, single: bool) -> float | np.ndarray:
    return float(values[0]) if single else values


def mse(a, b) -> float | np.ndarray:
    """Mean squared error per image: a float for C×H×W input, shape (B,) for B×C×H×W."""
    a, b, single = _pair(a, b)
    return _out(((a - b) ** 2).mean(axis=(1, 2, 3)), single)


def psnr(a, b, data_range: float = DATA_RANGE) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB per image (inf for identical images); range 2 for [-1, 1]."""
    a, b, single = _pair(a, b)
    err = ((a - b) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(data_range ** 2 / err)
    return _out(values, single)


def psnr_from_mse(mse: np.ndarray | float, data_range: float = DATA_RANGE) -> np.ndarray:
    """PSNR in dB from MSEs already measured (for images in [-1, 1] the data range is 2)."""
    mse = np.maximum(np.asarray(mse, dtype=np.float64), 1e-20)
    return 10.0 * np.log10(data_range ** 2 / mse)


def _ssim_window(height: int, width: int) -> int:
    """skimage's default 7×7 window, or the largest odd window that fits a smaller image."""
    side = min(height, width, 7)
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3×3 pixels, got {height}×{width}")
    return side if side % 2 else side - 1


def ssim(a, b, data_range: float = DATA_RANGE) -> float | np.ndarray:
    """Structural similarity per image (1 for identical images), averaged over channels.

    Uses `skimage.metrics.structural_similarity` (Wang et al. 2004) with the channel axis first;
    images under 7 px get the largest odd window that fits.
    """
    from skimage.metrics import structural_similarity

    a, b, single = _pair(a, b)
    win = _ssim_window(*a.shape[-2:])
    values = np.array([structural_similarity(x, y, channel_axis=0, data_range=data_range, win_size=win)
                       for x, y in zip(a, b)])
    return _out(values, single)


def cycle_loss(source, cycled) -> float:
    """Mean MSE between source images and their source -> target -> source reconstructions.

    A faithful translation keeps what the condition does not change, so translating back should
    return the input (CycleGAN-style consistency); lower is better, 0 is a perfect cycle.
    """
    return float(np.mean(mse(source, cycled)))


# ---------------------------------------------------------------------------------------------
# Distribution metrics on features
# ---------------------------------------------------------------------------------------------

def _features(feats, name: str) -> np.ndarray:
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a (samples, features) array, got shape {x.shape}")
    if len(x) < 2:
        raise PhenolensError(f"{name}: FID/KID need at least 2 images per set, got {len(x)}")
    if not np.isfinite(x).all():
        raise PhenolensError(f"{name}: features contain NaN or inf values")
    return x


def _feature_pair(feats_a, feats_b) -> tuple[np.ndarray, np.ndarray]:
    a = _features(feats_a, "first feature set")
    b = _features(feats_b, "second feature set")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    return a, b


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID on Inception features).

    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule...", Sec. 3 (FID):
        d² = ||μ_a − μ_b||² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}).
    Tr (Σ_a Σ_b)^{1/2} is the sum of the square roots of the eigenvalues of Σ_a^{1/2} Σ_b Σ_a^{1/2},
    a symmetric PSD matrix: two symmetric eigendecompositions instead of a general matrix square
    root, so it stays real and finite when there are fewer samples than feature dimensions
    (singular covariances) and is several times faster for a few hundred features.
    """
    a, b = _feature_pair(feats_a, feats_b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root_a @ cov_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_root = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    if not np.isfinite(trace_root):
        raise PhenolensError("Fréchet distance: the feature covariances are not finite")
    diff = mu_a - mu_b
    d2 = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root
    return float(max(d2, 0.0))  # rounding can leave -1e-12 for identical sets


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's cubic kernel k(x, y) = (xᵀy / d + 1)³ (Bińkowski et al. 2018, Sec. 4)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² estimate (Gretton et al. 2012, eq. 3; used for KID by Bińkowski et al. 2018):
        1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i, y_j) − 2/(mn) Σ_{i,j} k(x_i, y_j).
    """
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    term_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_x + term_y - 2.0 * k_xy.mean())


def kernel_inception_distance(feats_a, feats_b, subsets: int = 100, subset_size: int | None = None,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): mean and std of the unbiased MMD² with
    the cubic polynomial kernel over `subsets` random subsets of each set.

    Unlike FID it is unbiased, so it is ≈ 0 (and can be slightly negative) for two samples of one
    distribution, which makes it usable with the few hundred images of a microscopy condition.
    `subset_size` defaults to min(len(a), len(b), 1000); each subset is drawn without replacement.
    """
    a, b = _feature_pair(feats_a, feats_b)
    size = min(len(a), len(b), 1000) if subset_size is None else int(subset_size)
    if size < 2 or size > min(len(a), len(b)):
        raise ValueError(f"subset_size must be in [2, {min(len(a), len(b))}], got {size}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    rng = np.random.default_rng(seed)
    values = np.array([_mmd2_unbiased(a[rng.choice(len(a), size, replace=False)],
                                      b[rng.choice(len(b), size, replace=False)]) for _ in range(subsets)])
    return float(values.mean()), float(values.std())


def distribution_metrics(real_feats, generated_feats, kid_subsets: int = 100,
                         kid_subset_size: int | None = None, seed: int = 0) -> dict[str, float]:
    """FID and KID between real and generated feature sets: {"fid", "kid_mean", "kid_std"}."""
    kid_mean, kid_std = kernel_inception_distance(real_feats, generated_feats, subsets=kid_subsets,
                                                  subset_size=kid_subset_size, seed=seed)
    return {"fid": frechet_distance(real_feats, generated_feats), "kid_mean": kid_mean, "kid_std": kid_std}


# ---------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------

@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images (torch B×C×H×W in [-1, 1]) to a (B, D) numpy feature array for FID / KID.

    `name` says which features a reported FID was computed on: FIDs on different features are
    not comparable (an Inception FID is not a classifier-feature FID).
    """

    name: str

    def __call__(self, images: torch.Tensor) -> np.ndarray: ...


def _as_tensor(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected B×C×H×W images, got shape {tuple(x.shape)}")
    return x.float()


class ClassifierFeatures:
    """Pooled penultimate features of a trained transformers image classifier.

    For the CNN classifiers used here (ResNet, MobileNetV2, EfficientNet ...ForImageClassification)
    the base model's `pooler_output` is exactly the vector the classification head reads (ResNet
    returns it as B×C×1×1, hence the flatten). Models whose base has no pooler (e.g. ViT built
    without one) fall back to the mean of the last hidden state over space or tokens.
    """

    def __init__(self, model, batch_size: int = 64, name: str | None = None):
        self.model = model.eval()
        self.batch_size = batch_size
        self.name = name or f"classifier:{type(model).__name__}"

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(pixel_values=x)  # the backbone without the classification head
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        last = getattr(out, "last_hidden_state", None)
        if last is None:
            last = self.model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        if last.ndim == 4:  # B×C×H×W feature map
            return last.mean(dim=(2, 3))
        if last.ndim == 3:  # B×tokens×D sequence
            return last.mean(dim=1)
        return last.flatten(1)

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        x = _as_tensor(images)
        device = next(self.model.parameters()).device
        out = [self._batch(x[i:i + self.batch_size].to(device)) for i in range(0, len(x), self.batch_size)]
        return torch.cat(out).float().cpu().numpy()


class InceptionFeatures:
    """2048-d pool features of the FID InceptionV3 (Heusel et al. 2017), via the optional
    `pytorch-fid` package (install: `pip install pytorch-fid`; an `inception = ["pytorch-fid"]`
    extra would pull it in). Nothing is downloaded: the FID weights file must already be in the
    torch hub cache (`$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth`).

    The network expects RGB: 3-channel images are used as they are, `rgb=(i, j, k)` picks three
    channels, otherwise each channel is fed as a grey image and the features averaged over
    channels. Not exercised by the tests here (the package is not installed in this environment).
    """

    name = "inception-v3-fid"

    def __init__(self, rgb: tuple[int, int, int] | None = None, batch_size: int = 32, device: str = "cpu"):
        try:
            from pytorch_fid import inception as fid_inception
        except ImportError as exc:  # also when its torchvision dependency is missing
            raise PhenolensError(
                "InceptionFeatures needs the optional package pytorch-fid: `pip install pytorch-fid` "
                "(with torchvision), and its InceptionV3 FID weights available locally (nothing is "
                f"downloaded); or use ClassifierFeatures ({exc})") from None
        url = getattr(fid_inception, "FID_WEIGHTS_URL", "pt_inception-2015-12-05-6726825d.pth")
        weights = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if not weights.is_file():
            raise PhenolensError(f"InceptionFeatures: FID weights not found at {weights}; place the "
                                 "pytorch-fid InceptionV3 weights there (nothing is downloaded)")
        block = fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
        # normalize_input=False: our images are already in [-1, 1], the range the network takes.
        self.model = fid_inception.InceptionV3([block], resize_input=True, normalize_input=False).to(device).eval()
        self.rgb = rgb
        self.batch_size = batch_size
        self.device = device

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device))[0].flatten(1)

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        x = _as_tensor(images)
        out = []
        for i in range(0, len(x), self.batch_size):
            batch = x[i:i + self.batch_size]
            if self.rgb is not None:
                out.append(self._pool(batch[:, list(self.rgb)]))
            elif batch.shape[1] == 3:
                out.append(self._pool(batch))
            else:
                per_channel = [self._pool(batch[:, c:c + 1].expand(-1, 3, -1, -1)) for c in range(batch.shape[1])]
                out.append(torch.stack(per_channel).mean(0))
        return torch.cat(out).cpu().numpy()


class ProfileFeatures:
    """A precomputed per-image feature table (rows = images, e.g. a CellProfiler profile),
    standardised with the reference (real) set's per-feature mean and std.

    Profile features have arbitrary units (areas in px², intensities, texture scores), so without
    standardisation FID / KID would be dominated by the largest-valued features. Constant
    reference features keep unit scale. Call it on a table (not on images): `ProfileFeatures(real)`
    then `distribution_metrics(prof.reference, prof(generated_table))`.
    """

    name = "profile"

    def __init__(self, reference):
        table = self._table(reference, "reference profile")
        self.mean = table.mean(0)
        std = table.std(0)
        self.std = np.where(std > 1e-12, std, 1.0)
        self.reference = self(table)

    @staticmethod
    def _table(table, what: str) -> np.ndarray:
        x = np.asarray(table, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"{what}: expected a (images, features) table, got shape {x.shape}")
        bad = ~np.isfinite(x)
        if bad.any():
            raise PhenolensError(f"{what}: {int(bad.any(0).sum())} feature column(s) contain NaN or inf; "
                                 "drop or impute them first")
        return x

    def __call__(self, table) -> np.ndarray:
        x = self._table(table, "profile")
        if x.shape[1] != len(self.mean):
            raise ValueError(f"profile has {x.shape[1]} features, the reference {len(self.mean)}")
        return (x - self.mean) / self.std
